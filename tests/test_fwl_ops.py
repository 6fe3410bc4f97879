"""FWL op: the parallel linear-attention form against explicit per-token gradient steps."""

import re

import pytest
import torch

from fastweights.ops.fwl import (
    FWLParams,
    FWLState,
    causal_linear_attention,
    causal_sum,
    fwl_chunked,
    fwl_reference,
)

DT = torch.float64


def rel(a, b):
    return ((a - b).norm() / (b.norm() + 1e-12)).item()


def make(B, N, d, s, V, seed=0, bias=True, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    f = 4 * s

    def r(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g, dtype=DT) * scale + shift)
        return t.requires_grad_(requires_grad)

    p = FWLParams(r(f, d, scale=0.5), r(f, scale=0.1), r(s, f, scale=0.3), r(s, scale=0.1),
                  r(s, scale=0.1, shift=1.0), r(s, scale=0.1))
    eta = torch.tensor([0.1, 0.2, 0.05, 0.1, 0.3, 0.2], dtype=DT).requires_grad_(requires_grad)
    h = r(B, N, d)
    E = r(V, s)
    eb = r(V, scale=0.1) if bias else None
    y = torch.randint(0, V, (B, N), generator=g)
    y[:, -1] = -100
    y[0, N // 3] = -100  # a token without target in the middle
    return h, y, p, eta, E, eb


@pytest.mark.parametrize("block", [1, 4, 64], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_and_state_match_reference(block, bias):
    h, y, p, eta, E, eb = make(2, 13, 7, 5, 11, seed=block, bias=bias)
    ref, ref_state = fwl_reference(h, y, p, eta, E, eb)
    out, state = fwl_chunked(h, y, p, eta, E, eb, block_size=block)
    assert rel(out, ref) < 1e-12
    for a, b in zip(state, ref_state, strict=True):
        assert rel(a, b) < 1e-12
    # the fast weights matter: the result differs from the plain block
    zero, _ = fwl_chunked(h, y, p, torch.zeros_like(eta), E, eb, block_size=block)
    assert rel(out, zero) > 1e-3


def test_residual_variant_matches_reference():
    h, y, p, eta, E, eb = make(2, 12, 6, 6, 11, seed=9, requires_grad=True)
    ref, _ = fwl_reference(h, y, p, eta, E, eb, residual=True)
    out, _ = fwl_chunked(h, y, p, eta, E, eb, block_size=5, residual=True)
    assert rel(out, ref) < 1e-12
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), [h, *p, eta]),
                    torch.autograd.grad((ref * w).sum(), [h, *p, eta]), strict=True):
        assert rel(a, b) < 1e-10
    plain, _ = fwl_chunked(h, y, p, eta, E, eb, block_size=5)
    assert rel(out, plain) > 1e-2
    with pytest.raises(ValueError, match="residual"):
        fwl_chunked(*make(1, 4, 7, 5, 11)[:5], residual=True)


def test_gradients_match_reference_second_order():
    h, y, p, eta, E, eb = make(2, 11, 6, 3, 9, seed=3, requires_grad=True)
    leaves = [h, *p, eta, E, eb]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]]).expand(2, 11)
    w = torch.randn(2, 11, 9, dtype=DT)

    def grads(fn, **kw):
        out, state = fn(h, y, p, eta, E, eb, position_ids=pos, **kw)
        loss = (out * w).sum() + sum((t * t).sum() for t in state)
        return torch.autograd.grad(loss, leaves)

    ref = grads(fwl_reference)
    got = grads(fwl_chunked, block_size=4)
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < 1e-10
    assert ref[-3].abs().min() > 0  # every step size receives a gradient


def test_inner_gradient_is_differentiated(monkeypatch):
    """Detaching the slow-pass gradients changes the outer gradient: training is second order."""
    import fastweights.ops.fwl as op

    h, y, p, eta, E, eb = make(1, 9, 5, 3, 7, seed=4, requires_grad=True)
    out, _ = op.fwl_chunked(h, y, p, eta, E, eb)
    g_full = torch.autograd.grad(out.square().sum(), p.w1)[0]
    orig = op.fwl_slow_pass
    def detached(*a, **k):
        return {n: t.detach() for n, t in orig(*a, **k).items()}

    monkeypatch.setattr(op, "fwl_slow_pass", detached)
    out_d, _ = op.fwl_chunked(h, y, p, eta, E, eb)
    assert torch.allclose(out_d, out)
    g_det = torch.autograd.grad(out_d.square().sum(), p.w1)[0]
    assert rel(g_det, g_full) > 1e-4


@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_packed_equals_one_by_one(how):
    lens = [5, 1, 9, 4]
    N = sum(lens)
    h, y, p, eta, E, eb = make(1, N, 6, 5, 10, seed=5)
    kw = ({"cu_seqlens": torch.tensor([0, 5, 6, 15, 19])} if how == "cu_seqlens"
          else {"position_ids": torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)})
    packed, state = fwl_chunked(h, y, p, eta, E, eb, block_size=4, **kw)
    lo = 0
    for n in lens:
        alone, st = fwl_chunked(h[:, lo:lo + n], y[:, lo:lo + n], p, eta, E, eb, block_size=4)
        assert rel(packed[:, lo:lo + n], alone) < 1e-12
        lo += n
    for a, b in zip(state, st, strict=True):  # the final state is the last document's alone
        assert rel(a, b) < 1e-12


def test_state_continues_a_document():
    h, y, p, eta, E, eb = make(2, 17, 6, 5, 10, seed=6)
    full, full_state = fwl_chunked(h, y, p, eta, E, eb, block_size=3)
    pos = torch.arange(17).expand(2, 17)
    out1, st = fwl_chunked(h[:, :7], y[:, :7], p, eta, E, eb, block_size=3)
    out2, st2 = fwl_chunked(h[:, 7:], y[:, 7:], p, eta, E, eb, position_ids=pos[:, 7:], state=st,
                            block_size=3)
    ref2, _ = fwl_reference(h[:, 7:], y[:, 7:], p, eta, E, eb, position_ids=pos[:, 7:], state=st)
    assert rel(torch.cat([out1, out2], 1), full) < 1e-12
    assert rel(out2, ref2) < 1e-12
    for a, b in zip(st2, full_state, strict=True):
        assert rel(a, b) < 1e-12


def test_linear_attention_matches_loop():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 10, 3, generator=g, dtype=DT) for _ in range(3))
    doc = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    s0 = torch.randn(2, 3, 3, generator=g, dtype=DT)
    out, S = causal_linear_attention(q, k, v, doc, s0, block_size=3)
    for b in range(2):
        St = s0[b] if doc[b, 0] == 0 else torch.zeros(3, 3, dtype=DT)
        for t in range(10):
            if t and doc[b, t] != doc[b, t - 1]:
                St = torch.zeros(3, 3, dtype=DT)
            assert rel(out[b, t], St @ q[b, t]) < 1e-12
            St = St + torch.outer(v[b, t], k[b, t])
        assert rel(S[b], St) < 1e-12


def test_causal_sum_matches_linear_attention_with_unit_keys():
    g = torch.Generator().manual_seed(8)
    v = torch.randn(2, 11, 4, generator=g, dtype=DT)
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])
    s0 = torch.randn(2, 4, generator=g, dtype=DT)
    ones = torch.ones(2, 11, 1, dtype=DT)
    ref, ref_s = causal_linear_attention(ones, ones, v, doc, s0.unsqueeze(-1), block_size=3)
    for block in (1, 3, 4, 20):
        out, S = causal_sum(v, doc, s0, block_size=block)
        assert rel(out, ref) < 1e-12 and rel(S, ref_s.squeeze(-1)) < 1e-12


def test_grad_scale_scales_each_token_loss():
    """grad_scale c: the reference differentiates c·ℓ_s; the parallel form agrees (forward, state,
    every gradient), and equals step sizes multiplied by c."""
    h, y, p, eta, E, eb = make(2, 13, 7, 5, 11, seed=11, requires_grad=True)
    c = 0.37
    out, st = fwl_chunked(h, y, p, eta, E, eb, block_size=4, grad_scale=c)
    ref, ref_st = fwl_reference(h, y, p, eta, E, eb, grad_scale=c)
    assert rel(out, ref) < 1e-12
    plain, plain_st = fwl_chunked(h, y, p, eta * c, E, eb, block_size=4)
    assert rel(out, plain) < 1e-12
    for a, b, u in zip(st, ref_st, plain_st, strict=True):
        assert rel(a, b) < 1e-12 and rel(a, c * u) < 1e-12
    w = torch.randn_like(out)
    leaves = [h, *p, eta, E, eb]
    for a, b in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves),
                    strict=True):
        assert rel(a, b) < 1e-10
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="grad_scale"):
            fwl_chunked(h, y, p, eta, E, eb, grad_scale=bad)


def test_default_fast_update_starts_as_a_small_perturbation():
    """At the defaults (step sizes 0.01, grad_scale 1/8192, i.e. the reference code's batch-mean
    inner loss) the fast update moves the logits of a 1024-token row by a few percent. With the
    plain sum of token losses (grad_scale 1) it moved them by more than their own norm at init,
    which swamped the slow block: the SPEC block then trained far worse than the model without it."""
    from fastweights.layers.fwl import FastWeightLayer

    g = torch.Generator().manual_seed(12)
    d, V, N = 96, 512, 1024
    # body outputs like a final RMSNorm's (unit RMS, a shared direction), unembedding rows of norm ~1
    h = torch.nn.functional.rms_norm(torch.randn(1, N, d, generator=g) + 2 * torch.randn(1, 1, d, generator=g), (d,))
    E = torch.randn(V, d, generator=g) * 0.1
    y = torch.randint(0, V, (1, N), generator=g)

    def moved(layer):
        with torch.no_grad():
            fast, _ = layer(h, y, E)
            slow, _ = fwl_chunked(h, y, layer.params(), torch.zeros(6), E)
        return rel(fast, slow)

    torch.manual_seed(0)
    assert moved(FastWeightLayer(d)) < 0.05
    torch.manual_seed(0)
    assert moved(FastWeightLayer(d, grad_scale=1.0)) > 0.5


def test_bad_inputs_raise():
    h, y, p, eta, E, eb = make(1, 4, 6, 5, 10)
    with pytest.raises(ValueError, match="w2"):
        fwl_chunked(h, y, p._replace(w2=p.w2[:, :3]), eta, E, eb)
    with pytest.raises(ValueError, match="targets"):
        fwl_chunked(h, y[:, :2], p, eta, E, eb)
    with pytest.raises(ValueError, match="step_sizes"):
        fwl_chunked(h, y, p, eta[:2], E, eb)
    st = FWLState(*(torch.zeros(1, *t.shape, dtype=DT) for t in p))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fwl_chunked(h, y, p, eta, E, eb, state=st, cu_seqlens=torch.tensor([0, 4]))
    for fn in (fwl_chunked, fwl_reference):  # both refuse ids outside [0, V) but -100, and other devices
        for bad in (-1, 10):
            with pytest.raises(ValueError, match=rf"targets must be token ids in \[0, 10\) or -100 .*got \[{bad}\]"):
                fn(h, torch.where(torch.arange(4) == 2, bad, y), p, eta, E, eb)
        with pytest.raises(ValueError, match="inputs must lie on one device, .*unembed_weight on meta"):
            fn(h, y, p, eta, E.to("meta"), eb)


def test_an_empty_batch_gives_empty_logits_and_state():
    """B = 0: the reference (once a raw error from stack) and the parallel form give logits and
    states of one row's shapes with no rows."""
    h, y, p, eta, E, eb = make(1, 5, 7, 5, 11)
    want, want_state = fwl_reference(h, y, p, eta, E, eb)
    for fn in (fwl_reference, fwl_chunked):
        out, state = fn(h[:0], y[:0], p, eta, E, eb)
        assert out.shape == (0, *want.shape[1:]) and out.dtype == want.dtype
        for a, b in zip(state, want_state, strict=True):
            assert a.shape == (0, *b.shape[1:]) and a.dtype == b.dtype


@pytest.mark.parametrize("step_size", ["0.1", True, None, float("nan"), float("inf")])
def test_layer_names_a_step_size_that_is_not_a_finite_number(step_size):
    """step_size="0.1" failed with a raw TypeError (must be real number, not str)."""
    from fastweights.layers.fwl import FastWeightLayer

    with pytest.raises(ValueError, match=re.escape(f"step_size must be a finite number, got {step_size!r}")):
        FastWeightLayer(4, step_size=step_size)
    for good in (-0.5, 0, 0.25, torch.tensor(0.25)):  # any sign; a 1-element tensor, as before
        layer = FastWeightLayer(4, step_size=good)
        assert layer.step_size_init == float(good) and bool((layer.step_sizes.detach() == float(good)).all())
