"""LaCT op: hand gradients vs autograd, training form vs reference (forward and every
gradient), packed vs one by one, streaming vs full."""

import pytest
import torch

from fastweights.ops.lact import (
    lact_chunked,
    lact_inner_grads,
    lact_reference,
    newton_schulz5,
    swiglu_fast,
)


def rel(a, b, floor=1e-12):
    return float((a - b).detach().norm() / (b.detach().norm() + floor))


NAMES = ["q", "k", "v", "lr", "beta", "w1", "w2", "w3"]  # the inputs of lact_reference, in order


def assert_grads_match(got, want, inputs, unread=()):
    """Each gradient within 1e-9 of the reference's and not zero, except those ``unread``
    (names of :data:`NAMES`), zero on both sides."""
    for name, a, b, x in zip(NAMES, got, want, inputs, strict=True):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        if name in unread:
            assert float(a.norm()) == 0 and float(b.norm()) == 0, name
            continue
        assert float(b.norm()) > 0, name  # the gradient is really exercised
        assert rel(a, b) < 1e-9, name


def make(B=2, H=2, N=29, D=6, Dh=10, D2=None, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    D2 = D if D2 is None else D2

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_(grad)

    q, k = r(B, H, N, D), r(B, H, N, D)
    v = r(B, H, N, D2)
    lr = (torch.rand(B, H, N, 3, generator=g, dtype=dtype) * 0.3).requires_grad_(grad)
    beta = torch.rand(B, H, N, generator=g, dtype=dtype).requires_grad_(grad)
    w1, w3 = r(H, Dh, D, scale=D**-0.5), r(H, Dh, D, scale=D**-0.5)
    w2 = r(H, D2, Dh, scale=Dh**-0.5)
    return q, k, v, lr, beta, w1, w2, w3


def test_hand_gradients_equal_autograd():
    torch.manual_seed(1)
    w1, w3 = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    w2 = torch.randn(3, 9, 7, dtype=torch.float64)
    k, v = torch.randn(3, 11, 5, dtype=torch.float64), torch.randn(3, 11, 9, dtype=torch.float64)
    lr = torch.rand(3, 11, 3, dtype=torch.float64)
    hand = lact_inner_grads(w1, w2, w3, k, v, lr)
    for m in range(3):
        ws = [w.clone().requires_grad_(True) for w in (w1, w2, w3)]
        loss = -(lr[..., m] * (swiglu_fast(*ws, k) * v).sum(-1)).sum()
        (auto,) = torch.autograd.grad(loss, ws[m])
        assert rel(hand[m], auto) < 1e-12, m


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    m = torch.randn(4, 12, 12, dtype=torch.float64)
    x = newton_schulz5(m)
    sv = torch.linalg.svdvals(x)
    # Muon's quintic pushes singular values into roughly [0.7, 1.2], not exactly 1
    assert float(sv.min()) > 0.5 and float(sv.max()) < 1.3
    # scale invariance from the Frobenius normalisation (up to its eps=1e-7 against ‖m‖_F≈12)
    assert rel(newton_schulz5(m * 37.0), x) < 1e-6
    wide = torch.randn(12, 5, dtype=torch.float64)
    assert newton_schulz5(wide).shape == (12, 5)



@pytest.mark.parametrize("shape", [(3, 7, 11), (2, 2, 9, 5), (4, 6, 6)])
def test_newton_schulz_manual_backward_matches_autograd(shape):
    """The hand-derived backward of the iterations (symmetric A and B) equals autograd's,
    float64, square, tall and wide matrices of odd sizes, on fresh random inputs."""
    m = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    go = torch.randn(*shape, dtype=torch.float64)
    ref = newton_schulz5(m)
    (g_ref,) = torch.autograd.grad(ref, m, go)
    out = newton_schulz5(m, manual_backward=True)
    (g_out,) = torch.autograd.grad(out, m, go)
    assert rel(out, ref) < 1e-14
    assert rel(g_out, g_ref) < 1e-10
    assert float(g_ref.abs().max()) > 0  # the comparison is not between zeros

CASES = [
    ("gd", "apply_update", 8),
    ("momentum", "apply_update", 8),
    ("muon", "apply_update", 8),
    ("muon", "update_apply", 7),
    ("momentum", "update_apply", 5),
    ("gd", "apply_update", 29),  # one chunk = the whole sequence
    ("muon", "apply_update", 40),  # chunk longer than the sequence
]


@pytest.mark.parametrize("update,order,C", CASES, ids=[f"{u}-{o}-C{c}" for u, o, c in CASES])
def test_chunked_matches_reference_fwd_and_grads(update, order, C):
    inputs = make(N=29, D=6, Dh=10, D2=7, seed=3)
    pos = torch.tensor([list(range(13)) + list(range(16)), list(range(5)) + list(range(24))])
    kw = dict(chunk_size=C, update=update, order=order, position_ids=pos)
    ref = lact_reference(*inputs, **kw)
    out = lact_chunked(*inputs, **kw)
    assert rel(out, ref) < 1e-10
    go = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, inputs, go, allow_unused=True)
    gc = torch.autograd.grad(out, inputs, go, allow_unused=True)
    # with one chunk per document and apply-then-update, no update is ever read
    unread = {"k", "v", "lr", "beta"} if (C >= 16 and order == "apply_update") else set()
    if update == "gd":
        unread.add("beta")
    assert_grads_match(gc, gr, inputs, unread)


def test_updates_change_outputs():
    """With several chunks the output must depend on earlier chunks' keys (the state is used)."""
    q, k, v, lr, beta, w1, w2, w3 = make(B=1, H=1, N=24, grad=False)
    base = lact_chunked(q, k, v, lr, beta, w1, w2, w3, chunk_size=8, update="muon")
    k2 = k.clone()
    k2[:, :, :8] += 1.0
    moved = lact_chunked(q, k2, v, lr, beta, w1, w2, w3, chunk_size=8, update="muon")
    assert rel(moved[:, :, :8], base[:, :, :8]) < 1e-14  # chunk 0 reads the initial weights
    assert rel(moved[:, :, 8:], base[:, :, 8:]) > 1e-3


def test_row_norms_preserved():
    """After every update each row keeps its initial norm: stream and look at the state."""
    q, k, v, lr, beta, w1, w2, w3 = make(B=1, H=2, N=16, grad=False)
    lr = lr * 10
    _, st = lact_chunked(q, k, v, lr, beta, w1, w2, w3, chunk_size=4, update="momentum",
                         output_final_state=True)
    for w, w0 in ((st.w1, w1), (st.w2, w2), (st.w3, w3)):
        assert rel(w.norm(dim=-1), w0.norm(dim=-1).expand_as(w.norm(dim=-1))) < 1e-5
        assert rel(w, w0.expand_as(w)) > 1e-2  # and the weights did move


@pytest.mark.parametrize("use_cu", [False, True])
@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_packed_equals_one_by_one(update, use_cu):
    lens = [5, 11, 1, 9]
    N = sum(lens)
    inputs = make(B=1, N=N, D=5, Dh=8, seed=7, grad=False)
    if use_cu:
        cu = torch.tensor([0, 5, 16, 17, 26])
        packed = lact_chunked(*inputs, chunk_size=4, update=update, cu_seqlens=cu)
    else:
        pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
        packed = lact_chunked(*inputs, chunk_size=4, update=update, position_ids=pos)
    lo = 0
    for n in lens:
        piece = [t[:, :, lo:lo + n] for t in inputs[:5]] + list(inputs[5:])
        alone = lact_reference(*piece, chunk_size=4, update=update)
        assert rel(packed[:, :, lo:lo + n], alone) < 1e-10
        lo += n


@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_streaming_equals_full(update):
    """Pieces of awkward lengths with the state carried equal the full pass (decoding's semantics),
    including a row that starts a new document mid-stream."""
    inputs = make(B=2, N=31, D=6, Dh=6, seed=11, grad=False)
    C = 6
    pos = torch.stack([torch.arange(31), torch.cat([torch.arange(17), torch.arange(14)])])
    full = lact_reference(*inputs, chunk_size=C, update=update, position_ids=pos)
    state, outs, lo = None, [], 0
    for n in [4, 1, 1, 9, 1, 2, 6, 7]:
        piece = [t[:, :, lo:lo + n] for t in inputs[:5]] + list(inputs[5:])
        o, state = lact_chunked(*piece, chunk_size=C, update=update, position_ids=pos[:, lo:lo + n],
                                state=state, output_final_state=True)
        outs.append(o)
        lo += n
    assert lo == 31
    assert rel(torch.cat(outs, 2), full) < 1e-10


@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_bf16_matmuls_float32_state_close_to_reference(update):
    """bf16 inputs and matmuls with a float32 state against the float32 reference. Muon's
    update forgets the gradient's scale, so its dynamics amplify any perturbation: there the
    bound is relative to what rounding the inputs alone to bf16 does to the reference."""
    inputs32 = make(B=1, H=2, N=100, D=8, Dh=8, dtype=torch.float32, seed=5, grad=False)
    ref = lact_reference(*inputs32, chunk_size=24, update=update)
    low = [t.bfloat16() for t in inputs32[:5]]
    out = lact_chunked(*low, *inputs32[5:], chunk_size=24, update=update)
    assert out.dtype == torch.bfloat16
    if update == "muon":
        rounded = lact_reference(*(t.float() for t in low), *inputs32[5:], chunk_size=24, update=update)
        assert rel(out.float(), ref) < 3 * rel(rounded, ref)
    else:
        assert rel(out.float(), ref) < 3e-2


def test_bad_inputs_raise():
    q, k, v, lr, beta, w1, w2, w3 = make(grad=False)
    with pytest.raises(ValueError, match="update"):
        lact_chunked(q, k, v, lr, beta, w1, w2, w3, chunk_size=4, update="adam")
    with pytest.raises(ValueError, match="beta"):
        lact_chunked(q, k, v, lr, None, w1, w2, w3, chunk_size=4, update="momentum")
    with pytest.raises(ValueError, match="chunk_size"):
        lact_reference(q, k, v, lr, beta, w1, w2, w3, chunk_size=0)
    with pytest.raises(ValueError, match="lr"):
        lact_chunked(q, k, v, lr[..., :2], beta, w1, w2, w3, chunk_size=4)
    with pytest.raises(ValueError, match="causal"):
        lact_chunked(q, k, v, lr, beta, w1, w2, w3, chunk_size=4, order="update_apply",
                     output_final_state=True)
    for fn in (lact_chunked, lact_reference):
        with pytest.raises(ValueError, match="q, k and v must share a dtype, got torch.float32, torch.float64"):
            fn(q.float(), k, v, lr, beta, w1, w2, w3, chunk_size=4)
        with pytest.raises(ValueError, match="inputs must be floating point, got q torch.int64, k torch.int64, v"):
            fn(q.long(), k.long(), v.long(), lr, beta, w1, w2, w3, chunk_size=4)
        with pytest.raises(ValueError, match="inputs must lie on one device, .*w1 on meta"):
            fn(q, k, v, lr, beta, w1.to("meta"), w2, w3, chunk_size=4)


@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_a_state_from_another_call_is_refused(update):
    """A streaming state continues only a call of its batch, heads, chunk and update."""
    q, k, v, lr, beta, w1, w2, w3 = make(grad=False)
    _, state = lact_chunked(q, k, v, lr, beta, w1, w2, w3, chunk_size=4, update=update, output_final_state=True)
    x = (q[:, :, :3], k[:, :, :3], v[:, :, :3], lr[:, :, :3], beta[:, :, :3], w1, w2, w3)
    with pytest.raises(ValueError, match=r"\(batch, heads, chunk_size\) = \(2, 2, 4\), this call has \(2, 2, 3\)"):
        lact_chunked(*x, chunk_size=3, update=update, state=state)
    with pytest.raises(ValueError, match=r"\(batch, heads, chunk_size\) = \(2, 2, 4\), this call has \(1, 2, 4\)"):
        lact_chunked(*(t[:1] if t.dim() == 4 or t is x[4] else t for t in x), chunk_size=4, update=update,
                     state=state)
    for other in {"gd", "momentum", "muon"} - {update}:  # momentum and muon states look alike: recorded
        with pytest.raises(ValueError, match=f"state was made with update='{update}', this call has update='{other}'"):
            lact_chunked(*x, chunk_size=4, update=other, state=state)
    assert state.select(torch.tensor([1, 0])).update == update


@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_an_empty_batch_gives_empty_outputs_and_states(update):
    """B = 0: the reference, the training form and streaming (a state out, then in) give the
    outputs and states of one row's shapes and dtypes with no rows (once raw errors from stack
    and max)."""
    one = make(B=1, N=7, D=6, Dh=10, D2=4, grad=False)
    empty = [t[:0] if i < 5 else t for i, t in enumerate(one)]
    want, want_state = lact_chunked(*one, chunk_size=3, update=update, output_final_state=True)
    for o in (lact_reference(*empty, chunk_size=3, update=update), lact_chunked(*empty, chunk_size=3, update=update)):
        assert o.shape == (0, *want.shape[1:]) and o.dtype == want.dtype
    o, state = lact_chunked(*empty, chunk_size=3, update=update, output_final_state=True)
    o2, state2 = lact_chunked(*empty, chunk_size=3, update=update, state=state, output_final_state=True)
    assert o.shape == o2.shape == (0, *want.shape[1:])
    for s in (state, state2):
        for name, t in vars(s).items():
            ref = getattr(want_state, name)
            if torch.is_tensor(ref):
                assert t.shape == (0, *ref.shape[1:]) and t.dtype == ref.dtype, name
            else:
                assert t == ref, name


@pytest.mark.parametrize("path", ["single", "packed", "streaming"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_learning_rates_wider_than_q_k_v(path, dtypes):
    """lr of a wider dtype than q, k, v (float32 lr with bf16 activations, float64 with float32):
    the training form reads them as the reference does, on the single-document, packed and
    streaming paths (once a raw 'expected scalar type' RuntimeError); lr's gradient keeps its
    dtype."""
    low, wide = dtypes
    q, k, v, lr, beta, w1, w2, w3 = make(B=2, N=29, dtype=torch.float32, seed=3, grad=False)
    x = [t.to(low) for t in (q, k, v)] + [lr.to(wide).requires_grad_(), beta, w1, w2, w3]
    pos = torch.stack([torch.arange(29), torch.cat([torch.arange(12), torch.arange(17)])])
    kw = dict(chunk_size=4, update="momentum", position_ids=pos if path != "single" else None)
    ref = lact_reference(*x, **kw)
    if path == "streaming":
        o1, state = lact_chunked(*[t[:, :, :10] if i < 5 else t for i, t in enumerate(x)], **{
            **kw, "position_ids": pos[:, :10]}, output_final_state=True)
        o2, _ = lact_chunked(*[t[:, :, 10:] if i < 5 else t for i, t in enumerate(x)], **{
            **kw, "position_ids": pos[:, 10:]}, state=state, output_final_state=True)
        out = torch.cat([o1, o2], 2)
    else:
        out = lact_chunked(*x, **kw)
    assert out.dtype == low
    assert rel(out.float(), ref.float()) < (2e-2 if low == torch.bfloat16 else 1e-5)
    (g,) = torch.autograd.grad(out.float().square().sum(), x[3])
    assert g.dtype == wide and float(g.norm()) > 0


def test_a_state_of_other_head_widths_or_type_and_bad_lanes_are_refused():
    """A state continues only calls of its head widths D, Dh, D2 (once a raw torch.cat error);
    a state that is not a LaCTState and lanes that are not LaCTLanes are named (once
    AttributeErrors)."""
    base = dict(B=1, N=7, D=4, Dh=5, D2=3, grad=False)
    _, state = lact_chunked(*make(**base), chunk_size=3, update="gd", output_final_state=True)
    for other, widths in ((dict(D=6), (6, 5, 3)), (dict(Dh=6), (4, 6, 3)), (dict(D2=6), (4, 5, 6))):
        with pytest.raises(ValueError, match=rf"head widths \(D, Dh, D2\) = \(4, 5, 3\), this call has "
                                             rf"\({widths[0]}, {widths[1]}, {widths[2]}\)"):
            lact_chunked(*make(**{**base, **other}), chunk_size=3, update="gd", state=state)
    x = make(**base)
    with pytest.raises(ValueError, match="state must be a LaCTState .* got tuple"):
        lact_chunked(*x, chunk_size=3, update="gd", state=tuple(vars(state).values()))
    with pytest.raises(ValueError, match="lanes must be a LaCTLanes .* got str"):
        lact_chunked(*x, chunk_size=3, update="gd", lanes="auto")


@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_no_heads_give_empty_outputs_on_every_path(update):
    """H = 0: the reference, the training form (one document per row, packed by position_ids or
    cu_seqlens, streaming with a state out and in) all give an empty (B, 0, N, D2) output, as
    the single-document training form did (once a raw error from stack or reshape)."""
    one = make(B=2, H=1, N=7, D=6, Dh=10, D2=4, grad=False)
    x = [t[:, :0] if i < 5 else t[:0] for i, t in enumerate(one)]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]])
    kw = dict(chunk_size=3, update=update)
    outs = [lact_reference(*x, **kw), lact_reference(*x, **kw, position_ids=pos), lact_chunked(*x, **kw),
            lact_chunked(*x, **kw, position_ids=pos),
            lact_chunked(*(t[:1] if i < 5 else t for i, t in enumerate(x)), **kw, cu_seqlens=torch.tensor([0, 3, 7]))]
    o, state = lact_chunked(*x, **kw, position_ids=pos, output_final_state=True)
    outs += [o, lact_chunked(*x, **kw, position_ids=pos, state=state)]
    for o in outs:
        assert o.shape[1:] == (0, 7, 4) and o.dtype == torch.float64
