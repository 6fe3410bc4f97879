"""The LaCT layer's glue (fastweights.ops.lact_glue): the Triton kernels against the torch
references in float64, forward and every gradient, with odd sizes (N not a multiple of the
token block, half-widths that are not powers of two), strided inputs and packed positions; the
layer with either glue; clear errors."""

import os
import subprocess
import sys

import pytest
import torch

from fastweights.layers.lact import LaCTLayer
from fastweights.ops import lact_glue
from fastweights.ops.inplace_ttt_triton import HAVE_TRITON


def test_pick_impl_errors():
    x = torch.zeros(1)
    assert lact_glue.pick_impl("torch", x) == "torch"
    assert lact_glue.pick_impl("auto", x) == "torch"  # CPU
    with pytest.raises(ValueError, match="impl must be one of .*'cuda'"):
        lact_glue.pick_impl("cuda", x)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match=r"needs a CUDA tensor \(or TRITON_INTERPRET=1 on CPU\), got one on cpu"
                           if HAVE_TRITON else r"pip install 'fastweights\[triton\]'"):
            lact_glue.pick_impl("triton", x)


def test_triton_impl_without_triton_names_the_install(monkeypatch):
    """Without triton, impl='triton' named neither the package to install nor the way out."""
    import fastweights.ops.inplace_ttt_triton as tt

    monkeypatch.setattr(tt, "HAVE_TRITON", False)
    with pytest.raises(ValueError, match=r"needs the triton package: pip install 'fastweights\[triton\]' \(or use "
                                         r"impl='auto' or 'torch'\)"):
        lact_glue.pick_impl("triton", torch.zeros(1))
    with pytest.raises(ValueError, match="glue must be one of .*'fast'"):
        LaCTLayer(32, 2, glue="fast")


GLUE_CHECK = r"""
import torch
from fastweights.layers.attention import rope_cos_sin
from fastweights.ops import lact_glue as G

def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()

gen = torch.Generator().manual_seed(0)
B, N, H, D = 2, 19, 3, 10  # N % BLOCK_N != 0; D / 2 = 5 (block 8)
d = H * D
assert N % G.MERGE_BLOCK_N
qkv = torch.randn(B, N, 3 * d, generator=gen, dtype=torch.float64)
lr = torch.randn(B, N, 3 * H, generator=gen, dtype=torch.float64)
be = torch.randn(B, N, H, generator=gen, dtype=torch.float64)
sc = 1 + 0.3 * torch.randn(2, d, generator=gen, dtype=torch.float64)
sh = 0.3 * torch.randn(2, d, generator=gen, dtype=torch.float64)
pos = torch.cat([torch.arange(7), torch.arange(12)]).expand(B, N)  # two documents per row
cos, sin = rope_cos_sin(pos, D, 1e4, torch.float64)
gos = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(B, H, N, D)] * 3 + [(B, H, N, 3), (B, H, N)]]
# cotangents of q, k, v passed through to the other branch (a strided one, as attention's may be)
gos_pass = [torch.randn(B, N, d, generator=gen, dtype=torch.float64),
            torch.randn(B, N, 2 * d, generator=gen, dtype=torch.float64)[..., d:],
            torch.randn(B, N, d, generator=gen, dtype=torch.float64)]

def inputs(impl, dtype, beta, passthrough=False, fast=True):
    leaves = [t.to(dtype).requires_grad_() for t in (qkv, lr, be, sc, sh)]
    q, k, v = leaves[0].chunk(3, dim=-1)  # strided views, as in the layer
    outs = G.fast_inputs(q, k, v, leaves[1], leaves[2] if beta else None, cos.to(dtype), sin.to(dtype),
                         leaves[3], leaves[4], H, impl=impl, passthrough=passthrough)
    assert len(outs) == (8 if passthrough else 5)
    if passthrough:
        assert all(torch.equal(o, x) for o, x in zip(outs[5:], (q, k, v)))
    outs = [o for o in outs[:5] if o is not None] + list(outs[5:])
    pairs = list(zip(outs, gos if fast else [])) + (list(zip(outs[-3:], gos_pass)) if passthrough else [])
    loss = sum((o * g.to(dtype)).sum() for o, g in pairs)
    used = leaves if beta else leaves[:2] + leaves[3:]
    return [*outs, *torch.autograd.grad(loss, used, allow_unused=not fast)]

empty = torch.empty
# (tokens per program, per tile): the defaults, and blocks that split N over several programs
# with a short last tile (their ∂scale/∂shift partial sums meet in the reduction)
for (G.BLOCK_N, G.TILE_N), (G.BWD_BLOCK_N, G.BWD_TILE_N) in (
        ((G.BLOCK_N, G.TILE_N), (G.BWD_BLOCK_N, G.BWD_TILE_N)), ((8, 4), (4, 1)), ((4, 1), (8, 4))):
    assert N % G.BLOCK_N and N % G.BWD_BLOCK_N
    for beta in (True, False):
        want = inputs("torch", torch.float64, beta)
        torch.empty = lambda *a, **k: empty(*a, **k).fill_(float("nan"))  # an unwritten element -> NaN
        got = inputs("triton", torch.float32, beta)
        torch.empty = empty
        assert len(got) == len(want) == (10 if beta else 8)
        for i, (a, b) in enumerate(zip(got, want)):
            assert not a.isnan().any(), i
            assert rel(a, b) < 2e-6, (i, rel(a, b))
    # q, k, v passed through: the Triton backward adds their other gradient in its own pass;
    # also when only the passed-through tensors get a gradient (the fast outputs get none)
    for fast in (True, False):
        want = inputs("torch", torch.float64, True, passthrough=True, fast=fast)
        torch.empty = lambda *a, **k: empty(*a, **k).fill_(float("nan"))
        got = inputs("triton", torch.float32, True, passthrough=True, fast=fast)
        torch.empty = empty
        assert len(got) == len(want) == 13
        for i, (a, b) in enumerate(zip(got, want)):
            if b is None:  # unused by the reference: None or zeros
                assert a is None or not a.any(), i
            else:
                assert not a.isnan().any(), i
                assert rel(a, b) < 2e-6, (i, rel(a, b))

# out=: the kernels write q_f, k_f, v_f into given buffers (the loop's CUDA-graph inputs) and return them
q, k, v = qkv.float().chunk(3, dim=-1)
args = (lr.float(), be.float(), cos.float(), sin.float(), sc.float(), sh.float(), H)
plain = G.fast_inputs(q, k, v, *args, impl="triton")
bufs = [torch.full((B, H, N, D), float("nan")) for _ in range(3)]
into = G.fast_inputs(q, k, v, *args, impl="triton", out=bufs)
for a, b, buf in zip(into[:3], plain[:3], bufs):
    assert torch.equal(a, b) and torch.equal(buf, b) and a.data_ptr() == buf.data_ptr()
try:
    G.fast_inputs(q, k, v, *args, impl="triton", out=[torch.empty(B, H, N, D + 1)] * 3)
    raise AssertionError("no error")
except ValueError as e:
    assert "out must be three contiguous" in str(e), e

# rows whose SiLU has a norm below eps (tiny, zero): the norm is clamped at eps, as F.normalize does
z = torch.zeros(1, 3, 4, dtype=torch.float64)
z[0, 0] = 1e-13 * torch.randn(4, generator=gen, dtype=torch.float64)
z[0, 1] = torch.randn(4, generator=gen, dtype=torch.float64)
one, zero = torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
c, s = rope_cos_sin(torch.arange(3)[None], 4, 1e4, torch.float64)
gz = torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64)
res = []
for impl, dt in (("torch", torch.float64), ("triton", torch.float32)):
    zz = z.to(dt).requires_grad_()
    qf = G.fast_inputs(zz, zz, zz, torch.zeros(1, 3, 3, dtype=dt), None, c.to(dt), s.to(dt), one.to(dt),
                       zero.to(dt), 1, impl=impl)[0]
    res.append([qf, *torch.autograd.grad((qf * gz.to(dt)).sum(), zz)])
for a, b in zip(*res[::-1]):
    assert rel(a, b) < 2e-6, rel(a, b)
assert res[0][1][0, 0].abs().max() > 1e10  # ∂/∂x = ∂/∂(SiLU x) / eps * SiLU'(0) on the clamped rows

# merge: f as a strided view (B, N, H, D) -> (B, H, N, D), gate a strided view
a0 = torch.randn(B, N, d, generator=gen, dtype=torch.float64)
g0 = torch.randn(B, N, 2 * d, generator=gen, dtype=torch.float64)
f0 = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
w0 = 1 + 0.2 * torch.randn(D, generator=gen, dtype=torch.float64)
go = torch.randn(B, N, d, generator=gen, dtype=torch.float64)

def merged(impl, dtype):
    leaves = [t.to(dtype).requires_grad_() for t in (a0, g0, f0, w0)]
    out = G.merge(leaves[0], leaves[1][..., d:], leaves[2].transpose(1, 2), leaves[3], 1e-6, impl=impl)
    return [out, *torch.autograd.grad((out * go.to(dtype)).sum(), leaves)]

want = merged("torch", torch.float64)
torch.empty = lambda *a, **k: empty(*a, **k).fill_(float("nan"))
got = merged("triton", torch.float32)
torch.empty = empty
for i, (a, b) in enumerate(zip(got, want)):
    assert not a.isnan().any(), i
    assert rel(a, b) < 2e-6, (i, rel(a, b))

# the layer with either glue (float32, training call): output and every gradient
from fastweights.models.hybrid.modeling import _layout
torch.manual_seed(0)
layer = torch.nn.ModuleDict({g: __import__("fastweights.layers.lact", fromlist=["LaCTLayer"]).LaCTLayer(
    40, 2, fw_heads=2, window=8, chunk_size=8, update="momentum", glue=g) for g in ("torch", "triton")})
layer["triton"].load_state_dict(layer["torch"].state_dict())
x = torch.randn(2, 37, 40, generator=gen)
p2 = torch.cat([torch.arange(20), torch.arange(17)]).expand(2, 37)  # 3 chunks each: β reaches the output
lay = _layout(p2, None, None, 2, 37, x.device)
res = []
for g in ("torch", "triton"):
    xx = x.clone().requires_grad_()
    y, _ = layer[g](xx, lay)
    params = list(layer[g].parameters())
    res.append([y, *torch.autograd.grad(y.square().sum(), [xx, *params])])
assert len(res[1]) == 2 + len(list(layer["torch"].parameters()))
for a, b in zip(*res[::-1]):
    assert b.norm() > 0 and rel(a, b) < 1e-5, rel(a, b)
print("ok")
"""


def test_glue_triton_kernels_interpreted():
    """The glue's Triton kernels on CPU under TRITON_INTERPRET=1 (set before triton is imported,
    hence a fresh interpreter): forward and every gradient against the float64 references."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", GLUE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glue_triton_on_cuda_matches_cpu_float64(dtype):
    """The compiled kernels on the GPU at the benchmark's head width (D 384) against the float64
    CPU references: forward and every gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fastweights.ops.rope import rope_cos_sin

    gen = torch.Generator().manual_seed(0)
    B, N, H, D = 1, 1037, 4, 384
    d = H * D
    base = [torch.randn(B, N, 3 * d, generator=gen, dtype=torch.float64),
            torch.randn(B, N, 3 * H, generator=gen, dtype=torch.float64),
            torch.randn(B, N, H, generator=gen, dtype=torch.float64),
            1 + 0.3 * torch.randn(2, d, generator=gen, dtype=torch.float64),
            0.3 * torch.randn(2, d, generator=gen, dtype=torch.float64),
            torch.randn(B, N, d, generator=gen, dtype=torch.float64),
            torch.randn(B, N, d, generator=gen, dtype=torch.float64),
            1 + 0.2 * torch.randn(D, generator=gen, dtype=torch.float64)]
    cos, sin = rope_cos_sin(torch.arange(N)[None], D, 1e6, torch.float64)
    gos = [torch.randn(s, generator=gen, dtype=torch.float64)
           for s in [(B, H, N, D)] * 3 + [(B, H, N, 3), (B, H, N), (B, N, d)]]

    def run(impl, dev, dt):
        leaves = [t.to(dev, dt).requires_grad_() for t in base]
        q, k, v = leaves[0].chunk(3, dim=-1)
        outs = list(lact_glue.fast_inputs(q, k, v, leaves[1], leaves[2], cos.to(dev, dt), sin.to(dev, dt),
                                          leaves[3], leaves[4], H, impl=impl))
        outs.append(lact_glue.merge(leaves[5], leaves[6], outs[2], leaves[7], 1e-6, impl=impl))
        loss = sum((o.float() * g.to(dev, torch.float32)).sum() for o, g in zip(outs, gos))
        return [o.double().cpu() for o in (*outs, *torch.autograd.grad(loss, leaves))]

    assert lact_glue.pick_impl("auto", base[0].to("cuda", dtype)) == "triton"  # the layer's default on CUDA
    assert lact_glue.pick_impl("auto", base[0].to("cuda")) == "torch"  # float64: the kernels compute in float32
    want = run("torch", torch.device("cpu"), torch.float64)
    got = run("triton", torch.device("cuda"), dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        err = ((a - b).norm() / b.norm()).item()
        assert err < tol, (i, err)


def test_glue_kernels_compile_for_hopper_without_a_gpu():
    """Each glue kernel variant goes through Triton's real compiler to an sm_90 binary (ptxas
    ships with triton), at the default blocks and the benchmark's head width: the interpreter
    does not check what only the compiler rejects (types, constexpr branches, layouts)."""
    pytest.importorskip("triton")
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this triton's ahead-of-time API differs (ASTSource without constexprs)")
    target = GPUTarget("cuda", 90, 32)

    def build(fn, consts, fp32_ptrs, warps):
        sig = {n: "constexpr" if n in consts else "fp32" if n == "eps" else
               ("*fp32" if n in fp32_ptrs else "*bf16") if n.endswith("_ptr") else "i32" for n in fn.arg_names}
        return compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": warps, "enable_fp_fusion": True})  # as at run time

    D = 384
    for qk in (True, False):
        for backward, acc in ((True, True), (True, False), (False, False)):
            g = lact_glue
            bn, tb, warps = (g.BWD_BLOCK_N, g.BWD_TILE_N, g.BWD_WARPS) if backward else (g.BLOCK_N, g.TILE_N, g.WARPS)
            consts = dict(QK=qk, BACKWARD=backward, BN=bn, TB=tb, BH=lact_glue._half_block(D), ACC=acc)
            kernel = build(lact_glue._inputs_kernel, consts, ("dsc_ptr", "dsh_ptr"), warps)
            assert kernel.asm["cubin"], consts
    for backward in (True, False):
        consts = dict(BACKWARD=backward, BN=lact_glue.MERGE_BLOCK_N, BD=512)
        kernel = build(lact_glue._merge_kernel, consts, ("dw_ptr",), lact_glue.MERGE_WARPS)
        assert kernel.asm["cubin"], consts
