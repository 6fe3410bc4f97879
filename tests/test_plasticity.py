"""Plastic Transformer (SPEC §5): update rules, forms, trainable plasticity, state resets,
KV-cache decoding and the task generators."""

import re

import numpy as np
import pytest
import torch

from fastweights.data.plasticity_tasks import DELIMITER, copy_task, digits_few_shot, regression_task
from fastweights.layers.plastic import PlasticLinear
from fastweights.models.plastic_transformer import PlasticConfig, PlasticTransformer
from fastweights.ops.hebbian import plastic_read_attention, plastic_update, plastic_update_attention


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def small_cfg(rule, form="attention", **kw):
    return PlasticConfig(input_size=6, output_size=4, rule=rule, d_model=12, d_ff=20, n_heads=2,
                         n_layers=2, max_len=16, form=form, **kw)


def test_plastic_ops_forms_agree_and_clip():
    torch.manual_seed(0)
    B, I, O, T = 3, 5, 7, 6
    alpha, beta = torch.randn(O, I, dtype=torch.float64), torch.randn(O, dtype=torch.float64)
    w, b = torch.zeros(B, O, I, dtype=torch.float64), torch.zeros(B, O, dtype=torch.float64)
    P, U = torch.zeros(B, 0, I, dtype=torch.float64), torch.zeros(B, 0, O, dtype=torch.float64)
    c, b2 = torch.zeros(B, 0, dtype=torch.float64), b.clone()
    for _ in range(T):
        p, u = torch.randn(B, I, dtype=torch.float64), 3 * torch.randn(B, O, dtype=torch.float64)
        eta = torch.rand(B, dtype=torch.float64) * 0.2
        w_prev, b_prev = w, b
        w, b = plastic_update(w, b, p, u, alpha, beta, eta, max_norm=1.0)
        P, U, c, b2 = plastic_update_attention(P, U, c, b2, p, u, alpha, beta, eta, max_norm=1.0)
        # The step's contribution η'δ has norm ≤ η·max_norm (clipping), with equality when it clips.
        delta = alpha * (u.unsqueeze(2) * p.unsqueeze(1))
        raw = (delta.flatten(1).pow(2).sum(1) + (beta * u).pow(2).sum(1)).sqrt()
        eta_eff = eta * torch.clamp(1.0 / raw, max=1.0)
        step = torch.cat([(w - (1 - eta_eff.view(-1, 1, 1)) * w_prev).flatten(1),
                          b - (1 - eta_eff.view(-1, 1)) * b_prev], 1).norm(dim=1)
        assert torch.allclose(step, eta * torch.clamp(raw, max=1.0), rtol=1e-10)
        x = torch.randn(B, I, dtype=torch.float64)
        read = plastic_read_attention(P, U, c, alpha, x)
        assert rel_err(read, torch.bmm(w, x.unsqueeze(2)).squeeze(2)) < 1e-10
        assert rel_err(b2, b) < 1e-12
    assert bool((raw > 1).any())  # the clip was exercised


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_model_matrix_and_attention_forms_agree(rule):
    batch = copy_task(3, seed=1, num_symbols=4, blanks=3)  # inputs (3, 14, 6)
    x = batch.inputs.double()
    res = {}
    for form in ("matrix", "attention"):
        torch.manual_seed(0)
        model = PlasticTransformer(small_cfg(rule, form)).double()
        with torch.no_grad():  # make plasticity strong enough to matter
            for blk in model.blocks:
                for lin in (blk.ffn.fc1, blk.ffn.fc2):
                    lin.alpha.normal_(0, 1.0)
                    lin.beta.normal_(0, 1.0)
        out = model(x)
        out.pow(2).sum().backward()
        res[form] = (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (o_m, g_m), (o_a, g_a) = res["matrix"], res["attention"]
    assert rel_err(o_a, o_m) < 1e-10
    assert set(g_m) <= set(g_a)
    for name, g in g_m.items():
        assert rel_err(g_a[name], g) < 1e-8, name


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_outer_loop_trains_every_plasticity_parameter(rule):
    torch.manual_seed(2)
    model = PlasticTransformer(small_cfg(rule))
    batch = copy_task(4, seed=3, num_symbols=4, blanks=2)
    out = model(batch.inputs)
    loss = torch.nn.functional.cross_entropy(out[batch.mask], batch.targets[batch.mask])
    loss.backward()
    plastic = [p for n, p in model.named_parameters() if n.endswith((".alpha", ".beta"))]
    assert len(plastic) == 4 * model.cfg.n_layers
    for p in plastic:
        assert p.grad is not None and p.grad.abs().sum() > 0
    eta_row = model.head.weight.grad[model.cfg.output_size]  # the η̃ output of the head
    assert eta_row.abs().sum() > 0 and model.head.bias.grad[model.cfg.output_size] != 0
    if rule == "gradient":
        assert model.W_int.weight.grad.abs().sum() > 0
        aux_rows = model.head.weight.grad[model.cfg.output_size + 1 :]  # only L_int reads y_aux
        assert (aux_rows.abs().sum(1) > 0).all()
    else:
        assert model.W_int is None


@pytest.mark.parametrize("rule", ["none", "hebbian", "gradient"])
def test_fast_state_resets_between_sequences(rule):
    torch.manual_seed(4)
    model = PlasticTransformer(small_cfg(rule))
    a = copy_task(1, seed=5, num_symbols=4, blanks=3).inputs
    b = copy_task(1, seed=6, num_symbols=4, blanks=3).inputs
    with torch.no_grad():
        y_a, state = model(a, return_state=True)
        model(b)
        assert torch.equal(model(a), y_a)  # nothing carried over from the previous call
        both = model(torch.cat([a, b]))
        assert torch.allclose(both[0], y_a[0], atol=1e-6)  # nothing shared across the batch
    fresh = model.init_state(1)
    assert all(lin[-1].abs().sum() == 0 and lin[0].numel() == 0 for f in fresh.fast for lin in f)
    if rule != "none":
        w = model.blocks[0].ffn.fc1.fast_weight(state.fast[0][0])
        assert w.abs().sum() > 0  # the sequence did write into the fast weights


def _parallel_reference(model, x):
    """The plain (non-plastic) Transformer run over the whole sequence at once with causal
    attention: what the KV-cache decoding of rule "none" must reproduce."""
    cfg = model.cfg
    B, T, _ = x.shape
    h = model.inp(x) + model.pos.weight[:T]
    for blk in model.blocks:
        q, k, v = blk.qkv(blk.ln1(h)).view(B, T, 3, cfg.n_heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + blk.proj(att.transpose(1, 2).reshape(B, T, -1))
        m = blk.ln2(h)
        h = h + blk.ffn.fc2.slow(torch.nn.functional.gelu(blk.ffn.fc1.slow(m)))
    return model.head(model.ln_f(h))[..., : cfg.output_size]


def test_kv_cache_decoding_equals_parallel_forward_and_plasticity_starts_at_zero():
    torch.manual_seed(7)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    none = PlasticTransformer(small_cfg("none")).double()
    with torch.no_grad():
        y = none(x)
        assert rel_err(y, _parallel_reference(none, x)) < 1e-10
        for rule in ("hebbian", "gradient"):
            plastic = PlasticTransformer(small_cfg(rule)).double()
            plastic.load_state_dict(none.state_dict(), strict=False)
            y_p = plastic(x)
            assert rel_err(y_p[:, 0], y[:, 0]) < 1e-12  # w(0) = 0: step 0 is the plain model
            assert rel_err(y_p[:, 1:], y[:, 1:]) > 1e-6  # later steps read the fast weights


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="rule"):
        small_cfg("oja")
    model = PlasticTransformer(small_cfg("hebbian"))
    with pytest.raises(ValueError, match="max_len=16: step 17"):
        model(torch.randn(1, 17, 6))
    with pytest.raises(ValueError, match=r"inputs must be \(B, T >= 1, 6\), got \(1, 4, 5\)"):
        model(torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match=r"inputs must be \(B, T >= 1, 6\), got \(1, 0, 6\)"):
        model(torch.randn(1, 0, 6))
    with pytest.raises(ValueError, match="x must be"):
        model.step(torch.randn(2, 5), model.init_state(2))
    with pytest.raises(ValueError, match="x has batch 3, the state 2"):
        model.step(torch.randn(3, 6), model.init_state(2))
    for kw, match in ((dict(n_heads=0), "n_heads must be an integer >= 1, got 0"),
                      (dict(d_model=0), "d_model must be an integer >= 1, got 0"),
                      (dict(n_layers=0), "n_layers must be an integer >= 1, got 0"),
                      (dict(eta0=-0.1), "eta0 must be a finite number >= 0, got -0.1")):
        with pytest.raises(ValueError, match=match):
            PlasticConfig(**{**vars(small_cfg("hebbian")), **kw})


def test_plastic_linear_bad_arguments_raise():
    with pytest.raises(ValueError, match="in_features must be an integer >= 1, got 0"):
        PlasticLinear(0, 4)
    with pytest.raises(ValueError, match="out_features must be an integer >= 1, got -2"):
        PlasticLinear(4, -2)
    with pytest.raises(ValueError, match="alpha_init must be a finite number, got 'x'"):
        PlasticLinear(4, 4, alpha_init="x")
    layer = PlasticLinear(4, 3, alpha_init=-1)  # an integer initial α is taken as a float
    assert layer.alpha.dtype == torch.float32 and bool((layer.alpha.detach() == -1.0).all())


def test_copy_generator():
    batch = copy_task(200, seed=0)
    assert batch.inputs.shape == (200, 31, 10)
    seq = batch.inputs.argmax(-1)
    assert torch.equal(batch.inputs.sum(-1), torch.ones(200, 31))  # one-hot
    tokens = seq[:, :5]
    assert ((tokens >= 1) & (tokens <= 8)).all()
    assert (seq[:, 5:25] == 0).all() and (seq[:, 25] == DELIMITER).all() and (seq[:, 26:] == 0).all()
    assert torch.equal(batch.mask[0], torch.arange(31) >= 26)
    assert torch.equal(batch.targets[:, 26:], tokens - 1)
    assert len(torch.unique(tokens)) == 8


def test_regression_generator_recovers_w():
    batch = regression_task(50, seed=1)
    assert batch.inputs.shape == (50, 20, 5)
    x, y_in, flag = batch.inputs[..., :3].double(), batch.inputs[..., 3].double(), batch.inputs[..., 4]
    assert (flag[:, :10] == 0).all() and (flag[:, 10:] == 1).all() and (y_in[:, 10:] == 0).all()
    for n in range(50):
        w_hat = torch.linalg.lstsq(x[n, :10], y_in[n, :10].unsqueeze(1)).solution
        assert torch.allclose((x[n, 10:] @ w_hat).squeeze(1), batch.targets[n, 10:].double(), atol=1e-4)
    assert torch.equal(batch.mask[0], torch.arange(20) >= 10)


def test_digits_generator_labels_match_classes():
    from sklearn.datasets import load_digits

    data = load_digits()
    cls_of = {}
    for img, c in zip((data.data / 16.0).astype(np.float32), data.target, strict=True):
        cls_of.setdefault(img.tobytes(), set()).add(int(c))
    pools = {}
    for split in ("train", "test"):
        batch = digits_few_shot(40, seed=2, split=split)
        assert batch.inputs.shape == (40, 10, 70)
        pools[split] = set()
        for e in range(40):
            inp = batch.inputs[e].numpy()
            label_class = {}
            for j in range(5):  # support steps: image, one-hot label, flag 0
                assert inp[j, 69] == 0 and inp[j, 64:69].sum() == 1
                (c,) = cls_of[inp[j, :64].tobytes()]
                label_class[int(inp[j, 64:69].argmax())] = c
                pools[split].add(inp[j, :64].tobytes())
            assert len(set(label_class.values())) == 5
            for j in range(5, 10):  # query steps: image, no label, flag 1
                assert inp[j, 69] == 1 and inp[j, 64:69].sum() == 0
                assert label_class[int(batch.targets[e, j])] in cls_of[inp[j, :64].tobytes()]
                assert not any(np.array_equal(inp[j, :64], inp[s, :64]) for s in range(5))
                pools[split].add(inp[j, :64].tobytes())
    assert not pools["train"] & pools["test"]  # disjoint image pools
    assert torch.equal(digits_few_shot(5, seed=9).inputs, digits_few_shot(5, seed=9).inputs)


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_frozen_model_gives_the_same_outputs(rule):
    """Evaluating with frozen parameters (requires_grad False) must not change the outputs: the
    gradient rule still differentiates L_int with respect to the q's."""
    torch.manual_seed(7)
    model = PlasticTransformer(small_cfg(rule)).double()
    x = copy_task(2, seed=8, num_symbols=4, blanks=3).inputs.double()
    with torch.no_grad():
        ref = model(x)
    model.requires_grad_(False)
    assert torch.equal(model(x), ref)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    if rule == "gradient":
        with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
            model(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_plastic_linear_refuses_a_non_finite_alpha_init(bad):
    """A NaN/inf α was accepted and turned the output into NaN after one update."""
    with pytest.raises(ValueError, match=re.escape(f"alpha_init must be a finite number, got {bad!r}")):
        PlasticLinear(3, 2, alpha_init=bad)
    layer = PlasticLinear(3, 2, alpha_init=0.5)
    assert bool((layer.alpha.detach() == 0.5).all()) and bool((layer.beta.detach() == 0.5).all())


@pytest.mark.parametrize("n_aux,match", [(-1, "n_aux must be an integer >= 0, got -1"),
                                         (2.0, "n_aux must be an integer >= 0, got 2.0"),
                                         (True, "n_aux must be an integer >= 0, got True")])
def test_plastic_config_refuses_a_bad_n_aux(n_aux, match):
    """n_aux=-1 was accepted, then the first step failed with an IndexError."""
    with pytest.raises(ValueError, match=re.escape(match)):
        PlasticConfig(3, 2, n_aux=n_aux)
    for good in (0, 3):  # no auxiliary outputs is fine: the head is [logits; η̃]
        model = PlasticTransformer(PlasticConfig(3, 2, d_model=8, d_ff=8, n_heads=2, n_layers=1, n_aux=good))
        assert model.d_out == 2 + 1 + good and model(torch.randn(1, 3, 3)).shape == (1, 3, 2)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), None])
def test_plastic_config_refuses_a_max_norm_that_is_not_positive(max_norm):
    """max_norm=0 scaled every plastic step to 0: the model silently equalled rule="none"."""
    with pytest.raises(ValueError, match=re.escape(f"max_norm must be a finite number > 0, got {max_norm!r}")):
        PlasticConfig(3, 2, max_norm=max_norm)
    assert PlasticConfig(3, 2, max_norm=0.5).max_norm == 0.5


@pytest.mark.parametrize("call,match", [
    (lambda: copy_task(3, num_symbols=0), "num_symbols must be an integer >= 1, got 0"),
    (lambda: copy_task(3, num_tokens=0), "num_tokens must be an integer >= 1, got 0"),
    (lambda: copy_task(3, num_tokens=2.0), "num_tokens must be an integer >= 1, got 2.0"),
    (lambda: copy_task(3, blanks=-1), "blanks must be an integer >= 0, got -1"),
    (lambda: copy_task(True), "n must be an integer >= 1, got True"),
    (lambda: regression_task(3, dim=0), "dim must be an integer >= 1, got 0"),
    (lambda: regression_task(3, support=0), "support must be an integer >= 1, got 0"),
    (lambda: regression_task(3, query=0), "query must be an integer >= 1, got 0"),
])
def test_task_generators_refuse_bad_sizes(call, match):
    """num_symbols=0 failed in numpy ("low >= high"); num_tokens=0 and dim=0 were accepted."""
    with pytest.raises(ValueError, match=re.escape(match)):
        call()
    batch = copy_task(2, num_tokens=1, num_symbols=1, blanks=0)  # the smallest copy task
    assert batch.inputs.shape == (2, 3, 3) and batch.targets[:, -1].tolist() == [0, 0]
    assert regression_task(2, dim=1, support=1, query=1).inputs.shape == (2, 2, 3)
