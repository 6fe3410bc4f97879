"""Active and temporary forgetting callbacks (SPEC §7)."""

import re

import pytest
import torch
from torch import nn

from fastweights.optim import Lookahead
from fastweights.train.forgetting import EmbeddingForgetting


class TinyLM(nn.Module):
    """Embedding -> linear -> output projection, optionally tied to the embedding."""

    def __init__(self, vocab: int = 23, dim: int = 6, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):  # ids [B, N] -> logits [B, N, V]
        return self.head(torch.tanh(self.body(self.embed(ids))))


def _train(model, opt, steps, callback=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    resets = []
    for step in range(1, steps + 1):
        ids = torch.randint(1, 23, (4, 5), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        if callback is not None and callback.on_step_end(step):
            resets.append(step)
    return resets


def test_active_forgetting_resets_embeddings_and_their_moments_only():
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = EmbeddingForgetting(model.embed, opt, every=3, output=model.head, init_std=0.5, seed=1)
    assert cb.tied and cb.output_bias is model.head.bias
    _train(model, opt, 2, cb)
    body = {k: v.clone() for k, v in model.body.state_dict().items()}
    body_moments = {k: v.clone() for k, v in opt.state[model.body.weight].items()}
    old = model.embed.weight.detach().clone()
    assert cb.on_step_end(3)
    new = model.embed.weight.detach()
    assert not torch.equal(new[1:], old[1:])
    assert torch.equal(new[0], torch.zeros(6))  # padding row stays zero
    assert abs(new[1:].std().item() - 0.5) < 0.1  # drawn from the stated init
    assert torch.equal(model.head.weight, new)  # tied: the output projection is the same matrix
    assert torch.equal(model.head.bias, torch.zeros(23))
    assert model.embed.weight not in opt.state or not opt.state[model.embed.weight]
    assert model.head.bias not in opt.state or not opt.state[model.head.bias]
    for k, v in model.body.state_dict().items():
        assert torch.equal(v, body[k])
    for k, v in opt.state[model.body.weight].items():
        assert torch.equal(v, body_moments[k])
    _train(model, opt, 1)  # AdamW re-initialises the cleared state lazily
    assert opt.state[model.embed.weight]["step"].item() == 1


def test_untied_output_is_left_alone_and_row_subset_resets_those_moments():
    torch.manual_seed(0)
    model = TinyLM(tied=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = torch.tensor([3, 5, 11])
    cb = EmbeddingForgetting(model.embed, opt, every=100, output=model.head, rows=rows)
    assert not cb.tied and cb.output_bias is None
    _train(model, opt, 3)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    old = model.embed.weight.detach().clone()
    m_old = opt.state[model.embed.weight]["exp_avg"].clone()
    cb.reset()
    w = model.embed.weight.detach()
    keep = torch.ones(23, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(w[keep], old[keep]) and not torch.equal(w[rows], old[rows])
    state = opt.state[model.embed.weight]
    assert torch.equal(state["exp_avg"][rows], torch.zeros(3, 6))
    assert torch.equal(state["exp_avg_sq"][rows], torch.zeros(3, 6))
    assert torch.equal(state["exp_avg"][keep], m_old[keep])
    assert state["step"].item() == 3
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, head[k])


def test_temporary_forgetting_stops_after_until():
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cb = EmbeddingForgetting(model.embed, opt, every=4, until=10, output=model.head)
    assert _train(model, opt, 20, cb) == [4, 8]
    active = EmbeddingForgetting(model.embed, opt, every=4, output=model.head)
    assert [s for s in range(1, 21) if active.active(s)] == [4, 8, 12, 16, 20]


def test_lookahead_slow_weights_follow_the_reset():
    model = TinyLM()
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=5, alpha=0.5)
    cb = EmbeddingForgetting(model.embed, opt, every=3, output=model.head, seed=0)
    _train(model, opt, 3, cb)  # reset after step 3, mid Lookahead cycle
    assert torch.equal(opt.slow_param(model.embed.weight), model.embed.weight)
    assert not opt.optimizer.state[model.embed.weight]
    assert opt.optimizer.state[model.body.weight]  # other moments kept


def test_bad_arguments():
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        EmbeddingForgetting(model.embed, opt, every=0)
    with pytest.raises(ValueError, match="rows"):
        EmbeddingForgetting(model.embed, opt, every=1, rows=torch.tensor([23]))
    with pytest.raises(ValueError, match="nn.Embedding"):
        EmbeddingForgetting(model.head, opt, every=1)


def test_build_forgetting_from_a_config_name():
    from transformers import BertConfig, BertForMaskedLM

    from fastweights.train.forgetting import build_forgetting

    cfg = BertConfig(vocab_size=31, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    model = BertForMaskedLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert build_forgetting("none", model, opt) is None
    cb = build_forgetting("temporary", model, opt, every=5, until=50)
    assert cb.tied and cb.output_bias is model.cls.predictions.bias and cb.until == 50
    assert cb.init_std == cfg.initializer_range
    with pytest.raises(ValueError, match="needs until"):
        build_forgetting("temporary", model, opt, every=5)
    with pytest.raises(ValueError, match="unknown forgetting"):
        build_forgetting("sometimes", model, opt)
    with pytest.raises(ValueError, match="until=3 < every=5 never resets"):
        build_forgetting("temporary", model, opt, every=5, until=3)


def test_bad_values_are_named_before_any_reset():
    """A NaN init_std passed the `<= 0` check and failed in torch's normal_ at the first reset; a
    bool `every` and a float `until` were taken as numbers."""
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, match in ((dict(init_std=float("nan")), "init_std must be a finite number > 0, got nan"),
                          (dict(init_std=0.0), "init_std must be a finite number > 0, got 0.0"),
                          (dict(init_std=float("inf")), "init_std must be a finite number > 0, got inf"),
                          (dict(every=True), "every must be an integer >= 1, got True"),
                          (dict(until=2.5), "until must be None or an integer >= 0, got 2.5"),
                          (dict(until=-1), "until must be None or an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=re.escape(match)):
            EmbeddingForgetting(model.embed, opt, **{"every": 1, **kwargs})


def test_an_embedding_the_optimizer_does_not_train_is_refused():
    """EmbeddingForgetting with an optimiser of other parameters reset the weights at every step
    with no optimiser state to reset (plain) or failed there with a raw KeyError 'slow_param'
    (Lookahead); now both are refused at construction, and Lookahead names the missing parameter."""
    other = nn.Linear(2, 2)
    for opt in (torch.optim.SGD(other.parameters(), lr=0.1), Lookahead(torch.optim.SGD(other.parameters(), lr=0.1))):
        with pytest.raises(ValueError, match=re.escape("the embedding weight (shape (4, 2)) is not trained by the "
                                                       f"optimizer ({type(opt).__name__})")):
            EmbeddingForgetting(nn.Embedding(4, 2), opt, every=1)
    model = TinyLM(tied=True)
    opt = Lookahead(torch.optim.SGD([model.embed.weight, model.body.weight], lr=0.1))
    with pytest.raises(ValueError, match=re.escape("the tied output bias (shape (23,)) is not trained")):
        EmbeddingForgetting(model.embed, opt, every=1, output=model.head)
    with pytest.raises(ValueError, match=re.escape("a parameter of shape (23,) is not in this Lookahead's "
                                                   "param_groups: it has no slow weights")):
        opt.slow_param(model.head.bias)
    assert model.head.bias not in opt.state  # asking added no empty state entry
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        EmbeddingForgetting(model.embed, {}, every=1)
    EmbeddingForgetting(model.embed, opt, every=1, output=model.body)  # untied: the bias is not reset
