"""Ba et al. fast weights: the matrix and attention forms agree, masks and baselines behave,
the associative-retrieval generator is correct (SPEC §4)."""

import re

import pytest
import torch

from fastweights.data.associative_retrieval import associative_retrieval, associative_retrieval_splits, decode
from fastweights.layers.fast_weights_rnn import IRNN, LSTM, AttentionLSTM, FastWeightsRNN
from fastweights.ops.hebbian import decay_weights, hebbian_read, hebbian_read_attention, hebbian_update


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_ops_forms_agree_float64():
    torch.manual_seed(0)
    B, R, T, eta, lam = 3, 7, 13, 0.5, 0.9
    hs = torch.randn(B, T, R, dtype=torch.float64)
    valid = torch.rand(B, T) > 0.3
    A = torch.zeros(B, R, R, dtype=torch.float64)
    H, c = hs[:, :0], torch.zeros(B, 0, dtype=torch.float64)
    for t in range(T):
        A = hebbian_update(A, hs[:, t], eta, lam, valid[:, t])
        H, c = hs[:, : t + 1], decay_weights(c, eta, lam, valid[:, t])
        q = torch.randn(B, R, dtype=torch.float64)
        assert rel_err(hebbian_read_attention(H, c, q), hebbian_read(A, q)) < 1e-12
    # Independent check of the closed form A(T) = η Σ_τ λ^{#valid after τ} h_τ h_τᵀ for row 0.
    ref = torch.zeros(R, R, dtype=torch.float64)
    for t in range(T):
        if valid[0, t]:
            ref = lam * ref + eta * torch.outer(hs[0, t], hs[0, t])
    assert rel_err(A[0], ref) < 1e-12


@pytest.mark.parametrize("steps", [1, 3])
def test_layer_matrix_and_attention_forms_agree(steps):
    torch.manual_seed(1)
    B, T, I, R = 2, 11, 5, 6  # T > R, so "auto" switches form mid-sequence
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    outs, grads = {}, {}
    for form in ("matrix", "attention", "auto"):
        torch.manual_seed(2)
        layer = FastWeightsRNN(I, R, eta=0.5, lam=0.9, inner_steps=steps, form=form).double()
        with torch.no_grad():
            layer.W.add_(0.3 * torch.randn(R, R, dtype=torch.float64))
        y, last = layer(x)
        (y.pow(2).sum() + last.sum()).backward()
        outs[form] = y
        grads[form] = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        x.grad = None
    for form in ("attention", "auto"):
        assert rel_err(outs[form], outs["matrix"]) < 1e-10
        for g, g_ref in zip(grads[form], grads["matrix"], strict=True):
            assert rel_err(g, g_ref) < 1e-10


def test_fast_weights_change_the_output_and_control_has_no_memory():
    torch.manual_seed(3)
    x = torch.randn(2, 9, 4)
    fw = FastWeightsRNN(4, 8, inner_steps=1)
    ctrl = FastWeightsRNN(4, 8, inner_steps=1, fast_weights=False)
    ctrl.load_state_dict(fw.state_dict())
    y_fw, _ = fw(x)
    y_ctrl, _ = ctrl(x)
    # Step 0 writes h = 0, so A(0) = 0 and both agree there; later the fast weights matter.
    assert torch.allclose(y_fw[:, 0], y_ctrl[:, 0])
    assert rel_err(y_fw[:, 1:], y_ctrl[:, 1:]) > 1e-3
    # With A ≡ 0 the inner loop is f(LN(z)) at every step: an LN-ReLU RNN.
    h = torch.zeros(2, 8)
    for t in range(9):
        h = torch.relu(ctrl.norm(h @ ctrl.W.t() + ctrl.C(x[:, t])))
        assert torch.allclose(y_ctrl[:, t], h, atol=1e-6)
    # ... whatever the number of inner steps S.
    ctrl3 = FastWeightsRNN(4, 8, inner_steps=3, fast_weights=False)
    ctrl3.load_state_dict(fw.state_dict())
    assert torch.allclose(ctrl3(x)[0], y_ctrl, atol=1e-6)


@pytest.mark.parametrize("cls", [FastWeightsRNN, IRNN, LSTM, AttentionLSTM])
def test_padded_batch_equals_sequences_one_at_a_time(cls):
    torch.manual_seed(4)
    I, R = 5, 7
    layer = cls(I, R).double()
    seqs = [torch.randn(L, I, dtype=torch.float64) for L in (6, 3, 9)]
    T = 10
    x = torch.zeros(2 * len(seqs), T, I, dtype=torch.float64)
    mask = torch.zeros(2 * len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):  # rows 0..2 right-padded, rows 3..5 left-padded
        x[i, : len(s)], mask[i, : len(s)] = s, True
        x[3 + i, T - len(s) :], mask[3 + i, T - len(s) :] = s, True
    x[~mask] = 100.0  # garbage in padding must not leak
    y, last = layer(x, mask)
    for i, s in enumerate(seqs):
        y1, last1 = layer(s.unsqueeze(0))
        assert rel_err(y[i, : len(s)], y1[0]) < 1e-10
        assert rel_err(y[3 + i, T - len(s) :], y1[0]) < 1e-10
        assert rel_err(last[i], last1[0]) < 1e-10 and rel_err(last[3 + i], last1[0]) < 1e-10


@pytest.mark.parametrize("cls", [FastWeightsRNN, IRNN, LSTM, AttentionLSTM])
def test_last_only_equals_last_of_full_outputs(cls):
    """``outputs=False`` returns (None, last) with the same last output and gradients, on
    left- and right-padded rows (the A-LSTM then reads out at the last real step only)."""
    torch.manual_seed(6)
    layer = cls(5, 7).double()
    x = torch.randn(4, 9, 5, dtype=torch.float64)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = mask[2, :4] = False
    mask[3, :2] = mask[3, 7:] = False
    results = []
    for outputs in (True, False):
        layer.zero_grad()
        ys, last = layer(x, mask, outputs=outputs)
        assert (ys is None) == (not outputs)
        (last * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum().backward()
        results.append([last.detach()] + [p.grad.clone() for p in layer.parameters()])
    for full, only in zip(*results, strict=True):
        assert rel_err(only, full) < 1e-12


def test_state_resets_between_calls():
    torch.manual_seed(5)
    layer = FastWeightsRNN(3, 5)
    a, b = torch.randn(1, 7, 3), torch.randn(1, 7, 3)
    y_a, _ = layer(a)
    layer(b)
    assert torch.equal(layer(a)[0], y_a)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="form"):
        FastWeightsRNN(3, 4, form="dense")
    layer = FastWeightsRNN(3, 4)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 5, 3), torch.ones(2, 5))
    for cls in (FastWeightsRNN, IRNN, LSTM, AttentionLSTM):  # an empty sequence is named, not a torch error
        with pytest.raises(ValueError, match=r"x must be \(B, T >= 1, 3\), got shape \(2, 0, 3\)"):
            cls(3, 4)(torch.randn(2, 0, 3))


@pytest.mark.parametrize("cls", [FastWeightsRNN, IRNN, LSTM, AttentionLSTM])
@pytest.mark.parametrize("sizes,match", [
    ((3, 0), "hidden_size must be an integer >= 1, got 0"),
    ((0, 4), "input_size must be an integer >= 1, got 0"),
    ((3, 4.0), "hidden_size must be an integer >= 1, got 4.0"),
])
def test_bad_sizes_raise(cls, sizes, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        cls(*sizes)


@pytest.mark.parametrize("kw,match", [
    ({"eta": float("nan")}, "eta must be a finite number >= 0, got nan"),
    ({"eta": -3.0}, "eta must be a finite number >= 0, got -3.0"),
    ({"inner_steps": True}, "inner_steps must be an integer >= 0, got True"),
])
def test_bad_fast_weight_settings_raise(kw, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        FastWeightsRNN(2, 3, **kw)


def test_associative_retrieval_answers_recomputed_from_strings():
    tokens, answers = associative_retrieval(500, num_pairs=4, seed=7)
    assert tokens.shape == (500, 11)
    for seq, ans in zip(tokens, answers, strict=True):
        s = decode(seq)
        m = re.fullmatch(r"((?:[a-z][0-9]){4})\?\?([a-z])", s)
        assert m, s
        pairs = m.group(1)
        keys = pairs[0::2]
        assert len(set(keys)) == 4  # distinct keys
        table = dict(zip(keys, pairs[1::2], strict=True))
        assert m.group(2) in table
        assert int(table[m.group(2)]) == int(ans)
    # values drawn with replacement: some sequence repeats a digit
    assert any(len(set(decode(s)[1:8:2])) < 4 for s in tokens)


def test_associative_retrieval_deterministic_and_split_sizes():
    a = associative_retrieval(50, 3, seed=1)
    b = associative_retrieval(50, 3, seed=1)
    c = associative_retrieval(50, 3, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    small = associative_retrieval_splits(0, sizes={"train": 40, "valid": 10, "test": 20})
    assert {k: len(v[0]) for k, v in small.items()} == {"train": 40, "valid": 10, "test": 20}
    assert not torch.equal(small["valid"][0][:10], small["test"][0][:10])
    full = associative_retrieval_splits(0)
    assert {k: len(v[0]) for k, v in full.items()} == {"train": 100_000, "valid": 10_000, "test": 20_000}
    # each split has its own seed: resizing train leaves valid and test unchanged
    other = associative_retrieval_splits(0, sizes={"train": 80, "valid": 10, "test": 20})
    assert torch.equal(other["valid"][0], small["valid"][0])
    assert torch.equal(other["test"][1], small["test"][1])


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [FastWeightsRNN, AttentionLSTM])
def test_layers_on_cuda_match_cpu_float64(cls, monkeypatch):
    """The attention-form read and the A-LSTM's last-step read-out on CUDA (float32) match the
    float64 CPU layer: last output and every parameter gradient, padded rows. cuDNN's LSTM runs
    TF32 by default (about 3e-4 off, measured on an H100); the test asks for true float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(7)
    ref = cls(5, 24).double()
    gpu = cls(5, 24).cuda()
    gpu.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(6, 11, 5, dtype=torch.float64)
    mask = torch.ones(6, 11, dtype=torch.bool)
    mask[1, 8:] = mask[2, :3] = False
    w = torch.linspace(-1, 1, 24, dtype=torch.float64)
    got = []
    for layer, xx, mm, ww in ((ref, x, mask, w), (gpu, x.float().cuda(), mask.cuda(), w.float().cuda())):
        _, last = layer(xx, mm, outputs=False)
        (last * ww).sum().backward()
        got.append([last.detach().cpu().double()] + [p.grad.cpu().double() for p in layer.parameters()])
    for g, r in zip(got[1], got[0], strict=True):
        assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("lam", ["0.9", True, None, torch.tensor([0.5, 0.5]), float("nan"), -0.1])
def test_lam_that_is_not_a_number_in_0_1_is_named(lam):
    """lam="0.9" failed with a raw TypeError ('<=' not supported between float and str)."""
    with pytest.raises(ValueError, match=re.escape(f"lam must be in [0, 1], got {lam!r}")):
        FastWeightsRNN(2, 3, lam=lam)
    for good in (0, 1, 0.9, torch.tensor(0.9, dtype=torch.float64)):  # a 1-element tensor, as before
        assert FastWeightsRNN(2, 3, lam=good).lam == float(good)
