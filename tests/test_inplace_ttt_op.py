"""The In-Place TTT op: sequential reference, chunked form and an independent per-chunk-weight
formula agree in the forward pass and in every gradient (SPEC §1)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastweights.ops import doc_starts, inplace_ttt, inplace_ttt_chunked, inplace_ttt_reference

NAMES = ["z", "s", "w0", "conv", "proj", "lr"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def make_inputs(B, N, d, f, dtype=torch.float64, seed=0, conv_scale=0.5, lr=0.3):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    return dict(
        z=t(B, N, f), s=t(B, N, d), w0=t(d, f, scale=f**-0.5), conv=t(d, 5, scale=conv_scale),
        proj=t(d, d, scale=d**-0.5), lr=torch.tensor(lr, dtype=torch.float64),
    )


def leaves(inp, dtype=torch.float64):
    return {k: v.to(dtype).detach().requires_grad_(True) for k, v in inp.items()}


def run(fn, x, C, **kw):
    return fn(x["z"], x["s"], x["w0"], x["conv"], x["proj"], x["lr"], C, **kw)


def grads(out, x, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), [x[k] for k in NAMES], allow_unused=True, materialize_grads=True)


def per_chunk_weights(x, C, starts):
    """Independent formula: materialise W_i = W0 + η Σ_{j<i} v_jᵀ z_j per chunk (official style),
    with the target from torch's conv1d applied to each chunk separately."""
    z, s, w0, conv, proj, lr = (x[k] for k in NAMES)
    B, N, f = z.shape
    d = s.shape[-1]
    rows = []
    for b in range(B):
        bounds = [n for n in range(N) if starts[b, n]] + [N]
        out = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            W = w0
            for c0 in range(lo, hi, C):
                c1 = min(c0 + C, hi)
                zc, sc = z[b, c0:c1], s[b, c0:c1]
                out.append(zc @ W.T)
                t = F.conv1d(sc.T.unsqueeze(0), conv.unsqueeze(1), padding=2, groups=d)[0].T
                W = W + lr * ((t @ proj).T @ zc)
        rows.append(torch.cat(out))
    return torch.stack(rows)


SHAPES = [  # B, N, d, f, C, block
    (2, 37, 6, 9, 5, 7),  # odd N, odd f, N % C != 0, blocks straddle chunks
    (1, 50, 5, 11, 1, 8),  # C = 1
    (3, 20, 4, 7, 30, None),  # C > N
    (2, 63, 7, 13, 8, 16),
    (1, 33, 5, 5, 4, 100),  # one block
    (2, 24, 3, 6, 6, 6),  # block == chunk
]


@pytest.mark.parametrize("B,N,d,f,C,block", SHAPES, ids=[f"B{s[0]}N{s[1]}d{s[2]}f{s[3]}C{s[4]}L{s[5]}" for s in SHAPES])
@pytest.mark.parametrize("docs", ["none", "position_ids", "cu_seqlens"])
def test_reference_chunked_and_formula_agree_float64(B, N, d, f, C, block, docs):
    if docs == "cu_seqlens" and B != 1:
        B = 1
    x = leaves(make_inputs(B, N, d, f, seed=N * 7 + C))
    kw = {}
    if docs == "position_ids":
        g = torch.Generator().manual_seed(N)
        pos = []
        for _ in range(B):
            cuts = sorted(torch.randperm(N - 1, generator=g)[:2].add(1).tolist())
            bounds = [0, *cuts, N]
            pos.append(torch.cat([torch.arange(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]))
        kw["position_ids"] = torch.stack(pos)
    elif docs == "cu_seqlens":
        kw["cu_seqlens"] = torch.tensor([0, N // 4, N // 4 + 3, N])
    ref = run(inplace_ttt_reference, x, C, **kw)
    chk = run(inplace_ttt_chunked, x, C, block_size=block, **kw)
    formula = per_chunk_weights(x, C, doc_starts(B, N, **kw))
    assert rel(ref, formula) < 1e-10
    assert rel(chk, ref) < 1e-10
    g_chk = grads(chk, x)
    for name, ga, gb in zip(NAMES, grads(ref, x), g_chk):
        assert rel(gb, ga) < 1e-10, name
    # the gradients are not trivially zero (conv and P reach the output beyond chunk 0)
    if N > C:
        for name, gr in zip(NAMES, g_chk):
            assert gr.abs().max() > 0, name


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_agree(seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, N, d, f, C = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                     [(1, 4), (1, 70), (1, 9), (1, 15), (1, 20)])
    x = leaves(make_inputs(B, N, d, f, seed=seed))
    block = int(torch.randint(1, 40, (1,), generator=g))
    ref = run(inplace_ttt_reference, x, C)
    chk = run(inplace_ttt_chunked, x, C, block_size=block)
    assert rel(chk, ref) < 1e-10
    for name, ga, gb in zip(NAMES, grads(ref, x), grads(chk, x)):
        assert rel(gb, ga) < 1e-10, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", [inplace_ttt_chunked, inplace_ttt_reference], ids=["chunked", "reference"])
def test_low_precision_close_to_float64(dtype, fn):
    inp = make_inputs(2, 45, 12, 20, seed=3, conv_scale=0.3, lr=0.1)
    low = leaves({k: v.to(dtype) for k, v in inp.items()}, dtype)  # rounded inputs
    high = leaves({k: v.to(dtype).double() for k, v in inp.items()})
    o_low, o_high = run(fn, low, 8), run(fn, high, 8)
    assert o_low.dtype == dtype
    assert rel(o_low, o_high) < 1e-2
    for name, gl, gh in zip(NAMES, grads(o_low, low), grads(o_high, high)):
        assert rel(gl, gh) < 1e-2, name


def test_fast_weight_state_is_float32_for_half_inputs():
    """With bf16 inputs the per-token contributions must not be rounded to bf16 before summing:
    a long sequence of small updates stays accurate."""
    inp = make_inputs(1, 400, 8, 16, seed=4, conv_scale=0.3, lr=0.05)
    low = {k: v.to(torch.bfloat16) for k, v in inp.items()}
    high = {k: v.to(torch.bfloat16).double() for k, v in inp.items()}
    assert rel(run(inplace_ttt_chunked, low, 16), run(inplace_ttt_chunked, high, 16)) < 1e-2


def test_gradcheck_chunked_and_reference():
    x = leaves(make_inputs(2, 11, 3, 4, seed=5))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    args = [x[k] for k in NAMES]
    assert torch.autograd.gradcheck(
        lambda *a: inplace_ttt_chunked(*a, 3, position_ids=pos, block_size=4), args, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda *a: inplace_ttt_reference(*a, 3, position_ids=pos), args, eps=1e-6,
                                    atol=1e-7)


@pytest.mark.parametrize("fn", [inplace_ttt_chunked, inplace_ttt_reference], ids=["chunked", "reference"])
def test_packed_equals_documents_one_at_a_time(fn):
    d, f, C = 5, 7, 4
    lengths = [9, 1, 4, 13, 6]
    N = sum(lengths)
    x = make_inputs(1, N, d, f, seed=6)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    packed_cu = run(fn, x, C, cu_seqlens=cu)
    packed_pos = run(fn, x, C, position_ids=pos)
    singles = []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        xi = dict(x, z=x["z"][:, lo:hi], s=x["s"][:, lo:hi])
        singles.append(run(fn, xi, C))
    singles = torch.cat(singles, dim=1)
    assert rel(packed_cu, singles) < 1e-12
    assert rel(packed_pos, singles) < 1e-12


def test_no_leak_across_documents():
    """Changing an earlier document never changes a later one."""
    x = make_inputs(1, 30, 4, 6, seed=7)
    pos = torch.cat([torch.arange(17), torch.arange(13)]).unsqueeze(0)
    a = run(inplace_ttt_chunked, x, 4, position_ids=pos, block_size=8)
    x2 = dict(x, z=x["z"].clone(), s=x["s"].clone())
    x2["z"][:, :17] += 1.0
    x2["s"][:, :17] -= 2.0
    b = run(inplace_ttt_chunked, x2, 4, position_ids=pos, block_size=8)
    assert torch.equal(a[:, 17:], b[:, 17:])
    assert not torch.allclose(a[:, :17], b[:, :17])


def test_chunk_zero_reads_w0_and_next_token_target():
    """Chunk 0 uses W0; with conv weight 1 at offset +1 and P = I, v_t is the next token's source."""
    d, f, C, N = 4, 6, 5, 12
    x = make_inputs(1, N, d, f, seed=8)
    x["conv"] = torch.zeros(d, 5, dtype=torch.float64)
    x["conv"][:, 3] = 1.0
    x["proj"] = torch.eye(d, dtype=torch.float64)
    out = run(inplace_ttt_chunked, x, C)
    z, s, w0, lr = x["z"][0], x["s"][0], x["w0"], x["lr"]
    assert rel(out[0, :C], z[:C] @ w0.T) < 1e-14
    v = torch.cat([s[1:C], torch.zeros(1, d, dtype=torch.float64)])  # next token inside the chunk, 0 at its end
    expected = z[C:2 * C] @ (w0 + lr * v.T @ z[:C]).T
    assert rel(out[0, C:2 * C], expected) < 1e-12


def test_dispatch_and_bad_input():
    x = make_inputs(1, 10, 3, 4)
    assert rel(run(inplace_ttt, x, 4), run(inplace_ttt_reference, x, 4)) < 1e-12
    with pytest.raises(ValueError, match="chunk_size"):
        run(inplace_ttt, x, 0)
    with pytest.raises(ValueError, match="lr must be finite"):
        inplace_ttt(x["z"], x["s"], x["w0"], x["conv"], x["proj"], float("inf"), 4)
    with pytest.raises(ValueError, match="w0 must have shape"):
        inplace_ttt(x["z"], x["s"], x["w0"].T, x["conv"], x["proj"], 1.0, 4)
    with pytest.raises(ValueError, match="impl"):
        run(inplace_ttt, x, 4, impl="magic")
    with pytest.raises(ValueError, match="cu_seqlens"):
        run(inplace_ttt, x, 4, cu_seqlens=torch.tensor([0, 3, 9]))
    for fn in (inplace_ttt, inplace_ttt_reference):  # integers, and a second device, are named
        with pytest.raises(ValueError, match=r"inputs must be floating point, got z torch.int64, s torch.int64"):
            fn(x["z"].long(), x["s"].long(), x["w0"], x["conv"], x["proj"], 1.0, 4)
        with pytest.raises(ValueError, match=r"inputs must lie on one device, got z on cpu, s on cpu, w0 on meta"):
            fn(x["z"], x["s"], x["w0"].to("meta"), x["conv"], x["proj"], 1.0, 4)


def test_boundaries_and_rates_of_the_wrong_kind_are_named():
    """Float cu_seqlens were truncated, 2-D ones flattened, bool position_ids read as positions,
    lists raised AttributeError, a (2,) lr failed in a broadcast and lr='0.1' was read by float()."""
    x = make_inputs(1, 6, 3, 4)
    bad = [(dict(cu_seqlens=torch.tensor([0.0, 2.5, 6.0])), r"cu_seqlens must be a 1-D integer tensor, got torch.fl"),
           (dict(cu_seqlens=torch.tensor([[0, 2], [4, 6]])), r"cu_seqlens must be a 1-D integer .* shape \(2, 2\)"),
           (dict(position_ids=torch.ones(1, 6, dtype=torch.bool)), r"position_ids must be a \(B, N\) or \(N,\) int"),
           (dict(position_ids=torch.zeros(1, 1, 6, dtype=torch.long)), r"position_ids .* shape \(1, 1, 6\)")]
    for fn in (inplace_ttt, inplace_ttt_reference):
        for kw, match in bad:
            with pytest.raises(ValueError, match=match):
                run(fn, x, 4, **kw)
        assert rel(run(fn, x, 4, cu_seqlens=[0, 2, 6]), run(fn, x, 4, cu_seqlens=torch.tensor([0, 2, 6]))) == 0
        assert rel(run(fn, x, 4, position_ids=[0, 1, 0, 1, 2, 3]),
                   run(fn, x, 4, position_ids=torch.tensor([[0, 1, 0, 1, 2, 3]]))) == 0
        args = [x[k] for k in ("z", "s", "w0", "conv", "proj")]
        with pytest.raises(ValueError, match=r"lr must be a number or a 1-element tensor, got shape \(2,\)"):
            fn(*args, torch.tensor([0.1, 0.2], dtype=torch.float64), 4)
        with pytest.raises(ValueError, match=r"lr must be finite: a real number .* got '0.1'"):
            fn(*args, "0.1", 4)
        empty = {k: (v[:0] if k in ("z", "s") else v) for k, v in x.items()}  # batch of 0
        assert run(fn, empty, 4).shape == (0, 6, 3)


def test_layer_refuses_both_boundary_kinds():
    """The layer dropped position_ids when cu_seqlens came too (the op refuses both)."""
    from tiny_models import tiny_model

    from fastweights.layers.inplace_ttt import InPlaceTTTMLP

    layer = InPlaceTTTMLP(tiny_model("qwen3", layers=1).model.layers[0].mlp, chunk_size=4)
    x = torch.randn(1, 9, 24)  # tiny_model's width
    with pytest.raises(ValueError, match="cu_seqlens or position_ids, not both"):
        layer(x, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]), cu_seqlens=torch.tensor([0, 2, 9]))


@pytest.mark.parametrize("lr", [True, "0.1", float("nan"), -1.0])
def test_layer_refuses_a_rate_that_is_not_a_number(lr):
    """A bool or a string was stored as a rate (True became 1.0, "0.1" 0.1)."""
    from tiny_models import tiny_model

    from fastweights.layers.inplace_ttt import InPlaceTTTMLP

    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0, got "):
        InPlaceTTTMLP(tiny_model("qwen3", layers=1).model.layers[0].mlp, chunk_size=4, lr=lr)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("impl", ["chunked", "reference", "fast"])
def test_a_tensor_rate_that_is_not_finite_is_refused(impl, value):
    """A CPU tensor rate is checked as a number rate is (NaN as a tensor once gave NaN outputs)."""
    x = make_inputs(1, 6, 3, 4)
    args = [x[k] for k in ("z", "s", "w0", "conv", "proj")]
    for lr in (value, torch.tensor(value, dtype=torch.float64), torch.tensor([value], dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"lr must be finite: a real number or a 1-element tensor, got "):
            inplace_ttt(*args, lr, 4, impl=impl)
    learned = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # the check reads it without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inplace_ttt(*args, learned, 4, impl=impl).sum().backward()
    assert learned.grad is not None
