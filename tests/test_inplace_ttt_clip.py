"""Clipping each chunk's In-Place TTT update to Frobenius norm τ (SPEC §1: "clipping ||ΔW||_F to τ
at inference ... Expose it as an option, off by default"): the reference, chunked and fast forms,
streaming, the layer, the converted model and its config."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from fastweights.errors import FastWeightsError
from fastweights.ops.inplace_ttt import (
    chunk_ids,
    doc_starts,
    inplace_ttt,
    inplace_ttt_chunked,
    inplace_ttt_reference,
    ttt_target,
)
from fastweights.ops.inplace_ttt_fast import inplace_ttt_fast

F64 = torch.float64


def inputs(B, N, d, f, seed, lr=0.9):
    g = torch.Generator().manual_seed(seed)
    return {"z": torch.randn(B, N, f, generator=g, dtype=F64), "s": torch.randn(B, N, d, generator=g, dtype=F64),
            "w0": torch.randn(d, f, generator=g, dtype=F64), "conv": torch.randn(d, 5, generator=g, dtype=F64),
            "proj": torch.randn(d, d, generator=g, dtype=F64) * d**-0.5, "lr": torch.tensor(lr, dtype=F64)}


def chunk_norms(x, C, position_ids):
    """η‖v_iᵀ z_i‖_F of every chunk, from the targets (computed here chunk by chunk)."""
    B, N, _ = x["z"].shape
    g = chunk_ids(doc_starts(B, N, position_ids=position_ids), C)[0]
    v = ttt_target(x["s"], x["conv"], x["proj"], g)
    return torch.stack([x["lr"] * torch.linalg.matrix_norm(v[b, g[b] == j].T @ x["z"][b, g[b] == j])
                        for b in range(B) for j in g[b].unique()])


def test_the_update_is_scaled_to_tau_by_hand():
    """Two chunks, centre-tap conv, P = I: chunk 1 reads W0 + the clipped update of chunk 0, whose
    norm is then τ exactly (computed here from the equations, not from the library)."""
    x = inputs(1, 7, 3, 5, seed=1)
    x["conv"] = torch.zeros(3, 5, dtype=F64)
    x["conv"][:, 2] = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    C = 4
    z, s, w0 = x["z"][0], x["s"][0], x["w0"]
    step = x["lr"] * (s[:C] * x["conv"][:, 2]).T @ z[:C]  # η v₀ᵀ z₀
    tau = 0.3 * float(torch.linalg.matrix_norm(step))
    w1 = w0 + step * tau / torch.linalg.matrix_norm(step)
    want = torch.cat([z[:C] @ w0.T, z[C:] @ w1.T])[None]
    assert abs(float(torch.linalg.matrix_norm(w1 - w0)) - tau) < 1e-12
    for impl in ("reference", "chunked", "fast"):
        got = inplace_ttt(x["z"], x["s"], w0, x["conv"], None, x["lr"], C, impl=impl, max_update_norm=tau)
        assert (got - want).abs().max() < 1e-12, impl
    # a τ above the update's norm changes nothing, to the last bit
    loose = inplace_ttt(x["z"], x["s"], w0, x["conv"], None, x["lr"], C, max_update_norm=2 * tau / 0.3)
    assert torch.equal(loose, inplace_ttt(x["z"], x["s"], w0, x["conv"], None, x["lr"], C))


@pytest.mark.parametrize("impl", ["chunked", "fast"])
@pytest.mark.parametrize("docs", ["one", "packed"])
@pytest.mark.parametrize("f, C", [(11, 5), (37, 3)])  # the norm from the (d, f) product; from C × C Grams
def test_forms_agree_forward_and_every_gradient(impl, docs, f, C):
    """Odd sizes (N % C != 0, d and f not powers of two), a learned rate, τ between the chunks'
    norms (some chunks clipped, some not): the training forms against the sequential reference."""
    B, N, d = 2, 29, 6
    x = inputs(B, N, d, f, seed=2, lr=0.4)
    pos = None if docs == "one" else torch.tensor([list(range(12)) + list(range(17)), list(range(8)) + list(range(21))])
    norms = chunk_norms(x, C, pos)
    srt = norms.sort().values
    tau = float(srt[len(srt) // 2 - 1: len(srt) // 2 + 1].mean())  # between two chunks' norms: no chunk at the kink
    assert (norms > tau).sum() >= 3 and (norms < tau).sum() >= 3  # both kinds of chunk are present

    def run(fn):
        leaves = {k: t.clone().requires_grad_(True) for k, t in x.items()}
        o = fn(leaves["z"], leaves["s"], leaves["w0"], leaves["conv"], leaves["proj"], leaves["lr"], C,
               position_ids=pos, max_update_norm=tau)
        (o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum().backward()
        return o.detach(), {k: t.grad for k, t in leaves.items()}

    ref_o, ref_g = run(inplace_ttt_reference)
    o, grads = run(inplace_ttt_chunked if impl == "chunked" else inplace_ttt_fast)
    unclipped = inplace_ttt_reference(x["z"], x["s"], x["w0"], x["conv"], x["proj"], x["lr"], C, position_ids=pos)
    assert (ref_o - unclipped).abs().max() > 1e-3  # clipping is on
    assert (o - ref_o).abs().max() < 1e-10
    for k in ref_g:
        assert (grads[k] - ref_g[k]).abs().max() <= 1e-9 * (1 + ref_g[k].abs().max()), k


def test_gradcheck_through_the_clip_factor():
    x = inputs(1, 9, 3, 4, seed=3)
    tau = float(chunk_norms(x, 3, None).min()) * 0.5  # every chunk clipped
    args = [x[k].clone().requires_grad_(True) for k in ("z", "s", "w0", "conv", "proj", "lr")]
    assert torch.autograd.gradcheck(lambda *a: inplace_ttt_chunked(*a, 3, max_update_norm=tau), args)


def test_streaming_equals_the_full_pass_with_clipping():
    """A converted model with τ: token-by-token decoding, uneven pieces and a left-padded batch
    equal one full forward pass (the cache clips each chunk when it completes)."""
    from fastweights.models import InPlaceTTTCache, convert

    torch.manual_seed(0)
    model = convert(tiny_model("qwen3"), layers=[0, 2], chunk_size=4, lr=3.0, max_update_norm=1e-4).double().eval()
    for m in model.modules():  # a conv that makes real updates
        if hasattr(m, "ttt_conv"):
            torch.nn.init.normal_(m.ttt_conv.weight, std=0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for m in model.modules():
            if hasattr(m, "ttt_conv"):
                m.max_update_norm = None
        unclipped = model(ids, use_cache=False).logits
        for m in model.modules():
            if hasattr(m, "ttt_conv"):
                m.max_update_norm = 1e-4
        assert (full - unclipped).abs().max() > 1e-4  # τ is active
        cache = InPlaceTTTCache(model.config)
        pieces, at = [], 0
        for n in (1, 1, 5, 3, 1, 8):
            pieces.append(model(ids[:, at:at + n], past_key_values=cache, use_cache=True).logits)
            at += n
        assert (torch.cat(pieces, 1) - full).abs().max() < 1e-9
        padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids[:1, :16]], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # the row's own positions (RoPE in float64 throughout)
        out = model(padded, attention_mask=mask, position_ids=pos, past_key_values=InPlaceTTTCache(model.config),
                    use_cache=True).logits
        assert (out[:, 3:] - model(ids[:1, :16], use_cache=False).logits).abs().max() < 1e-9


def test_config_save_load_and_from_pretrained_override(tmp_path):
    from transformers import AutoModelForCausalLM

    from fastweights.models import convert

    model = convert(tiny_model("llama"), layers=[1], chunk_size=4, max_update_norm=2.5)
    assert model.config.ttt_max_update_norm == 2.5
    assert [m.max_update_norm for m in model.modules() if hasattr(m, "ttt_conv")] == [2.5]
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert [m.max_update_norm for m in loaded.modules() if hasattr(m, "ttt_conv")] == [2.5]
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "m", ttt_max_update_norm=0.5)
    assert [m.max_update_norm for m in other.modules() if hasattr(m, "ttt_conv")] == [0.5]
    off = convert(tiny_model("llama"), layers=[1], chunk_size=4)
    assert off.config.ttt_max_update_norm is None
    off.save_pretrained(tmp_path / "off")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "off", ttt_max_update_norm=1.0)
    assert reloaded.config.ttt_max_update_norm == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_tau_is_named(bad):
    from fastweights.models import convert

    msg = r"max_update_norm must be None \(no clipping\) or a finite number > 0, got "
    with pytest.raises(ValueError, match=msg):
        convert(tiny_model("qwen3"), max_update_norm=bad)
    x = inputs(1, 5, 2, 3, seed=0)
    with pytest.raises(ValueError, match=msg):
        inplace_ttt(x["z"], x["s"], x["w0"], x["conv"], None, 1.0, 2, max_update_norm=bad)


def test_hybrid_config_passes_tau_to_its_ttt_mlps():
    from fastweights.models.hybrid import HybridConfig, HybridForCausalLM

    cfg = HybridConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, mixers="attention", mlps=["swiglu", "inplace_ttt"], ttt_chunk=4,
                       ttt_max_update_norm=0.7)
    model = HybridForCausalLM(cfg)
    assert [m.max_update_norm for m in model.modules() if hasattr(m, "ttt_conv")] == [0.7]
    with pytest.raises(ValueError, match="max_update_norm must be None"):
        HybridConfig(mixers="attention", mlps="inplace_ttt", ttt_max_update_norm=-1)


def test_context_parallel_refuses_clipping():
    from fastweights.distributed.context_parallel import _ttt_op

    x = inputs(1, 4, 2, 3, seed=0)
    with pytest.raises(ValueError, match="max_update_norm=1.0 is not supported under context parallelism"):
        _ttt_op(None, x["z"], x["s"], x["w0"], x["conv"], None, 1.0, 2, position_ids=torch.arange(4)[None],
                max_update_norm=1.0)


def test_a_cache_made_under_another_tau_is_refused():
    from fastweights.models import InPlaceTTTCache, convert

    model = convert(tiny_model("qwen3"), layers=[0], chunk_size=4, max_update_norm=1.0).eval()
    cache = InPlaceTTTCache(model.config)
    model.config.ttt_max_update_norm = 2.0
    with pytest.raises(FastWeightsError, match=r"ttt_max_update_norm 1\.0 \(the model: 2\.0\)"), torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fast_path_with_clipping_matches_the_cpu_reference_form(dtype):
    """The CUDA fast path with τ (half the chunks clipped) against the chunked form in float64 on
    the CPU, forward and every gradient; packed documents, N % C != 0, odd widths."""
    B, N, d, f, C = 2, 1001, 96, 333, 128
    x = inputs(B, N, d, f, seed=5, lr=1.0)
    x["w0"] = x["w0"] * f**-0.5
    x["z"] = x["z"] * 0.2
    pos = torch.tensor([list(range(600)) + list(range(401)), list(range(1001))])
    srt = chunk_norms(x, C, pos).sort().values
    tau = float(srt[len(srt) // 2 - 1: len(srt) // 2 + 1].mean())
    gen = torch.Generator().manual_seed(9)
    go = torch.randn(B, N, d, generator=gen, dtype=F64)

    def run(fn, device, dt):
        leaves = {k: t.detach().to(device, dt if k != "lr" or dt == F64 else torch.float32).clone().requires_grad_(True)
                  for k, t in x.items()}
        o = fn(leaves["z"], leaves["s"], leaves["w0"], leaves["conv"], leaves["proj"], leaves["lr"], C,
               position_ids=pos.to(device), max_update_norm=tau)
        (o.double() * go.to(device)).sum().backward()
        return [o.detach().cpu().double()] + [leaves[k].grad.cpu().double() for k in x]

    ref = run(inplace_ttt_chunked, "cpu", F64)
    out = run(inplace_ttt_fast, "cuda", dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for name, a, b in zip(["o", *x], out, ref, strict=True):
        assert ((a - b).norm() / b.norm()).item() < tol, name


def test_a_negative_or_zero_learned_rate():
    """The factor divided by η: a negative η flipped the clipped update's sign in the chunked and
    fast forms (0.46 off the reference), and η = 0 gave η a NaN gradient (0 · inf)."""
    x = inputs(1, 11, 4, 6, seed=7)
    tau = float(chunk_norms(x, 4, None).min()) * 0.5
    for lr in (-0.7, 0.0):
        grads = []
        for impl in ("reference", "chunked", "fast"):
            rate = torch.tensor(lr, dtype=F64, requires_grad=True)
            o = inplace_ttt(x["z"], x["s"], x["w0"], x["conv"], x["proj"], rate, 4, impl=impl, max_update_norm=tau)
            (o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum().backward()
            grads.append((o.detach(), rate.grad))
        for o, g in grads[1:]:
            assert (o - grads[0][0]).abs().max() < 1e-10 and torch.isfinite(g), lr
            assert abs(float(g - grads[0][1])) < 1e-9 * (1 + abs(float(grads[0][1]))), lr


@pytest.mark.parametrize("impl", ["reference", "chunked", "fast"])
def test_empty_batches_and_sequences_with_tau(impl):
    for B, N in ((0, 5), (2, 0)):
        x = inputs(B, N, 2, 3, seed=0)
        o = inplace_ttt(x["z"], x["s"], x["w0"], x["conv"], None, 1.0, 2, impl=impl, max_update_norm=1.0)
        assert o.shape == (B, N, 2)
