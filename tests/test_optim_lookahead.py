"""Lookahead and SLRLA against plain references (SPEC §6)."""

import copy
import re

import pytest
import torch

from fastweights.optim import (
    OPTIMIZERS,
    SLRLA,
    Lookahead,
    build_optimizer,
    load_state,
    save_state,
    stagewise_lr,
)


def _model(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5)).to(dtype)


def _batches(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(11, 7, generator=g, dtype=dtype), torch.randn(11, 5, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _train(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _groups(model, lr):
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return [{"params": first, "lr": lr}, {"params": second, "lr": lr * 0.37}]


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_k1_alpha1_is_the_inner_optimizer_exactly(inner):
    make = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1),
        "sgd": lambda p: torch.optim.SGD(p, lr=3e-2, momentum=0.9, nesterov=True),
    }[inner]
    ref, la = _model(), _model()
    opt_ref = make(_groups(ref, 1.0))
    opt_la = Lookahead(make(_groups(la, 1.0)), k=1, alpha=1.0)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=4, gamma=0.5)
    sched_la = torch.optim.lr_scheduler.StepLR(opt_la, step_size=4, gamma=0.5)
    batches = _batches(13)
    _train(ref, opt_ref, batches, sched_ref)
    _train(la, opt_la, batches, sched_la)
    for a, b in zip(ref.parameters(), la.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt_la.slow_param(b), b)
    assert opt_la.param_groups[1]["lr"] == opt_ref.param_groups[1]["lr"] == pytest.approx(0.37 * 0.5**3)


def test_slow_update_matches_hand_written_loop():
    k, alpha, lr, mu, steps = 3, 0.6, 0.05, 0.9, 10  # 10 steps: three syncs and one partial cycle
    model = _model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=lr, momentum=mu), k=k, alpha=alpha)
    batches = _batches(steps)
    _train(model, opt, batches)

    ref = _model()
    theta = [p.detach().clone() for p in ref.parameters()]
    phi = [t.clone() for t in theta]
    buf = [None] * len(theta)
    for t, (x, y) in enumerate(batches, start=1):
        with torch.no_grad():
            for p, v in zip(ref.parameters(), theta, strict=True):
                p.copy_(v)
        ref.zero_grad()
        grads = torch.autograd.grad(_loss(ref, x, y), list(ref.parameters()))
        for i, g in enumerate(grads):
            buf[i] = g.clone() if buf[i] is None else mu * buf[i] + g
            theta[i] = theta[i] - lr * buf[i]
        if t % k == 0:
            for i in range(len(theta)):
                phi[i] = phi[i] + alpha * (theta[i] - phi[i])
                theta[i] = phi[i].clone()
    for p, th, ph in zip(model.parameters(), theta, phi, strict=True):
        torch.testing.assert_close(p.detach(), th, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.slow_param(p), ph, rtol=1e-12, atol=1e-14)
    assert not torch.equal(theta[0], phi[0])  # mid-cycle: fast and slow weights differ


def test_slrla_regulariser_gradient_is_two_beta_theta_minus_phi():
    beta, lr = 0.3, 0.04
    model = _model()
    opt = SLRLA(torch.optim.SGD(model.parameters(), lr=lr), k=4, alpha=0.5, beta=beta)
    _train(model, opt, _batches(6))  # one sync and two more steps: θ ≠ φ
    params = list(model.parameters())
    phi = [opt.slow_param(p).clone() for p in params]
    assert all(not torch.equal(p, f) for p, f in zip(params, phi, strict=True))

    reg_grads = torch.autograd.grad(opt.regularizer(), params)
    for p, f, g in zip(params, phi, reg_grads, strict=True):
        torch.testing.assert_close(g, 2 * beta * (p.detach() - f), rtol=1e-12, atol=1e-14)

    # One SLRLA step with plain SGD is θ − lr ∇[loss + β‖θ − φ‖²], computed here by autograd.
    ((x, y),) = _batches(1, seed=9)
    before = [p.detach().clone() for p in params]
    full = _loss(model, x, y) + beta * sum(((p - f) ** 2).sum() for p, f in zip(params, phi, strict=True))
    expected = [b - lr * g for b, g in zip(before, torch.autograd.grad(full, params), strict=True)]
    opt.zero_grad()
    _loss(model, x, y).backward()
    loss_grads = [p.grad.clone() for p in params]
    opt.step()
    for p, e, lg in zip(params, expected, loss_grads, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
        assert torch.equal(p.grad, lg)  # the user's gradient is left untouched


def test_slrla_beta0_equals_lookahead_and_closure_returns_loss():
    a, b = _model(), _model()
    opt_a = Lookahead(torch.optim.AdamW(a.parameters(), lr=1e-2), k=3, alpha=0.7)
    opt_b = SLRLA(torch.optim.AdamW(b.parameters(), lr=1e-2), k=3, alpha=0.7, beta=0.0)
    for x, y in _batches(8):

        def closure(model=b, x=x, y=y):
            opt_b.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        opt_a.zero_grad()
        _loss(a, x, y).backward()
        opt_a.step()
        loss = opt_b.step(closure)
        assert torch.is_tensor(loss) and loss.ndim == 0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["lookahead_adamw", "slrla_sgd"])
def test_checkpoint_resume_is_exact(tmp_path, name):
    total, cut = 17, 7  # the cut falls inside a k = 5 cycle
    batches = _batches(total)

    def fresh():
        model = _model(dtype=torch.float32)
        opt = build_optimizer(
            name, _groups(model, 0.02), lr=0.02, weight_decay=0.01, k=5, alpha=0.6, beta=0.1
        )
        return model, opt, stagewise_lr(opt, total)

    batches = _batches(total, dtype=torch.float32)
    m1, o1, s1 = fresh()
    _train(m1, o1, batches, s1)

    m2, o2, s2 = fresh()
    _train(m2, o2, batches[:cut], s2)
    path = tmp_path / "opt.safetensors"
    save_state(path, {"optimizer": o2.state_dict(), "scheduler": s2.state_dict()})
    weights = {k: v.clone() for k, v in m2.state_dict().items()}

    m3, o3, s3 = fresh()
    m3.load_state_dict(weights)
    state = load_state(path)
    o3.load_state_dict(state["optimizer"])
    s3.load_state_dict(state["scheduler"])
    assert o3.fast_steps == cut
    _train(m3, o3, batches[cut:], s3)
    for p, q in zip(m1.parameters(), m3.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(o1.slow_param(p), o3.slow_param(q))
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o3.param_groups]


@pytest.mark.parametrize("name", ["lookahead_adamw", "slrla_sgd"])
def test_deepcopy_mid_training_continues_identically(name):
    """copy.deepcopy of a model with its optimiser (inside a k cycle) trains on exactly as the
    original does."""
    model = _model()
    opt = build_optimizer(name, model.parameters(), lr=0.05, k=4, alpha=0.5, beta=0.1)
    batches = _batches(11)
    _train(model, opt, batches[:6])
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.fast_steps == 6 and opt2.optimizer is not opt.optimizer
    _train(model, opt, batches[6:])
    _train(model2, opt2, batches[6:])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(opt.slow_param(p), opt2.slow_param(q))


def test_a_refused_state_dict_changes_nothing():
    """A shape mismatch raises before the inner optimiser's state is replaced."""
    model = _model()
    opt = build_optimizer("lookahead_adamw", model.parameters(), lr=0.05)
    _train(model, opt, _batches(3))
    before = copy.deepcopy(opt.optimizer.state_dict())
    other = _model()
    other[2] = torch.nn.Linear(13, 6).double()  # a bigger last layer
    bad = build_optimizer("lookahead_adamw", other.parameters(), lr=0.05)
    _train(other, bad, [(x, torch.cat([y, y[:, :1]], 1)) for x, y in _batches(3)])
    with pytest.raises(ValueError, match=r"slow weight 2 has shape \(6, 13\), parameter \(5, 13\)"):
        opt.load_state_dict(bad.state_dict())
    after = opt.optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in st.items())


def test_stagewise_lr_milestones():
    model = _model()
    opt = build_optimizer("slrla_sgd", model.parameters(), lr=1.0)
    sched = stagewise_lr(opt, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0] * 3 + [0.2] * 3 + [0.04] * 2 + [0.008] * 2)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.008)


@pytest.mark.parametrize("total,expected", [(1, [1.0]), (3, [1.0, 0.04, 0.008]), (2, [1.0, 0.008])])
def test_stagewise_lr_starts_at_the_base_rate_on_short_runs(total, expected):
    """A milestone that rounds to step 0 lowered the rate before the first step."""
    opt = build_optimizer("slrla_sgd", _model().parameters(), lr=1.0)
    sched = stagewise_lr(opt, total_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_slrla_takes_sparse_gradients_as_dense():
    """nn.Embedding(sparse=True): SLRLA's pull toward φ is dense, so its step is the dense one."""
    torch.manual_seed(0)
    sparse, dense = torch.nn.Embedding(7, 3, sparse=True).double(), torch.nn.Embedding(7, 3).double()
    dense.load_state_dict(sparse.state_dict())
    opts = [SLRLA(torch.optim.SGD(m.parameters(), lr=0.1), k=2, alpha=0.5, beta=0.3) for m in (sparse, dense)]
    for step in range(5):
        idx = torch.tensor([step % 7, (3 * step + 1) % 7])
        for m, opt in zip((sparse, dense), opts, strict=True):
            opt.zero_grad()
            (m(idx) ** 2).sum().backward()
            opt.step()
        assert sparse.weight.grad.is_sparse  # the user's gradient is left as it was
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-14, atol=1e-15)


def test_slow_weights_context_swaps_and_restores():
    model = _model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, alpha=0.5)
    _train(model, opt, _batches(2))
    fast = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(3, 7, dtype=torch.float64)
    with opt.slow_weights():
        for p in model.parameters():
            assert torch.equal(p, opt.slow_param(p))
        out_slow = model(x)
    for p, f in zip(model.parameters(), fast, strict=True):
        assert torch.equal(p, f)
    assert not torch.equal(out_slow, model(x))


def test_add_param_group_gets_slow_weights():
    model = _model()
    opt = Lookahead(torch.optim.SGD(model[0].parameters(), lr=0.1), k=2)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups is opt.optimizer.param_groups
    _train(model, opt, _batches(2))
    for p in model[2].parameters():
        assert torch.equal(opt.slow_param(p), p)  # synced after two steps


def test_bad_arguments():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", params, lr=1.0)
    with pytest.raises(ValueError, match="k must be"):
        Lookahead(torch.optim.SGD(params, lr=1.0), k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(torch.optim.SGD(params, lr=1.0), alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        SLRLA(torch.optim.SGD(params, lr=1.0), beta=-1.0)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got inf"):
        SLRLA(torch.optim.SGD(params, lr=1.0), beta=float("inf"))
    with pytest.raises(ValueError, match="missing key"):
        Lookahead(torch.optim.SGD(params, lr=1.0)).load_state_dict(
            torch.optim.SGD(params, lr=1.0).state_dict()
        )
    assert set(OPTIMIZERS) == {"adamw", "sgd", "lookahead_adamw", "slrla_adamw", "lookahead_sgd", "slrla_sgd"}
    assert type(build_optimizer("lookahead_sgd", params, lr=1.0)) is Lookahead


@pytest.mark.parametrize("gamma", [-0.2, 0.0, float("nan"), True])
def test_stagewise_lr_refuses_a_gamma_that_is_not_positive(gamma):
    opt = build_optimizer("slrla_sgd", _model().parameters(), lr=1.0)
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0"):
        stagewise_lr(opt, total_steps=10, gamma=gamma)


@pytest.mark.parametrize("alpha", ["x", "0.5", True, None, torch.tensor([0.5, 0.5])])
def test_lookahead_names_an_alpha_that_is_not_a_number(alpha):
    """alpha="x" said only "could not convert string to float"; alpha="0.5" was taken as 0.5."""
    params = list(_model().parameters())
    for cls in (Lookahead, SLRLA):
        with pytest.raises(ValueError, match=re.escape(f"alpha must be in (0, 1], got {alpha!r}")):
            cls(torch.optim.SGD(params, lr=1.0), alpha=alpha)
    with pytest.raises(ValueError, match=re.escape("beta must be a finite number >= 0, got 'x'")):
        SLRLA(torch.optim.SGD(params, lr=1.0), beta="x")
    for good in (1, 0.25, torch.tensor(0.25)):  # a 1-element tensor, as before
        assert Lookahead(torch.optim.SGD(params, lr=1.0), alpha=good).alpha == float(good)


@pytest.mark.parametrize("total", [2.5, 0, True, "10"])
def test_stagewise_lr_refuses_a_total_that_is_not_a_positive_integer(total):
    """total_steps=2.5 was accepted (milestones from fractions of a non-integer step count)."""
    opt = build_optimizer("slrla_sgd", _model().parameters(), lr=1.0)
    with pytest.raises(ValueError, match=re.escape(f"total_steps must be an integer >= 1, got {total!r}")):
        stagewise_lr(opt, total_steps=total)
    assert stagewise_lr(opt, total_steps=10).milestones == {3: 1, 6: 1, 8: 1}


@pytest.mark.parametrize("milestones", [("a",), 0.5, "0.5", (True,), (0.3, float("nan")), (0.6, 0.3), (0.5, 1.0)])
def test_stagewise_lr_names_milestones_that_are_not_increasing_fractions(milestones):
    """milestones=("a",) and milestones=0.5 raised raw TypeErrors from the comparison."""
    opt = build_optimizer("slrla_sgd", _model().parameters(), lr=1.0)
    with pytest.raises(ValueError, match=re.escape(
            f"milestones must be a sequence of increasing fractions in (0, 1), got {milestones!r}")):
        stagewise_lr(opt, total_steps=10, milestones=milestones)
    assert stagewise_lr(opt, total_steps=10, milestones=[0.5]).milestones == {5: 1}


@pytest.mark.parametrize("cls", [Lookahead, SLRLA])
def test_state_dict_hooks_run_as_in_torch(cls):
    """state_dict/load_state_dict are overridden, and skipped the hooks torch's Optimizer runs:
    pre hooks get the optimiser, a state_dict post hook and a load pre hook may return a
    replacement dict, a load post hook gets the optimiser."""
    model = _model()
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    sd = opt.state_dict()
    assert calls == [("pre", opt)] and sd["extra"] == 1

    def load_pre(o, sd):
        calls.append(("load_pre", o, sd.pop("extra")))
        fast = dict(sd["lookahead"], fast_steps=7)
        return {**sd, "lookahead": fast}

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o.fast_steps)))
    opt.load_state_dict(sd)
    assert calls[1:] == [("load_pre", opt, 1), ("load_post", 7)]
    assert opt.fast_steps == 7 and sd["extra"] == 1  # the caller's dict is not edited (shallow copy)


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_slrla_over_lbfgs_minimises_the_regularised_loss(line_search):
    """SLRLA over an optimiser that evaluates the closure itself (LBFGS) raised a raw TypeError;
    now every evaluation sees F(θ) = loss(θ) + β‖θ − φ‖² and its gradient, so one step equals
    LBFGS on F written out by hand (φ: the slow weights, the initial ones before any sync)."""
    x, y = next(iter(_batches(1)))
    a, b = _model(), _model()
    phi = [p.detach().clone() for p in b.parameters()]
    beta = 0.3
    opt_a = SLRLA(torch.optim.LBFGS(a.parameters(), lr=0.5, max_iter=6, line_search_fn=line_search),
                  k=10, beta=beta)
    opt_b = torch.optim.LBFGS(b.parameters(), lr=0.5, max_iter=6, line_search_fn=line_search)
    evaluations = []

    def closure_a():
        opt_a.zero_grad()
        loss = _loss(a, x, y)
        loss.backward()
        evaluations.append(loss.item())
        return loss

    def closure_b():
        opt_b.zero_grad()
        f = _loss(b, x, y) + beta * sum(((p - q) ** 2).sum() for p, q in zip(b.parameters(), phi, strict=True))
        f.backward()
        return f

    loss = opt_a.step(closure_a)
    opt_b.step(closure_b)
    assert len(evaluations) > 1 and loss.item() == evaluations[0]  # the loss of the first evaluation
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for p, q in zip(a.parameters(), phi, strict=True):
        assert not torch.equal(p, q)
