"""Dynamic evaluation (Krause et al. 2018, 2019; SPEC §3) for any Hugging Face causal LM.

A document is cut into segments of ``segment_length`` predicted tokens. Each segment is read
in a window that also holds up to ``context`` earlier tokens of the same document, and is

1. **scored** with the current weights (the loss of its predicted tokens), then
2. **updated on**: one gradient step on that same loss (the forward of step 1 is reused, so
   the segment is never updated on before it is scored).

Update rules, with ``g`` the gradient of the segment's mean loss and θ0 the original weights:

* ``sgd``: ``θ ← θ − η g − λ (θ − θ0)``;
* ``rms`` (Krause's RMS-normalised rule with decay toward θ0):
  ``θ ← θ − η g / (sqrt(ms) + ε) − λ sqrt(ms) ⊙ (θ − θ0)``. ``ms`` is the mean squared
  gradient, from ``calibration`` documents (training data, as in Krause et al.) when given,
  else the running mean over the current document's segments so far (this one included).

Only a subset of parameters may be adapted (``params``): ``"all"``, ``"last:K"`` (the last K
decoder layers), ``"mlp_down"`` (every MLP down-projection, the weights In-Place TTT treats
as fast), or a predicate ``(name, param) -> bool``. The original weights are restored after
every document, so documents never see each other.

:func:`dynamic_eval` runs static evaluation (the same windows, no updates) in the same call
and reports perplexity, loss by position, wall-clock and FLOPs of both, and their ratios.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from fastweights._progress import progress_bar
from fastweights.errors import check_number, is_int
from fastweights.eval.flops import flop_counter
from fastweights.eval.lm import evaluating, exp_loss
from fastweights.train.trainer import causal_lm_loss

__all__ = ["DynamicEvalConfig", "DynamicEvalResult", "ModeResult", "dynamic_eval", "select_parameters"]

RULES = ("sgd", "rms")


@dataclass
class DynamicEvalConfig:
    """Settings of dynamic evaluation (see the module docstring for the update rules)."""

    rule: str = "rms"
    segment_length: int = 64
    lr: float = 1e-4
    decay: float = 0.0
    eps: float = 1e-8
    params: str | Callable[[str, nn.Parameter], bool] = "all"
    context: int | None = None  # earlier tokens in each window; None: as many as the model takes

    def validate(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if isinstance(self.segment_length, bool) or not isinstance(self.segment_length, int) \
                or self.segment_length < 1:
            raise ValueError(f"segment_length must be a positive integer, got {self.segment_length!r}")
        for name in ("lr", "decay"):
            check_number(name, getattr(self, name))
        # rms divides by sqrt(mean g²) + eps: a parameter entry with no calibration gradient is 0/0
        check_number("eps", self.eps, strict=self.rule == "rms")
        if self.context is not None and (not is_int(self.context) or self.context < 0):  # True is not 1
            raise ValueError(f"context must be None or an integer >= 0, got {self.context!r}")


@dataclass
class ModeResult:
    """One evaluation mode: mean loss (nats/token), perplexity, tokens, seconds, FLOPs/token."""

    loss: float
    perplexity: float
    tokens: int
    seconds: float
    flops_per_token: float | None
    loss_by_position: list[float] = field(repr=False)  # mean loss of predicted position t (index t-1)


@dataclass
class DynamicEvalResult:
    """Static and dynamic evaluation of the same documents and windows."""

    static: ModeResult
    dynamic: ModeResult
    config: DynamicEvalConfig
    adapted_parameters: int

    @property
    def time_overhead(self) -> float:
        return self.dynamic.seconds / self.static.seconds

    @property
    def flop_overhead(self) -> float | None:
        if self.static.flops_per_token is None or self.dynamic.flops_per_token is None:
            return None
        return self.dynamic.flops_per_token / self.static.flops_per_token

    def to_dict(self) -> dict:
        out = asdict(self)
        out["config"]["params"] = self.config.params if isinstance(self.config.params, str) else "custom"
        out["time_overhead"], out["flop_overhead"] = self.time_overhead, self.flop_overhead
        return out


# --------------------------------------------------------------------------- parameters
# the MLP output projection in the decoder layers of Llama-like models, GPT-2, GPT-NeoX/Falcon, OPT/Phi
DOWN_NAMES = ("mlp.down_proj.weight", "mlp.c_proj.weight", "mlp.dense_4h_to_h.weight", "fc2.weight")


def decoder_layers(model: nn.Module) -> tuple[str, int]:
    """``(prefix, count)`` of the model's stack of decoder layers: the ``nn.ModuleList`` with
    ``config.num_hidden_layers`` entries (the longest list without that number). Its layers'
    parameters are named ``<prefix>.<i>.*`` (``model.layers`` in Llama, ``transformer.h`` in
    GPT-2, ``model.decoder.layers`` in OPT)."""
    lists = [(n, len(m)) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [x for x in lists if x[1] == n_layers]
    if exact:
        return exact[0]
    return max(lists, key=lambda x: x[1]) if lists else ("", 0)


def _layer_index(name: str, prefix: str) -> int | None:
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name) if prefix else None
    return None if m is None else int(m.group(1))


def select_parameters(model: nn.Module, spec) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that dynamic evaluation adapts, for ``spec`` as in
    :class:`DynamicEvalConfig.params`. Tied parameters appear once."""
    named = list(model.named_parameters())
    if callable(spec):
        chosen = [(n, p) for n, p in named if spec(n, p)]
    elif spec == "all":
        chosen = named
    elif spec == "mlp_down":
        prefix, _ = decoder_layers(model)
        chosen = [(n, p) for n, p in named if _layer_index(n, prefix) is not None
                  and any(n.endswith("." + d) for d in DOWN_NAMES)]
        if not chosen:
            raise ValueError(f"params 'mlp_down' selects no parameters of this {type(model).__name__}: it takes the "
                             f"decoder layers' MLP output weights named {', '.join(DOWN_NAMES)}; pass a predicate "
                             "(name, param) -> bool for other names")
    elif isinstance(spec, str) and re.fullmatch(r"last:\d+", spec):
        k = int(spec.split(":")[1])
        prefix, count = decoder_layers(model)
        if not 1 <= k <= count:
            raise ValueError(f"params {spec!r}: the model has {count} decoder layers; K must be in 1..{count}")
        chosen = [(n, p) for n, p in named if (i := _layer_index(n, prefix)) is not None and i >= count - k]
    else:
        raise ValueError(f"params must be 'all', 'last:K', 'mlp_down' or a callable, got {spec!r}")
    if not chosen:
        raise ValueError(f"params {spec!r} selects no parameters of this model")
    return chosen


# --------------------------------------------------------------------------- core
def _windows(n_tokens: int, seg: int, context: int):
    """(lo, s, e) per segment: the window reads tokens [lo, e) and scores targets [s, e),
    where target t is token t predicted from tokens < t (t >= 1)."""
    for s in range(1, n_tokens, seg):
        e = min(s + seg, n_tokens)
        yield max(0, s - 1 - context), s, e


def _segment_loss(model, doc: torch.Tensor, lo: int, s: int, e: int) -> torch.Tensor:
    """Per-token losses (e - s,) of targets [s, e), reading tokens [lo, e - 1]."""
    ids = doc[lo:e].unsqueeze(0)
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits[:, s - 1 - lo:]
    return causal_lm_loss(logits, doc[s:e].unsqueeze(0), reduction="none")[0]


class _Updater:
    """Holds θ0 and the rule's state for the adapted parameters of one document."""

    def __init__(self, params: list[nn.Parameter], cfg: DynamicEvalConfig, ms: list[torch.Tensor] | None):
        self.params, self.cfg = params, cfg
        self.theta0 = [p.detach().clone() for p in params]
        self.fixed_ms = ms
        self.sum_sq = [torch.zeros_like(p) for p in params] if ms is None else None
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        cfg = self.cfg
        self.steps += 1
        for i, (p, p0) in enumerate(zip(self.params, self.theta0, strict=True)):
            g = p.grad
            if g is None:
                continue
            if cfg.rule == "sgd":
                p.sub_(cfg.lr * g + cfg.decay * (p - p0))
                continue
            if self.fixed_ms is None:
                self.sum_sq[i].add_(g.square())
                ms = self.sum_sq[i] / self.steps
            else:
                ms = self.fixed_ms[i]
            rms = ms.sqrt()
            p.sub_(cfg.lr * g / (rms + cfg.eps) + cfg.decay * rms * (p - p0))

    @torch.no_grad()
    def restore(self) -> None:
        for p, p0 in zip(self.params, self.theta0, strict=True):
            p.copy_(p0)
            p.grad = None


def _run_doc(model, doc, cfg, context, updater: _Updater | None, losses: list[torch.Tensor]) -> None:
    """Score (and, with an updater, then update on) each segment; restore θ0 at the end."""
    try:
        for lo, s, e in _windows(doc.numel(), cfg.segment_length, context):
            if updater is None:
                with torch.no_grad():
                    losses.append(_segment_loss(model, doc, lo, s, e))
                continue
            seg = _segment_loss(model, doc, lo, s, e)
            losses.append(seg.detach())  # scored before the update
            for p in updater.params:
                p.grad = None
            seg.mean().backward()
            updater.step()
    finally:
        if updater is not None:
            updater.restore()


def _mean_square_gradients(model, docs, cfg, context, params) -> list[torch.Tensor]:
    sums = [torch.zeros_like(p) for p in params]
    count = 0
    for doc in docs:
        for lo, s, e in _windows(doc.numel(), cfg.segment_length, context):
            for p in params:
                p.grad = None
            _segment_loss(model, doc, lo, s, e).mean().backward()
            with torch.no_grad():
                for acc, p in zip(sums, params, strict=True):
                    if p.grad is not None:
                        acc.add_(p.grad.square())
            count += 1
    if count == 0:
        raise ValueError("calibration documents hold no segment (each needs at least 2 tokens)")
    for p in params:
        p.grad = None
    return [s / count for s in sums]


def _summarise(per_doc: list[list[torch.Tensor]], seconds: float, flops: float | None) -> ModeResult:
    flat = [torch.cat(d) for d in per_doc if d]
    allv = torch.cat(flat)
    longest = max(t.numel() for t in flat)
    tot = torch.zeros(longest, dtype=torch.float64)
    cnt = torch.zeros(longest, dtype=torch.float64)
    for t in flat:
        tot[: t.numel()] += t.double()
        cnt[: t.numel()] += 1
    loss = allv.double().mean().item()
    return ModeResult(loss=loss, perplexity=exp_loss(loss), tokens=allv.numel(), seconds=seconds,
                      flops_per_token=flops, loss_by_position=(tot / cnt).tolist())


def _token_docs(seqs: Iterable, what: str, device) -> list[torch.Tensor]:
    """``seqs`` as 1-D long tensors on ``device``; a negative id (an ignored target, -100,
    appended as a token, say) raises: it would be scored as a loss of 0."""
    # a TokenStore's documents are read-only arrays (with their EOS): copied
    docs = [(d if isinstance(d, torch.Tensor) else torch.tensor(np.asarray(d))).flatten().long() for d in seqs]
    for i, d in enumerate(docs):
        if d.numel() and int(d.min()) < 0:
            raise ValueError(f"{what} {i} holds token id {int(d.min())}; token ids must be >= 0")
    return [d.to(device) for d in docs]


def dynamic_eval(
    model: nn.Module,
    documents: Iterable[torch.Tensor],
    config: DynamicEvalConfig | None = None,
    *,
    calibration: Iterable[torch.Tensor] | None = None,
    count_flops: bool = True,
    progress: bool = True,
) -> DynamicEvalResult:
    """Static and dynamic evaluation of ``documents`` with a Hugging Face causal LM.

    Args:
        model: any causal LM called as ``model(input_ids=(1, n)).logits`` (1, n, V).
        documents: 1-D long tensors of token ids, one per document (at least 2 tokens).
        config: :class:`DynamicEvalConfig` (rule, segment length, η, λ, ε, params, context).
        calibration: documents (training data) for the ``rms`` rule's mean squared gradient;
            without them, the running mean over the current document is used.
        count_flops: count FLOPs (matmuls and attention, ``torch.utils.flop_counter``) of both
            modes on the first document, in an extra untimed pass.
        progress: show a tqdm bar.

    Returns:
        :class:`DynamicEvalResult`: perplexity, mean loss and loss by position of both modes,
        their wall-clock seconds and FLOPs per token, and the overhead ratios.
    The model's weights, ``requires_grad`` flags and every submodule's train/eval mode are as before on return.
    """
    cfg = config or DynamicEvalConfig()
    cfg.validate()
    device = next(model.parameters()).device
    docs = _token_docs(documents, "documents", device)
    if not docs:
        raise ValueError("documents is empty")
    for i, d in enumerate(docs):
        if d.numel() < 2:
            raise ValueError(f"document {i} has {d.numel()} tokens; at least 2 are needed")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    context = cfg.context if cfg.context is not None else (max_pos - cfg.segment_length if max_pos else 1 << 30)
    if context < 0:
        raise ValueError(f"segment_length {cfg.segment_length} exceeds the model's {max_pos} positions")
    chosen = select_parameters(model, cfg.params)
    params = [p for _, p in chosen]
    chosen_ids = {id(p) for p in params}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    with evaluating(model):
        try:
            for p in model.parameters():
                p.requires_grad_(id(p) in chosen_ids)
            ms = None
            if cfg.rule == "rms" and calibration is not None:
                cal = _token_docs(calibration, "calibration", device)
                ms = _mean_square_gradients(model, cal, cfg, context, params)

            flops = {"static": None, "dynamic": None}
            if count_flops:
                n_pred = docs[0].numel() - 1
                for mode in flops:
                    with flop_counter(model) as counter:
                        _run_doc(model, docs[0], cfg, context, _Updater(params, cfg, ms) if mode == "dynamic" else None,
                                 [])
                    flops[mode] = counter.get_total_flops() / n_pred

            results = {}
            for mode in ("static", "dynamic"):
                per_doc = []
                t0 = time.perf_counter()
                for doc in progress_bar(docs, desc=f"{mode} eval", disable=not progress, leave=False):
                    losses: list[torch.Tensor] = []
                    _run_doc(model, doc, cfg, context, _Updater(params, cfg, ms) if mode == "dynamic" else None, losses)
                    per_doc.append([t.cpu() for t in losses])
                results[mode] = _summarise(per_doc, time.perf_counter() - t0, flops[mode])
        finally:
            for p in model.parameters():
                p.requires_grad_(flags[id(p)])
                p.grad = None
    return DynamicEvalResult(static=results["static"], dynamic=results["dynamic"], config=cfg,
                             adapted_parameters=sum(p.numel() for p in params))
