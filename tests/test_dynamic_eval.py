"""Dynamic evaluation: score-then-update order, update rules against hand-written loops, restore."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from fastweights.eval.dynamic import DynamicEvalConfig, dynamic_eval, select_parameters

V = 37


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def docs(seed=1, lens=(23, 17)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lens]


def manual(model, doc, seg, step, context=10**9):
    """Independent loop: for each segment, loss of its targets from the full window, then step."""
    m = copy.deepcopy(model)
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    out = []
    for s in range(1, doc.numel(), seg):
        e = min(s + seg, doc.numel())
        lo = max(0, s - 1 - context)
        logits = m(input_ids=doc[lo:e - 1][None]).logits[0]
        loss = F.cross_entropy(logits[s - 1 - lo:], doc[s:e], reduction="none")
        out.append(loss.detach())
        m.zero_grad()
        loss.mean().backward()
        with torch.no_grad():
            for n, p in m.named_parameters():
                step(n, p, theta0[n])
    return torch.cat(out)


def test_sgd_matches_hand_written_loop_and_restores_weights():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = docs()
    cfg = DynamicEvalConfig(rule="sgd", segment_length=6, lr=0.5, decay=0.1, context=7)
    res = dynamic_eval(model, d, cfg, count_flops=False, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])

    def sgd(n, p, p0):
        p.sub_(0.5 * p.grad + 0.1 * (p - p0))

    exp = [manual(model, doc, 6, sgd, context=7) for doc in d]
    n0 = exp[0].numel()
    got0 = torch.tensor(res.dynamic.loss_by_position[:n0])
    # loss_by_position averages over documents: position t < len(doc 1) mixes both
    n1 = exp[1].numel()
    mean = torch.cat([(exp[0][:n1] + exp[1]) / 2, exp[0][n1:]])
    assert torch.allclose(got0, mean, atol=1e-5)
    assert abs(res.dynamic.loss - torch.cat(exp).mean().item()) < 1e-5
    assert res.dynamic.tokens == res.static.tokens == sum(x.numel() - 1 for x in d)


def test_float64_model_is_scored_in_float64():
    """A float64 model's losses (static and dynamic) keep float64 precision: no float32 cast."""
    model = tiny().double()
    d = docs()
    cfg = DynamicEvalConfig(rule="sgd", segment_length=6, lr=0.5)
    res = dynamic_eval(model, d, cfg, count_flops=False, progress=False)

    def sgd(n, p, p0):
        p.sub_(0.5 * p.grad)

    exp = torch.cat([manual(model, doc, 6, sgd) for doc in d])
    assert exp.dtype == torch.float64
    assert abs(res.dynamic.loss - exp.mean().item()) < 1e-12
    with torch.no_grad():
        static = torch.cat([F.cross_entropy(model(input_ids=doc[None, :-1]).logits[0], doc[1:], reduction="none")
                            for doc in d])
    assert abs(res.static.loss - static.mean().item()) < 1e-12


def test_rms_rule_with_calibration_matches_formula():
    model = tiny(2)
    d = docs(3, lens=(13,))
    cal = docs(4, lens=(11,))
    cfg = DynamicEvalConfig(rule="rms", segment_length=5, lr=0.01, decay=0.02, eps=1e-6, params="last:1")
    res = dynamic_eval(model, d, cfg, calibration=cal, count_flops=False, progress=False)
    names = {n for n, _ in select_parameters(model, "last:1")}
    # mean squared gradient over the calibration segments, computed here by hand
    ms = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    count = 0
    for doc in cal:
        for s in range(1, doc.numel(), 5):
            e = min(s + 5, doc.numel())
            model.zero_grad()
            F.cross_entropy(model(input_ids=doc[:e - 1][None]).logits[0, s - 1:], doc[s:e]).backward()
            for n, p in model.named_parameters():
                if n in names:
                    ms[n] += p.grad.square()
            count += 1
    model.zero_grad()

    def rms(n, p, p0):
        if n in names:
            r = (ms[n] / count).sqrt()
            p.sub_(0.01 * p.grad / (r + 1e-6) + 0.02 * r * (p - p0))

    exp = manual(model, d[0], 5, rms)
    assert torch.allclose(torch.tensor(res.dynamic.loss_by_position), exp, atol=1e-5)
    assert res.adapted_parameters == sum(p.numel() for n, p in model.named_parameters() if n in names)


def test_scored_before_update_and_static_is_the_same_windows():
    model = tiny(5)
    seg = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(6))
    doc = torch.cat([seg, seg, seg])  # repeated text: updating on it must help later copies
    cfg = DynamicEvalConfig(rule="sgd", segment_length=12, lr=1.0)
    res = dynamic_eval(model, [doc], cfg, progress=False)
    st, dy = torch.tensor(res.static.loss_by_position), torch.tensor(res.dynamic.loss_by_position)
    assert torch.equal(st[:12], dy[:12])  # the first segment: no update has happened yet
    assert dy[12:].mean() < st[12:].mean() - 0.1
    with torch.no_grad():  # static equals a plain forward over the whole document
        plain = F.cross_entropy(model(input_ids=doc[:-1][None]).logits[0], doc[1:], reduction="none")
    assert torch.allclose(st, plain, atol=1e-5)
    assert res.flop_overhead > 2.5  # forward + backward + update per segment
    # wall time is measured, not asserted (a loaded machine reorders it): only its bookkeeping
    assert res.static.seconds > 0 and res.time_overhead == res.dynamic.seconds / res.static.seconds
    zero = dynamic_eval(model, [doc], DynamicEvalConfig(rule="sgd", segment_length=12, lr=0.0),
                        count_flops=False, progress=False)
    assert torch.allclose(torch.tensor(zero.dynamic.loss_by_position), st, atol=1e-6)


def test_documents_are_independent():
    model = tiny(7)
    a, b = docs(8)
    cfg = DynamicEvalConfig(rule="rms", segment_length=4, lr=0.05)
    both = dynamic_eval(model, [a, b], cfg, count_flops=False, progress=False)
    alone = dynamic_eval(model, [b], cfg, count_flops=False, progress=False)
    pos_b = torch.tensor(alone.dynamic.loss_by_position)
    pos_ab = torch.tensor(both.dynamic.loss_by_position)
    pos_a = torch.tensor(dynamic_eval(model, [a], cfg, count_flops=False, progress=False).dynamic.loss_by_position)
    n = pos_b.numel()
    assert torch.allclose(pos_ab[:n], (pos_a[:n] + pos_b) / 2, atol=1e-6)


def test_parameter_subsets_and_errors():
    model = tiny()
    down = select_parameters(model, "mlp_down")
    assert [n for n, _ in down] == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    last = [n for n, _ in select_parameters(model, "last:1")]
    assert last and all(n.startswith("model.layers.1.") for n in last)
    with pytest.raises(ValueError, match="K must be"):
        select_parameters(model, "last:3")
    with pytest.raises(ValueError, match="params"):
        select_parameters(model, "attention")
    with pytest.raises(ValueError, match="rule"):
        dynamic_eval(model, docs(), DynamicEvalConfig(rule="adam"))
    with pytest.raises(ValueError, match="at least 2"):
        dynamic_eval(model, [torch.tensor([3])])


def test_bad_values_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"documents 1 holds token id -100; token ids must be >= 0"):
        dynamic_eval(model, [torch.tensor([3, 4, 5]), torch.tensor([3, 4, -100])])
    with pytest.raises(ValueError, match=r"calibration 0 holds token id -1"):
        dynamic_eval(model, docs(), DynamicEvalConfig(rule="rms"), calibration=[torch.tensor([3, -1, 4])])
    # rms divides by sqrt(mean g²) + eps: eps = 0 gives 0/0 on entries no calibration gradient reached
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0.0"):
        dynamic_eval(model, docs(), DynamicEvalConfig(rule="rms", eps=0.0))
    DynamicEvalConfig(rule="sgd", eps=0.0).validate()  # sgd does not read eps


def test_parameter_subsets_follow_the_decoder_stack_of_other_families():
    """'last:K' and 'mlp_down' looked for names `layers.N.` and `mlp.down_proj` only: on GPT-2
    they said the model had 0 decoder layers, or selected nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=8, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0))
    opt = OPTForCausalLM(OPTConfig(vocab_size=30, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                                   ffn_dim=16, word_embed_proj_dim=8, pad_token_id=1, bos_token_id=0, eos_token_id=0))
    for model, stack, down in ((gpt2, "transformer.h", "mlp.c_proj.weight"),
                               (opt, "model.decoder.layers", "fc2.weight")):
        named = dict(model.named_parameters())
        last = {n for n, _ in select_parameters(model, "last:2")}
        assert last == {n for n in named if n.startswith((f"{stack}.1.", f"{stack}.2."))} and last
        assert [n for n, _ in select_parameters(model, "mlp_down")] == [f"{stack}.{i}.{down}" for i in range(3)]
        with pytest.raises(ValueError, match=r"the model has 3 decoder layers; K must be in 1\.\.3"):
            select_parameters(model, "last:4")
    # a model of a family whose MLP output is named otherwise: the error names what it looks for
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"ffn_out": torch.nn.Linear(2, 2)}) for _ in range(2))

    with pytest.raises(ValueError, match=r"selects no parameters of this Other: .*mlp\.down_proj\.weight.*predicate"):
        select_parameters(Other(), "mlp_down")
    assert [n for n, _ in select_parameters(Other(), "last:1")] == ["blocks.1.ffn_out.weight", "blocks.1.ffn_out.bias"]


@pytest.mark.parametrize("context", [True, False, 2.0, -1])
def test_context_must_be_an_integer(context):
    """context=True was accepted as context 1 (a bool is not an integer here)."""
    with pytest.raises(ValueError, match=re.escape(f"context must be None or an integer >= 0, got {context!r}")):
        DynamicEvalConfig(context=context).validate()
    for good in (None, 0, 1, 64):
        DynamicEvalConfig(context=good).validate()
