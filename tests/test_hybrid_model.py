"""The LaCT layer and the hybrid model family: cached decoding equals the full forward, packed
equals one by one, save/load, generate, Auto classes, and every mixer/MLP combination trains."""

import copy
import dataclasses
import inspect
import json.decoder
import os
import re
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import torch
from tiny_models import Adapter, continuation_errors, load_in_fresh_process
from transformers import AutoConfig, AutoModelForCausalLM

from fastweights.errors import FastWeightsError
from fastweights.layers.attention import TokenLayout
from fastweights.layers.lact import LaCTLayer
from fastweights.models.hybrid import HybridCache, HybridConfig, HybridForCausalLM
from fastweights.ops.rope import rope_cos_sin

VOCAB = 61


def rel(a, b):
    return float((a - b).detach().norm() / (b.detach().norm() + 1e-12))


def tiny(mixers, mlps="swiglu", seed=0, **kw):
    layers = len(mixers) if isinstance(mixers, list) else 2
    base = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, mixers=mixers, mlps=mlps, sliding_window=7,
                lact_heads=2, lact_chunk_size=5, lact_init_rank=4, ttt_chunk=4, max_position_embeddings=256)
    base.update(kw)
    torch.manual_seed(seed)
    return HybridForCausalLM(HybridConfig(**base)).float().eval()


def _perturb_fast_params(model):
    """Larger learning rates and qk scales than the init, so the fast weights matter in tests,
    and a non-zero In-Place TTT conv."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LaCTLayer):
                mod.lr_proj.bias.fill_(-0.5)
            if hasattr(mod, "ttt_conv"):
                mod.ttt_conv.weight.normal_(0, 0.3)


def layout_for(pos):
    B, N = pos.shape
    starts = pos == 0
    starts[:, 0] = True
    doc = torch.cumsum(starts.long(), 1) - 1
    idx = torch.arange(N).expand(B, N)
    return TokenLayout(position_ids=pos, doc=doc, index=idx, key_doc=doc, key_index=idx,
                       key_valid=torch.ones(B, N, dtype=torch.bool))


def test_token_layout_from_positions_runs_layers_as_the_model_does():
    """TokenLayout.from_positions, the public layout for a layer called on its own: a LaCT layer
    and an attention mixer given it equal the hybrid model's own layers (one document per row,
    packed documents, left padding), and bad arguments are named."""
    model = tiny(["lact", "swa"], "swiglu")
    _perturb_fast_params(model)
    seen = {}
    hooks = [blk.mixer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out[0])))
             for i, blk in enumerate(model.model.layers)]
    ids = torch.randint(0, VOCAB, (2, 13))
    packed = torch.stack([torch.cat([torch.arange(6), torch.arange(7)]), torch.arange(13)])
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0
    cases = [dict(position_ids=torch.arange(13).expand(2, 13)), dict(position_ids=packed),
             dict(attention_mask=mask)]
    with torch.no_grad():
        for kw in cases:
            model(ids, use_cache=False, **kw)
            pos = kw.get("position_ids")
            if pos is None:  # the model's positions for left padding: 0 at each row's first real token
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            for i, blk in enumerate(model.model.layers):
                layout = TokenLayout.from_positions(pos, kw.get("attention_mask"))
                x, want = seen[i]
                got, state = blk.mixer(x, layout)
                assert state is None and torch.equal(got, want), (kw.keys(), i)
    for h in hooks:
        h.remove()
    assert TokenLayout.from_positions(torch.arange(5).expand(2, 5)).single_doc
    assert not TokenLayout.from_positions(packed).single_doc
    with pytest.raises(ValueError, match=r"position_ids must be a \(B, N\) integer tensor, got \(5,\) torch.int64"):
        TokenLayout.from_positions(torch.arange(5))
    with pytest.raises(ValueError, match=r"position_ids must be a \(B, N\) integer tensor, got \(1, 5\) torch.float32"):
        TokenLayout.from_positions(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, N\) = \(2, 13\) as position_ids, got \(2, 12\)"):
        TokenLayout.from_positions(packed, mask[:, 1:])


@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_lact_layer_init_and_reference_impl(update):
    torch.manual_seed(0)
    layer = LaCTLayer(48, 4, fw_heads=4, window=8, chunk_size=8, update=update, init_rank=32)
    D = 12
    eye = torch.eye(D)
    # W1 = L R + 0.5 I with rank min(32, D) = 12; W2 ~ N(0, 1/D)
    with torch.no_grad():
        assert float((layer.w1 - 0.5 * eye).pow(2).mean()) == pytest.approx(1 / D, rel=0.35)
        assert float((layer.w3 - 0.5 * eye).pow(2).mean()) == pytest.approx(1 / D, rel=0.35)
        assert float(layer.w2.pow(2).mean()) == pytest.approx(1 / D, rel=0.35)
    x = torch.randn(2, 21, 48)
    with torch.no_grad():
        lr = torch.nn.functional.softplus(layer.lr_proj(x))
        assert 2e-4 < float(lr.median()) < 5e-3  # near 1e-3
        layer.lr_proj.bias.fill_(-1.0)
    pos = torch.tensor([list(range(21)), list(range(9)) + list(range(12))])
    ref = LaCTLayer(48, 4, fw_heads=4, window=8, chunk_size=8, update=update, impl="reference")
    ref.load_state_dict(layer.state_dict())
    y1, _ = layer(x, layout_for(pos))
    y2, _ = ref(x, layout_for(pos))
    assert rel(y1, y2) < 1e-5


@pytest.mark.parametrize("update,heads", [("gd", 4), ("muon", 4), ("momentum", 3)])
def test_stacked_gate_and_rates_equal_the_three_projections(update, heads):
    """The one stacked product (padded to 8 rows for gd and odd head counts) gives W_s x, W_η x + b
    and w_βᵀ x as the three modules would, forward and every gradient."""
    torch.manual_seed(1)
    layer = LaCTLayer(48, 4, fw_heads=heads, window=8, chunk_size=8, update=update).double()
    with torch.no_grad():
        layer.lr_proj.bias.normal_()
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    got = layer._gate_rates(x)
    want = (layer.gate_proj(x), layer.lr_proj(x), None if layer.beta_proj is None else layer.beta_proj(x))
    assert (got[2] is None) == (want[2] is None)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    grads = []
    for outs in (got, want):
        loss = sum((o * torch.randn_like(o, generator=torch.Generator().manual_seed(i))).sum()
                   for i, o in enumerate(outs) if o is not None)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for a, b in zip(got, want):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


COMBOS = [
    (["lact", "lact"], "swiglu", {"lact_update": "gd"}),
    (["lact", "swa"], "swiglu", {"lact_update": "momentum"}),
    (["lact", "attention"], "swiglu", {"lact_update": "muon"}),
    (["swa", "lact"], "inplace_ttt", {}),
    (["attention", "swa"], "inplace_ttt", {"ttt_target": "hidden"}),
]


@pytest.mark.parametrize("mixers,mlps,kw", COMBOS, ids=["-".join(c[0]) + "-" + c[1] for c in COMBOS])
def test_cached_decoding_equals_full_forward(mixers, mlps, kw):
    """Left-padded prefill, then token-by-token decoding crossing several LaCT chunk and
    In-Place TTT chunk boundaries, equals the full uncached forward (float32, 1e-5)."""
    model = tiny(mixers, mlps, **kw)
    _perturb_fast_params(model)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 23))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :3] = 0  # left padding on row 1
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        assert isinstance(cache, HybridCache) and cache.get_seq_length() == 6
        for t in range(6, 23):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    step = torch.cat(steps, 1)
    keep = mask.bool()
    assert rel(step[keep], full[keep]) < 1e-5
    # and the fast weights matter: a model without state carrying would differ
    with torch.no_grad():
        cut = model(ids[:, 12:], attention_mask=mask[:, 12:], use_cache=False).logits
    assert rel(cut[:, -1], full[:, -1]) > 1e-3


def test_inplace_ttt_cache_holds_a_bounded_state_not_the_history():
    """The In-Place TTT MLP's cache entry is its fast-weight state: after 60 tokens its size is
    bounded by the dense (B, d, f) state plus one chunk, not growing with the length."""
    from fastweights.ops.inplace_ttt_decode import InPlaceTTTState

    model = tiny(["swa", "attention"], "inplace_ttt")
    _perturb_fast_params(model)
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(ids[:, :10], use_cache=True)
        cache = out.past_key_values
        for t in range(10, 60):
            cache = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).past_key_values
    for layer_state in cache.states:
        state = layer_state["mlp"]
        assert isinstance(state, InPlaceTTTState)
        assert state.numel() <= 2 * 24 * 40
        assert state.buf_z is None or state.buf_z.shape[1] <= 2 * 4
    assert cache.ttt_tokens == [60, 60]


def _window_cache_check(model, device, step: int, tol: float):
    """Prefill 12 tokens, then continue ``step`` tokens at a time through the cache: the SWA and
    LaCT layers (0, 1; window 7) hold at most 6 keys, full attention (2) all, and the logits equal
    the full forward's (rows with left padding and a document start)."""
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :4] = 0
    pos = torch.cat([torch.arange(40).unsqueeze(0), torch.cat([torch.arange(15), torch.arange(25)]).unsqueeze(0)])
    pos[0] = (mask[0].cumsum(0) - 1).clamp(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out = model(ids[:, :12], attention_mask=mask[:, :12], position_ids=pos[:, :12], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(12, 40, step):
            e = min(t + step, 40)
            out = model(ids[:, t:e], attention_mask=mask[:, :e], position_ids=pos[:, t:e],
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            lengths = [cache.states[i]["mixer"][0].shape[2] for i in range(3)]
            assert lengths == [6, 6, e], (t, lengths)
    keep = mask.bool()
    assert rel(torch.cat(steps, 1)[keep], full[keep]) < tol


@pytest.mark.parametrize("step", [1, 5])
def test_sliding_window_cache_keeps_only_the_window(step):
    """SWA and LaCT layers cache only their last window - 1 keys while full attention keeps all;
    decoding (1 token per call) or chunked prefill (5) from the trimmed cache equals the full
    forward (float32, 1e-5)."""
    model = tiny(["swa", "lact", "attention"], "swiglu")  # sliding_window 7
    _perturb_fast_params(model)
    _window_cache_check(model, torch.device("cpu"), step, 1e-5)


@pytest.mark.gpu
def test_sliding_window_cache_on_cuda_flex():
    """The same on CUDA, where calls of several tokens run flex attention over the trimmed keys."""
    model = tiny(["swa", "lact", "attention"], "swiglu", hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=2, lact_heads=2).cuda()
    _perturb_fast_params(model)
    _window_cache_check(model, torch.device("cuda"), 5, 2e-3)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    """With activation checkpointing every block is recomputed in backward: the loss and every
    gradient equal the plain backward's, for LaCT, SWA and attention mixers with In-Place TTT
    MLPs, on packed rows."""
    from fastweights.models.compat import enable_activation_checkpointing

    grads = []
    for ckpt in (False, True):
        model = tiny(["lact", "swa", "attention"], "inplace_ttt", lact_update="muon").train()
        _perturb_fast_params(model)
        if ckpt:
            enable_activation_checkpointing(model, use_reentrant=use_reentrant)
            assert all(block.gradient_checkpointing for block in model.model.layers)
        batch = _corpus(2, 30)
        pos = torch.cat([torch.arange(12), torch.arange(18)]).expand(2, 30)
        loss = model(batch, position_ids=pos, labels=batch).loss
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert all(g is not None for g in grads[1][1:])
    for a, b in zip(*grads, strict=True):
        assert rel(b, a) < 1e-6


def test_packed_equals_one_by_one():
    model = tiny(["lact", "swa"], "inplace_ttt", lact_update="muon")
    _perturb_fast_params(model)
    lens = [9, 14, 6]
    torch.manual_seed(2)
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
    assert rel(packed, alone) < 1e-5
    model.double()  # in float64 every step stays float64 (η and β too): equal to rounding
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
    assert packed.dtype == torch.float64 and rel(packed, alone) < 1e-12


def test_masked_tokens_inside_a_row_never_reach_the_ttt_fast_weights():
    """In-Place TTT MLPs without a cache read a masked gap into their fast weights (the chunked
    op took no mask): the row must equal the row without the gap, cached or not, in training too."""
    model = tiny(["attention", "swa"], "inplace_ttt", ttt_chunk=3, ttt_target="hidden", sliding_window=64).double()
    _perturb_fast_params(model)
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 5:11] = 0
    other = ids.clone()
    other[1, 5:11] = 7  # other contents under the mask
    real, keep = mask.bool(), mask[1].bool()
    with torch.no_grad():
        alone = model(ids[1:2, keep], use_cache=False).logits[0]
        for use_cache in (False, True):
            got = model(ids, attention_mask=mask, use_cache=use_cache).logits
            assert (got[1, keep] - alone).abs().max() < 1e-12
            assert (got - model(other, attention_mask=mask, use_cache=use_cache).logits)[real].abs().max() < 1e-12
    model.train()
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "ttt_conv" in n)


def test_lact_refuses_masked_tokens_that_a_later_token_would_read():
    """LaCT reads every token into its fast weights: a masked gap inside a document (or, with
    update-then-apply, right padding) raises; left padding, padding before a document start and
    right padding with apply-then-update leave the real tokens as without the padding."""
    model = tiny(["lact", "lact"], lact_chunk_size=3, lact_update="gd", sliding_window=64).double()
    _perturb_fast_params(model)
    torch.manual_seed(4)
    ids = torch.randint(1, VOCAB, (1, 16))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits

        def padded(mask, **kw):
            return model(ids, attention_mask=torch.tensor([mask]), use_cache=False, **kw).logits

        gap = [1] * 16
        gap[5:8] = [0, 0, 0]
        with pytest.raises(FastWeightsError, match=r"masked token inside a document \(row 0, token 8 of this call\)"):
            padded(gap)
        left = [0] * 4 + [1] * 12
        got = padded(left)
        assert (got[0, 4:] - model(ids[:, 4:], use_cache=False).logits[0]).abs().max() < 1e-12
        right = [1] * 12 + [0] * 4
        assert (padded(right)[0, :12] - full[0, :12]).abs().max() < 1e-12
        # a gap that ends where a document starts: the next document reads none of it
        pos = torch.cat([torch.arange(8), torch.arange(8)])[None]
        packed = model(ids, position_ids=pos, use_cache=False).logits
        got = padded(gap, position_ids=pos)
        assert (got[0, 8:] - packed[0, 8:]).abs().max() < 1e-12
        model.config.lact_order = "update_apply"
        for layer in model.model.layers:
            layer.mixer.order = "update_apply"
        with pytest.raises(FastWeightsError, match=r"after real tokens \(lact_order='update_apply'"):
            padded(right)


def test_packed_lanes_built_once_per_forward_pass(monkeypatch):
    """The LaCT layers of one forward pass share one layout of the packed documents, built from
    the layout's host copy of the document starts (no layer reads them from the device): logits
    and gradients equal those of layers that each build their own from position_ids."""
    import dataclasses

    import fastweights.layers.lact as lact_layer
    import fastweights.models.hybrid.modeling as modeling
    import fastweights.ops.lact as lact_op

    model = tiny(["lact", "swa", "lact"], lact_update="momentum").train()
    _perturb_fast_params(model)
    lens = [9, 14, 6, 17]
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 23))
    pos = torch.stack([torch.cat([torch.arange(n) for n in lens[:2]]), torch.cat([torch.arange(n) for n in lens[2:]])])

    def run():
        model.zero_grad()
        logits = model(ids, position_ids=pos, use_cache=False).logits
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    built, build = [], lact_layer.lact_lanes
    monkeypatch.setattr(lact_layer, "lact_lanes", lambda *a, **k: built.append(a[0].device) or build(*a, **k))
    starts = lact_op.doc_starts
    with monkeypatch.context() as m:
        m.setattr(lact_op, "doc_starts", lambda *a, **k: pytest.fail("a layer read the document starts"))
        shared = run()
    assert built == [torch.device("cpu")]  # once, from the host copy
    layout = modeling._layout
    monkeypatch.setattr(modeling, "_layout", lambda *a: dataclasses.replace(layout(*a), starts_host=None))
    reads = []
    monkeypatch.setattr(lact_op, "doc_starts", lambda *a, **k: reads.append(1) or starts(*a, **k))
    own = run()
    assert len(built) == 1 and len(reads) == 2  # each layer built its own
    assert len(own) == len(shared) > 10
    for a, b in zip(own, shared, strict=True):
        assert torch.equal(a, b)


def greedy_by_full_forwards(model, prompt, steps: int):
    """Greedy decoding by hand, a full uncached forward per token: (B, P) -> (B, P + steps)."""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


def train_losses(model, batch, steps: int = 8, lr: float = 3e-3) -> list[float]:
    """The loss of each of ``steps`` AdamW steps on ``batch`` (B, N)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_generate_save_load_and_auto(tmp_path):
    model = tiny(["lact", "swa"], "swiglu")
    _perturb_fast_params(model)
    prompt = torch.randint(0, VOCAB, (2, 8))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False)
    seq = greedy_by_full_forwards(model, prompt, 9)
    assert torch.equal(out, seq)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "fastweights_hybrid" and cfg.mixers == ["lact", "swa"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(seq).logits, model(seq).logits)
    # the CLI's loader, in a process where nothing imported the hybrid family yet
    name, logits = load_in_fresh_process(tmp_path, tmp_path)
    assert name == "HybridForCausalLM"
    with torch.no_grad():
        assert torch.equal(logits, model(torch.arange(12).view(1, 12) % 50).logits)


def test_update_apply_runs_without_a_state_and_refuses_to_continue():
    """order='update_apply' (not causal inside a chunk): a forward in eval mode, whose use_cache
    defaults to True, equals the uncached one; continuing from its cache, by hand or in
    generate, raises by name; generate with use_cache=False decodes by full forwards."""
    model = tiny(["lact", "swa"], "swiglu", lact_order="update_apply")
    _perturb_fast_params(model)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        out = model(ids)
        assert torch.equal(out.logits, model(ids, use_cache=False).logits)
        with pytest.raises(ValueError, match=r"'update_apply' .* cannot continue from a cache: pass use_cache=False"):
            model(ids[:, :1], past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match="cannot continue from a cache"):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, 4))


def test_update_apply_loss_from_labels_warns_once_per_model():
    """A loss from labels on a model with LaCT layers in order='update_apply' leaks later tokens
    of each chunk into the logits it scores (train and eval refuse such models): forward warns,
    naming the layers, once per model instance; an apply_update model does not warn."""
    from fastweights.errors import FastWeightsWarning

    ids = torch.randint(0, VOCAB, (1, 10))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            model = tiny(["swa", "lact", "lact"], "swiglu", lact_order="update_apply")
            with torch.no_grad():
                model(ids, labels=ids)
                model(ids, labels=ids)
                model(ids)
        with torch.no_grad():
            tiny(["swa", "lact"], "swiglu")(ids, labels=ids)
    ours = [w for w in seen if issubclass(w.category, FastWeightsWarning)]
    assert len(ours) == 2, [str(w.message) for w in seen]
    for w in ours:
        assert re.search(r"not a causal-LM loss: its LaCT layers \[1, 2\] use lact_order='update_apply'.*see later "
                         r"tokens of its chunk", str(w.message))


def test_cache_refuses_another_model_another_batch_cropping_and_assisted_decoding():
    """A HybridCache continues only with the configuration and batch that filled it; it cannot be
    cropped, so generate's assisted and prompt-lookup decoding raise by name, as does continuous
    batching (its paged cache has no room for the states)."""
    model = tiny(["swa", "swa"], "swiglu")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        # same sizes, so nothing else would notice: attention would read keys cut to the window
        other = tiny(["attention", "attention"], "swiglu")
        with pytest.raises(FastWeightsError, match=r"another configuration: mixers \('swa', 'swa'\) \(model: "
                                                   r"\('attention', 'attention'\)\)"):
            other(ids[:, :1], past_key_values=cache)
        deeper = tiny(["swa", "swa", "swa"], "swiglu")
        with pytest.raises(FastWeightsError, match="num_hidden_layers 2 \\(model: 3\\)"):
            deeper(ids[:, :1], past_key_values=cache)
        with pytest.raises(FastWeightsError, match="batch size changed .* holds 2 sequences, the input has 1"):
            model(ids[:1, :1], past_key_values=cache)
        for bad in (-2, 3):  # remove two tokens; keep three (the older, positive form)
            with pytest.raises(FastWeightsError, match=r"cannot crop a HybridCache from 12 to \d+ tokens"):
                cache.crop(bad)
        cache.crop(0)  # removes nothing
        cache.crop(12)
        assert cache.get_seq_length() == 12
        step = model(ids[:, :1], past_key_values=cache).logits
        assert rel(step, model(torch.cat([ids, ids[:, :1]], 1), use_cache=False).logits[:, -1:]) < 1e-5
        for kw in ({"prompt_lookup_num_tokens": 2}, {"assistant_model": tiny(["swa", "swa"], "swiglu", seed=1)}):
            with pytest.raises(FastWeightsError, match="assisted or speculative decoding"):
                model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4,
                               do_sample=False, **kw)
        with pytest.raises(FastWeightsError, match="continuous batching .* is not supported"):
            model.init_continuous_batching()  # the entry of generate_batch and cache_implementation="paged"
        # no cache at all: transformers ignores the cache kind, and so does the hybrid model
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, use_cache=False)
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, cache_implementation="static", **kw))


def test_muon_streaming_equals_full_in_float64_over_many_chunks():
    """300 tokens (18 LaCT chunks, Muon) streamed in pieces of 7 equal one forward in float64:
    Newton–Schulz amplifies rounding along the sequence, not the streaming form's own error."""
    model = tiny(["lact", "swa"], "inplace_ttt", hidden_size=64, lact_chunk_size=16, sliding_window=16,
                 lact_update="muon", max_position_embeddings=512).double()
    ids = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, pieces = None, []
        for s in range(0, 300, 7):
            out = model(ids[:, s:s + 7], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-10


def test_import_fastweights_registers_the_hybrid_family(tmp_path):
    """``import fastweights`` alone lets AutoModelForCausalLM load a hybrid checkpoint (fresh process)."""
    tiny(["lact", "swa"]).save_pretrained(tmp_path)
    code = ("import sys, fastweights\nfrom transformers import AutoModelForCausalLM\n"
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "HybridForCausalLM"


def test_config_errors():
    with pytest.raises(ValueError, match="mixers"):
        HybridConfig(num_hidden_layers=2, mixers=["lact", "mamba"])
    with pytest.raises(ValueError, match="mlps"):
        HybridConfig(num_hidden_layers=2, mlps=["swiglu"])
    with pytest.raises(ValueError, match="lact_update"):
        HybridConfig(lact_update="adam")
    with pytest.raises(ValueError, match="attn_backend"):
        HybridConfig(attn_backend="flash")
    with pytest.raises(ValueError, match=r"lact_glue must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        HybridConfig(lact_glue="cuda")
    with pytest.raises(ValueError, match="ttt_proj must be True or False, got 'false'"):
        HybridConfig(ttt_proj="false")


def test_hidden_states_and_the_trainers_token_count():
    """output_hidden_states gives the embeddings and each block's output (the last one normed);
    num_items_in_batch (the HF Trainer's, under gradient accumulation) makes the loss a sum over
    that count, so two half batches add up to the whole batch's mean loss and gradient."""
    model = tiny(["attention", "lact"], mlps="inplace_ttt").double()
    _perturb_fast_params(model)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0])) for b in model.model.layers]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    for h in hooks:
        h.remove()
    hs = out.hidden_states
    assert len(hs) == 3 and torch.equal(hs[0], model.model.embed_tokens(ids))
    assert torch.equal(hs[1], outs[0]) and torch.equal(hs[2], model.model.norm(outs[1]))
    assert torch.equal(model.lm_head(hs[2]), out.logits)
    assert model(ids, use_cache=False).hidden_states is None
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)

    labels = ids.clone()
    labels[1, 4:7] = -100
    whole = model(ids, labels=labels, use_cache=False).loss
    whole_grads = torch.autograd.grad(whole, list(model.parameters()), allow_unused=True)
    n = int((labels[:, 1:] != -100).sum())
    halves = [model(ids[i:i + 1], labels=labels[i:i + 1], use_cache=False, num_items_in_batch=torch.tensor(n)).loss
              for i in range(2)]
    assert abs((halves[0] + halves[1]).item() - whole.item()) < 1e-12
    half_grads = torch.autograd.grad(halves[0] + halves[1], list(model.parameters()), allow_unused=True)
    for a, b in zip(whole_grads, half_grads, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-10, atol=1e-12))


def test_convert_refuses_a_hybrid_model():
    """Hybrid models pick In-Place TTT per layer in their config; convert names that."""
    from fastweights.models import convert

    for mlps in ("swiglu", "inplace_ttt"):  # also one that has In-Place TTT MLPs already
        with pytest.raises(FastWeightsError, match=r"fastweights_hybrid model picks In-Place TTT per layer .*mlps="):
            convert(tiny(["lact", "swa"], mlps))


@pytest.mark.parametrize("kw,match", [
    (dict(num_hidden_layers=2, mixers=["mamba", "mamba"]), r"mixers entries must be in \(.*\), got \['mamba'\]$"),
    (dict(mixers=None), r"mixers must be one name or a list of 24 \(num_hidden_layers\), got None"),
    (dict(num_hidden_layers=-1), r"num_hidden_layers must be an integer >= 1, got -1"),
    (dict(num_attention_heads=0), r"num_attention_heads must be an integer >= 1, got 0"),
    (dict(lact_heads=0), r"lact_heads must be an integer >= 1, got 0"),
    (dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, lact_heads=3),
     r"hidden_size 32 divisible by num_attention_heads 4 and lact_heads 3"),
    (dict(num_key_value_heads=5, mixers="swa"), r"num_attention_heads 12 must be a multiple of num_key_value_heads 5"),
    (dict(lact_chunk_size=0), r"lact_chunk_size must be an integer >= 1, got 0"),
    (dict(ttt_chunk=0), r"ttt_chunk must be an integer >= 1, got 0"),
    (dict(lact_init_rank=0), r"lact_init_rank must be an integer >= 1, got 0"),
    (dict(vocab_size=0), r"vocab_size must be an integer >= 1, got 0"),
    (dict(sliding_window=0), r"sliding_window must be an integer >= 1, got 0"),
    (dict(ttt_lr=-1.0), r"ttt_lr must be a finite number >= 0, got -1.0"),
    (dict(lact_lr_init=0.0), r"lact_lr_init must be a finite number > 0, got 0.0"),
    (dict(rope_base=float("nan")), r"rope_base must be a finite number > 0, got nan"),
])
def test_config_checks_numbers_by_their_keys(kw, match):
    """Bad numbers fail when the config is made (not first in a layer), named by their keys."""
    with pytest.raises(ValueError, match=match):
        HybridConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(mixers="lact", head_dim=8), r"LaCT layers use heads of hidden_size / num_attention_heads = 16; head_dim 8"),
    (dict(mixers="lact", hidden_size=40, num_attention_heads=4, num_key_value_heads=4, lact_heads=8),
     r"RoPE needs even head widths: hidden_size 40 / lact_heads 8 = 5"),
    (dict(mixers="lact", hidden_size=30, num_attention_heads=2, num_key_value_heads=2, lact_heads=2),
     r"RoPE needs even head widths: hidden_size 30 / num_attention_heads 2 = 15"),
    (dict(mixers="swa", head_dim=7), r"RoPE needs even head widths: head_dim 7"),
])
def test_config_names_head_widths_the_layers_cannot_take(kw, match):
    """These passed the config and failed in a layer, named by its arguments (or, for head_dim
    with LaCT, were ignored by the LaCT layers)."""
    with pytest.raises(ValueError, match=match):
        HybridConfig(**{"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "lact_heads": 2, **kw})


def test_overrides_given_when_loading_are_checked_at_model_build(tmp_path):
    """from_pretrained(dir, key=value) sets keys after the config's __init__: 'swa' stayed a string
    (its letters read as mixer names), and num_hidden_layers=1 built a model that could not be loaded."""
    from transformers import AutoConfig

    tiny(["lact", "swa", "attention"]).config.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path, mixers="swa")
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.config.mixers == ["swa"] * 3
    assert {type(b.mixer).__name__ for b in model.model.layers} == {"AttentionMixer"}
    for kw, match in ((dict(num_hidden_layers=1), r"mixers must name one value or 1 \(num_hidden_layers\), got 3"),
                      (dict(lact_update="adam"), r"lact_update must be one of \('gd', 'momentum', 'muon'\)"),
                      (dict(lact_chunk_size=0), r"lact_chunk_size must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, **kw))


def test_key_value_heads_are_checked_only_for_the_layers_that_use_them():
    """GQA applies to attention and swa layers: a LaCT-only config was refused over the unused
    num_key_value_heads (its default, 12, against 4 heads)."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              lact_heads=2)
    assert HybridForCausalLM(HybridConfig(mixers="lact", **kw)).config.num_key_value_heads == 12
    with pytest.raises(ValueError, match="num_attention_heads 4 must be a multiple of num_key_value_heads 12"):
        HybridConfig(mixers=["lact", "swa"], **kw)


def test_lact_scale_and_shift_take_no_weight_decay():
    """The trainer decayed every tensor of 2+ dims, LaCT's per-channel q/k scale (2, d) among
    them: with --weight-decay 100 its mean fell from 1 to 0.77 in 3 steps."""
    from fastweights.train.trainer import _decays

    model = tiny(["lact", "swa", "attention"])
    names = [n for n, _ in model.named_parameters()]
    decays = dict(zip(names, _decays(model, list(model.parameters())), strict=True))
    assert not any(d for n, d in decays.items() if n.endswith(("qk_scale", "qk_shift"))), decays
    assert decays["model.layers.0.mixer.w1"] and decays["model.layers.1.mixer.attn.q_proj.weight"], decays
    assert not any(d for n, d in decays.items() if n.endswith(("norm.weight", "bias"))), decays


def test_an_fwl_head_is_refused_on_a_hybrid_model():
    """train --fwl on a hybrid model exported a model that no process could load (fwl_fastweights_hybrid
    was never registered), and its two caches could not be one."""
    from fastweights.models import add_fwl

    with pytest.raises(FastWeightsError, match="a fastweights_hybrid model cannot take an FWL head"):
        add_fwl(tiny(["lact", "swa"]))


def test_config_accepts_the_lact_heads_check_only_with_lact_layers():
    """lact_heads need not divide hidden_size when no layer is LaCT; None turns the window off."""
    cfg = HybridConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, lact_heads=3, mixers="swa",
                       sliding_window=None)
    assert cfg.lact_heads == 3 and cfg.sliding_window is None


def test_lact_glue_reaches_the_layers_and_survives_save_load(tmp_path):
    """``lact_glue`` picks each LaCT layer's glue and is saved with the config."""
    model = tiny(["lact", "swa"], "swiglu", lact_glue="torch")
    assert [m.glue for m in model.modules() if isinstance(m, LaCTLayer)] == ["torch"]
    model.save_pretrained(tmp_path)
    again = HybridForCausalLM.from_pretrained(tmp_path)
    assert again.config.lact_glue == "torch"
    assert [m.glue for m in again.modules() if isinstance(m, LaCTLayer)] == ["torch"]
    assert [m.glue for m in tiny(["lact"], "swiglu").modules() if isinstance(m, LaCTLayer)] == ["auto"]


@pytest.mark.parametrize("kw,match", [
    (dict(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
    (dict(chunk_size=8.0), "chunk_size must be an integer >= 1, got 8.0"),
    (dict(window=0), "window must be None or an integer >= 1, got 0"),
    (dict(window="8"), "window must be None or an integer >= 1, got '8'"),
    (dict(num_heads=0), "num_heads must be an integer >= 1, got 0"),
    (dict(fw_heads=0), "fw_heads must be an integer >= 1, got 0"),
    (dict(init_rank=-3), "init_rank must be an integer >= 1, got -3"),
    (dict(hidden_size=40, num_heads=4, fw_heads=8), r"RoPE needs even head widths: hidden_size 40 / num_heads 4 = 10, "
                                                     r"/ fw_heads 8 = 5"),
    (dict(attn_backend="xx"), r"attention backend must be one of \('auto', 'sdpa', 'flex'\), got 'xx'"),
])
def test_lact_layer_errors(kw, match):
    """Bad sizes fail when the layer is built, naming the value."""
    with pytest.raises(ValueError, match=match):
        LaCTLayer(**{"hidden_size": 48, "num_heads": 4, "window": 8, "chunk_size": 8, **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(num_kv_heads=0), "num_kv_heads must be an integer >= 1, got 0"),
    (dict(head_dim=0), "head_dim must be an integer >= 1, got 0"),
    (dict(window=2.5), "window must be an integer >= 1, got 2.5"),
    (dict(window=True), "window must be an integer >= 1, got True"),
    (dict(backend="xx"), r"attention backend must be one of \('auto', 'sdpa', 'flex'\), got 'xx'"),
])
def test_attention_layer_errors(kw, match):
    from fastweights.layers.attention import Attention

    with pytest.raises(ValueError, match=match):
        Attention(**{"hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, **kw})
    with pytest.raises(ValueError, match="RoPE needs an even width >= 2, got dim 5"):
        rope_cos_sin(torch.zeros(1, 3, dtype=torch.long), 5, 1e4, torch.float32)


def test_lact_layer_warns_when_the_window_is_shorter_than_the_chunk():
    with pytest.warns(UserWarning, match="LaCT window 4 < chunk_size 8"):
        LaCTLayer(48, 4, window=4, chunk_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LaCTLayer(48, 4, window=8, chunk_size=8)
        LaCTLayer(48, 4, window=None, chunk_size=8)


def test_fla_mixer_errors(monkeypatch):
    """Without flash-linear-attention, asking for gla/deltanet names the package to install;
    with it, CPU tensors outside the Triton interpreter are refused by name."""
    import sys

    monkeypatch.setitem(sys.modules, "fla.layers", None)  # import fails as if not installed
    for kind in ("gla", "deltanet"):
        with pytest.raises(ValueError, match=f"mixer '{kind}' needs flash-linear-attention"):
            tiny([kind, "swa"])
    monkeypatch.undo()
    pytest.importorskip("fla.layers")
    if torch.cuda.is_available():
        return
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny(["deltanet", "swa"])
    with pytest.raises(ValueError, match="mixer 'deltanet' .* needs CUDA tensors, got cpu"):
        model(torch.zeros(1, 5, dtype=torch.long))


def _corpus(n_rows, seqlen):
    text = inspect.getsource(json.decoder).encode()
    data = torch.tensor(list(text), dtype=torch.long) % VOCAB
    return data[: n_rows * seqlen].view(n_rows, seqlen)


TRAIN = [(mix, mlp) for mix in ("attention", "swa", "lact") for mlp in ("swiglu", "inplace_ttt")]


@pytest.mark.parametrize("mixer,mlp", TRAIN, ids=[f"{a}-{b}" for a, b in TRAIN])
def test_each_combination_trains(mixer, mlp):
    """A few AdamW steps on a small piece of real text lower the loss."""
    model = tiny([mixer, mixer], mlp, seed=3, ttt_lr=0.3, lact_chunk_size=16, sliding_window=16, ttt_chunk=16).train()
    losses = train_losses(model, _corpus(4, 48))
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 5])
def test_attention_backends_agree(window):
    """The flex_attention path (CUDA training) and the dense-mask SDPA path agree, with packed
    documents and a window; the ``causal`` fast path agrees with the dense mask on one document."""
    from fastweights.layers.attention import attend

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 37, 8), torch.randn(1, 2, 37, 8), torch.randn(1, 2, 37, 8)
    lay = layout_for(torch.cat([torch.arange(20), torch.arange(17)]).unsqueeze(0))
    ref = attend(q, k, v, lay, window, backend="sdpa")
    # rows of the second document must not see the first: moving its keys leaves it unchanged
    k2 = k.clone()
    k2[:, :, :20] += 3
    assert rel(attend(q, k2, v, lay, window, backend="sdpa")[:, :, 20:], ref[:, :, 20:]) < 1e-6
    flex = attend(q, k, v, lay, window, backend="flex")
    assert rel(flex, ref) < 1e-5
    # the mask of a layout whose keys are its queries (layout_for shares the tensors) against the
    # general one (copies), with the first three keys padding: rows that see a key agree
    padded = dataclasses.replace(lay, key_valid=torch.arange(37).unsqueeze(0) >= 3, shared={})
    general = dataclasses.replace(padded, key_doc=lay.doc.clone(), key_index=lay.index.clone(), shared={})
    dense = attend(q, k, v, padded, window, backend="sdpa")[:, :, 3:]
    assert rel(attend(q, k, v, padded, window, backend="flex")[:, :, 3:], dense) < 1e-5
    assert rel(attend(q, k, v, general, window, backend="flex")[:, :, 3:], dense) < 1e-5
    # the last 10 queries over all 37 keys (a cached prefix): the general mask
    tail = TokenLayout(position_ids=lay.position_ids[:, 27:], doc=lay.doc[:, 27:], index=lay.index[:, 27:],
                       key_doc=lay.doc, key_index=lay.index, key_valid=lay.key_valid)
    assert rel(attend(q[:, :, 27:], k, v, tail, window, backend="flex"), ref[:, :, 27:]) < 1e-5
    one = layout_for(torch.arange(37).unsqueeze(0))
    one.single_doc = True
    if window is None:
        assert rel(attend(q, k, v, one, None), attend(q, k, v, one, None, backend="sdpa")) < 1e-5
    # one document per row: flex's block mask from index arithmetic, kept across layouts (and
    # broadcast over a batch of two)
    dense = attend(q, k, v, one, window, backend="sdpa")
    assert rel(attend(q, k, v, one, window, backend="flex"), dense) < 1e-5
    q2, k2, v2 = (torch.cat([x, torch.randn_like(x)]) for x in (q, k, v))
    again = layout_for(torch.arange(37).expand(2, 37))
    again.single_doc = True
    flex2 = attend(q2, k2, v2, again, window, backend="flex")
    assert rel(flex2, attend(q2, k2, v2, again, window, backend="sdpa")) < 1e-5
    assert again.shared[(window, 37, 37)] is one.shared[(window, 37, 37)]
    assert lay.shared[(window, 37, 37)] is not one.shared[(window, 37, 37)]  # packed: its own


@pytest.mark.parametrize("window", [5, 8])
def test_the_dense_sliding_window_goes_by_blocks_of_queries(monkeypatch, window):
    """The dense path's sliding window built one (N, M) mask, with (N, M) int64 differences, and
    attended over all M keys: at 32k tokens on CPU an SWA layer took 11 GB, more than full
    attention. It now goes by blocks of queries over the keys their windows reach. Against a
    softmax written out here (float64, forward and every gradient): packed documents, padded
    keys, a cached prefix (keys trimmed to the window, as the cache keeps them), GQA, odd sizes."""
    from fastweights.layers import attention

    monkeypatch.setattr(attention, "_BAND_ROWS", 4)  # many blocks at small sizes
    torch.manual_seed(1)
    P, N = 9, 37  # cached tokens, new ones
    pos = torch.cat([torch.arange(15), torch.arange(13), torch.arange(18)]).expand(2, -1)  # 46 tokens
    doc = torch.cumsum((pos == 0).long(), 1) - 1
    valid = torch.ones(2, P + N, dtype=torch.bool)
    valid[1, :4] = False  # the second row's first keys: left padding
    index = torch.arange(P + N).expand(2, -1)
    M = min(P + N, window - 1 + N)  # the cache keeps the newest window - 1 keys
    lay = TokenLayout(position_ids=pos[:, P:], doc=doc[:, P:], index=index[:, P:], key_doc=doc, key_index=index,
                      key_valid=valid)
    q = torch.randn(2, 4, N, 6, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, M, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = attention.attend(q, k, v, lay, window, backend="sdpa")

    qi, ki = index[:, P:, None], index[:, None, -M:]
    see = (doc[:, P:, None] == doc[:, None, -M:]) & (ki <= qi) & (qi - ki < window) & valid[:, None, -M:]
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 6 ** 0.5
    ref = scores.masked_fill(~see[:, None], float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v)), strict=True):
        assert torch.allclose(g, r, atol=1e-12)
    assert any(key[0] == "dense" and key[3] not in (None, 0) for key in lay.last_keys(M).shared)  # by blocks


def test_a_cache_with_gradient_checkpointing_is_refused_for_ttt_mlps():
    """Training that continues a cache under gradient checkpointing raised torch's raw
    CheckpointError (the In-Place TTT state advances in place, so the recomputation saw other
    shapes); it is now refused by name, as for converted models. LaCT and attention states are
    not advanced in place: with them it trains, and equals the run without checkpointing."""
    from fastweights.errors import FastWeightsError

    ids, nxt = torch.randint(0, VOCAB, (2, 13)), torch.randint(0, VOCAB, (2, 9))
    model = tiny(["swa", "lact"], "inplace_ttt").train()
    model.gradient_checkpointing_enable()
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(FastWeightsError, match="gradient checkpointing cannot be combined with a cache"):
        model(nxt, past_key_values=cache, use_cache=True, labels=nxt)
    grads = []
    for checkpointing in (True, False):
        model = tiny(["swa", "lact"]).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        model(nxt, past_key_values=cache, use_cache=True, labels=nxt).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_config_keys_that_would_be_ignored_are_named(monkeypatch):
    """Keys that PreTrainedConfig keeps and the model ignores were taken silently: Qwen3's
    rope_theta (the model ran at rope_base 1e6), typos of this family's keys (lact_chunk, mixer).
    rope_theta is now read as rope_base, the others are refused; τ's error names its config key,
    and lact_glue='triton' without CUDA names itself at the first forward."""
    kw = dict(vocab_size=VOCAB, num_hidden_layers=1, hidden_size=24, intermediate_size=40, num_attention_heads=4,
              num_key_value_heads=2, lact_heads=2, lact_chunk_size=5, sliding_window=7)
    cfg = HybridConfig(rope_theta=1e4, **kw)
    assert cfg.rope_base == 1e4 and "rope_theta" not in cfg.to_dict()
    from fastweights.errors import FastWeightsWarning

    with pytest.warns(FastWeightsWarning, match="lact_overlap=True no longer exists"):  # a key of earlier releases
        assert "lact_overlap" not in HybridConfig(lact_overlap=True, **kw).to_dict()
    assert HybridConfig.from_dict(cfg.to_dict()).rope_base == 1e4
    for bad, match in ((dict(lact_chunk=64), r"unknown config keys \['lact_chunk'\].*'lact_chunk_size'"),
                       (dict(mixer="swa"), r"unknown config keys \['mixer'\].*'mixers'"),
                       (dict(ttt_max_update_norm=-1.0), "ttt_max_update_norm must be None"),
                       (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling is not supported"),
                       (dict(rope_theta=1e4, rope_base=5e5), "rope_theta 10000.0 and rope_base 500000.0 disagree")):
        with pytest.raises(ValueError, match=match):
            HybridConfig(**kw, **bad)
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        model = HybridForCausalLM(HybridConfig(lact_glue="triton", **kw))
        with pytest.raises(ValueError, match="LaCT glue='triton' \\(a hybrid config's lact_glue\\).*'auto' or 'torch'"):
            model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_call_leaves_the_hybrid_cache_as_it_was(error):
    """The cache's In-Place TTT token count moved on before the layers ran, and the layers before
    a failing one had stored their new states: a retry after an error gave wrong logits. Now a
    forward that raises (in a later layer, after LaCT, SWA, attention and TTT states advanced; in
    the head after the model; labels of a wrong shape) leaves the cache as it was, and the
    retries, across LaCT and TTT chunk ends, equal one full forward."""
    model = tiny(["lact", "swa", "attention"], "inplace_ttt").double()
    _perturb_fast_params(model)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 17))

    def fail(*args):
        raise error

    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        cache, got = out.past_key_values, [out.logits]
        for t0, t1 in ((6, 7), (7, 12), (12, 13), (13, 17)):
            for module in (model.model.layers[1], model.model.layers[2], model.lm_head):  # the head: after the model
                handle = module.register_forward_hook(fail)
                with pytest.raises(type(error)):
                    model(ids[:, t0:t1], past_key_values=cache)
                handle.remove()
                assert cache.get_seq_length() == t0 and cache.ttt_tokens == [t0, t0]
            with pytest.raises(ValueError, match="labels must be"):  # refused before the cache moves on
                model(ids[:, t0:t1], past_key_values=cache, labels=ids[:1, t0:t1])
            assert cache.get_seq_length() == t0
            got.append(model(ids[:, t0:t1], past_key_values=cache).logits)
    assert (torch.cat(got, 1) - want).abs().max() < 1e-10


def test_beam_search_with_cache_equals_without():
    """Beam search reorders the cache (fast weights included): cached equals uncached."""
    model = tiny(["lact", "swa"], "inplace_ttt")
    _perturb_fast_params(model)
    torch.manual_seed(4)
    prompt = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["lact", "swa", "attention"])
def test_cuda_bf16_block_matches_cpu_float32(mixer):
    """On CUDA (bf16, compiled flex attention) a mixer agrees with the float32 CPU path."""
    from fastweights.models.hybrid.modeling import HybridBlock, _layout

    cfg = HybridConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, mixers=mixer, sliding_window=128,
                       lact_heads=2, lact_chunk_size=128, lact_update="momentum")
    torch.manual_seed(0)
    mix = HybridBlock(cfg, 0).mixer
    _perturb_fast_params(mix)
    x = torch.randn(1, 700, 256)
    pos = torch.cat([torch.arange(300), torch.arange(400)]).unsqueeze(0)
    ref, _ = mix(x, _layout(pos, None, None, 1, 700, x.device))
    dev = torch.device("cuda")
    out, _ = mix.to(dev, torch.bfloat16)(x.to(dev, torch.bfloat16), _layout(pos.to(dev), None, None, 1, 700, dev))
    assert rel(out.float().cpu(), ref) < 3e-2


def _layer_grads(layer, x, pos):
    """Output and the gradients of x and every parameter, for a fixed random cotangent."""
    from fastweights.models.hybrid.modeling import _layout

    x = x.clone().requires_grad_(True)
    y, _ = layer(x, _layout(pos, None, None, pos.shape[0], pos.shape[1], x.device))
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(y)
    params = [p for p in layer.parameters() if p.requires_grad]
    return [y, *torch.autograd.grad(y, [x, *params], cot, allow_unused=True)]


def test_lact_layer_compiled_glue_equals_eager(monkeypatch):
    """The branch's elementwise glue compiles as whole graphs (fullgraph, traced with aot_eager
    here: what inductor fuses on CUDA) and gives the eager output and every gradient; training
    calls use it, cached calls do not."""
    import fastweights.layers.lact as lact_layer

    torch.manual_seed(0)
    layer = LaCTLayer(48, 4, fw_heads=4, window=8, chunk_size=8, update="muon").double()
    _perturb_fast_params(layer)
    x = torch.randn(2, 21, 48, dtype=torch.float64)
    pos = torch.arange(21).expand(2, 21)
    want = _layer_grads(layer, x, pos)
    seen = []

    def glue(fn, name, x, training, impl):
        seen.append((name, training))
        ref = lact_layer.REFERENCES[fn]  # the torch form, as CUDA compiles it without Triton
        return torch.compile(ref, backend="aot_eager", fullgraph=True, dynamic=False) if training else ref

    monkeypatch.setattr(lact_layer, "_glue", glue)
    got = _layer_grads(layer, x, pos)
    assert seen == [("layer-inputs", True), ("layer-merge", True)]
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None) and (a is None or rel(a, b) < 1e-12)
    seen.clear()
    with torch.no_grad():
        cached, _ = layer(x, layout_for(pos), use_cache=True)
    assert rel(cached, want[0]) < 1e-12
    assert seen == [("layer-inputs", False), ("layer-merge", False)]


@pytest.mark.gpu
@pytest.mark.parametrize("glue", ["torch", "triton"])
def test_lact_layer_compiled_on_cuda_matches_cpu_float64(glue):
    """Training call on CUDA in float32 (chunk loop compiled by torch.compile; the glue compiled
    too, or its Triton kernels) against the float64 CPU layer: output and every gradient."""
    torch.manual_seed(0)
    layer = LaCTLayer(64, 4, fw_heads=2, window=16, chunk_size=16, update="muon").double()
    _perturb_fast_params(layer)
    x = torch.randn(1, 75, 64, dtype=torch.float64)
    pos = torch.arange(75).unsqueeze(0)
    layer.glue = "torch"
    want = _layer_grads(layer, x, pos)
    layer.glue = glue
    dev = torch.device("cuda")
    got = _layer_grads(layer.to(dev, torch.float32), x.to(dev, torch.float32), pos.to(dev))
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None) and (a is None or rel(a.double().cpu(), b) < 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("glue", ["torch", "triton"])
def test_lact_layer_cuda_graphs_match_cpu_float64(monkeypatch, glue):
    """The layer's graphed loop takes its inputs and hands its output and gradients over without copies
    (``LoopGraphs(reuse_outputs=True)``): three training steps on fresh inputs (replays) match
    the float64 CPU layer, output and every gradient, and each step's parameter gradients stay as
    they were after the next step's replay."""
    monkeypatch.setenv("FASTWEIGHTS_LACT_COMPILE", "graphs")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    layer = LaCTLayer(64, 4, fw_heads=2, window=16, chunk_size=16, update="muon", glue="torch").double()
    _perturb_fast_params(layer)
    dev = torch.device("cuda")
    gpu = copy.deepcopy(layer).to(dev, torch.float32)
    gpu.glue = glue
    assert gpu.graphs.reuse_outputs
    import fastweights.ops.lact_glue as lact_glue
    from fastweights.models.hybrid.modeling import _layout

    launch, into_buffers = lact_glue._inputs_launch, []

    def spy(*a, **k):  # the forward kernels: do they write into the loop's input buffers?
        if not a[8]:
            into_buffers.append(k.get("out") is not None)
        return launch(*a, **k)

    monkeypatch.setattr(lact_glue, "_inputs_launch", spy)
    kept = None
    for step in range(3):
        x = torch.randn(1, 75, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + step))
        pos = torch.arange(75).unsqueeze(0)
        monkeypatch.setenv("FASTWEIGHTS_LACT_COMPILE", "0")
        want = _layer_grads(layer, x, pos)
        monkeypatch.setenv("FASTWEIGHTS_LACT_COMPILE", "graphs")
        got = _layer_grads(gpu, x.to(dev, torch.float32), pos.to(dev))
        assert len(gpu.graphs._entries) == 1
        for a, b in zip(got, want, strict=True):
            assert (a is None) == (b is None) and (a is None or rel(a.double().cpu(), b) < 1e-3), step
        if kept is not None:
            for g, c in kept:
                assert torch.equal(g, c), step
        kept = [(g, g.clone()) for g in got[1:] if g is not None]
    # Triton: q_f, k_f, v_f go straight into the graphs' buffers once a capture exists (steps 2, 3)
    assert into_buffers == ([False] * 3 + [True] * 6 if glue == "triton" else []), into_buffers
    # a second forward before the first one's backward: that backward raises, never stale gradients
    x = torch.randn(1, 75, 64, device=dev)
    lay = _layout(torch.arange(75, device=dev).unsqueeze(0), None, None, 1, 75, dev)
    first, _ = gpu(x, lay)
    gpu(x, lay)[0].sum().backward()
    with pytest.raises(RuntimeError, match="overwritten by a later forward"):
        first.sum().backward()


def test_activation_checkpointing_refuses_lact_cuda_graphs(monkeypatch):
    """LaCT's CUDA-graph mode cannot be captured under checkpointing: the model says so by name
    (the mode resolution is forced here; on CPU it would fall back to eager)."""
    import fastweights.models.hybrid.modeling as modeling
    from fastweights.models.compat import enable_activation_checkpointing

    monkeypatch.setattr(modeling, "_resolve_compile", lambda compile, device: "graphs")
    model = tiny(["lact", "swa"], "swiglu").train()
    enable_activation_checkpointing(model)
    batch = _corpus(1, 16)
    with pytest.raises(ValueError, match="FASTWEIGHTS_LACT_COMPILE=graphs cannot be combined with activation"):
        model(batch, labels=batch)
    with torch.no_grad():  # no gradients, no checkpointing: allowed
        model(batch)


@pytest.mark.gpu
def test_activation_checkpointing_refuses_lact_cuda_graphs_on_cuda(monkeypatch):
    """The same refusal on CUDA, reached through the environment variable itself."""
    from fastweights.models.compat import enable_activation_checkpointing

    monkeypatch.setenv("FASTWEIGHTS_LACT_COMPILE", "graphs")
    model = tiny(["lact", "swa"], "swiglu").cuda().train()
    enable_activation_checkpointing(model)
    batch = _corpus(1, 16).cuda()
    with pytest.raises(ValueError, match="FASTWEIGHTS_LACT_COMPILE=graphs cannot be combined with activation"):
        model(batch, labels=batch)


@pytest.mark.gpu
def test_activation_checkpointing_on_cuda_with_compiled_lact():
    """On CUDA the LaCT chunk loop is compiled; with activation checkpointing its recomputation
    in backward gives the loss and gradients of the plain backward (float32)."""
    from fastweights.models.compat import enable_activation_checkpointing

    batch = _corpus(2, 64).cuda()
    grads = []
    for ckpt in (False, True):
        model = tiny(["lact", "swa"], "swiglu", hidden_size=64, lact_chunk_size=16, sliding_window=16,
                     lact_update="muon").cuda().train()
        _perturb_fast_params(model)
        if ckpt:
            enable_activation_checkpointing(model)
        loss = model(batch, labels=batch).loss
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert rel(b, a) < 1e-4


def test_the_cache_continues_under_either_name():
    """``cache=`` (transformers >= 5.24) and ``past_key_values=`` continue a hybrid cache alike."""
    model = tiny(["attention", "lact"], "inplace_ttt").double()
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    errors = continuation_errors(model, ids, 8)
    assert max(errors.values()) < 1e-10, errors


def test_generate_with_chunked_prefill_equals_plain_generate():
    """prefill_chunk_size needs a cache before the first forward: generate gets a HybridCache."""
    model = tiny(["lact", "swa"], mlps="inplace_ttt")
    _perturb_fast_params(model)
    x = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.generate(x, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False, prefill_chunk_size=5), ref)
        assert torch.equal(greedy_by_full_forwards(model, x, 6), ref)
        with pytest.raises(FastWeightsError, match="cannot carry"):
            model.generate(x, max_new_tokens=2, cache_implementation="static")


def test_generate_continues_from_its_returned_cache_on_the_uncached_tokens():
    """Hugging Face's cache re-use: generate(sequences, full mask, past_key_values=returned cache).
    The cache's empty layer list made ``all(cache.is_linear)`` true, so transformers fed the whole
    prompt again: refused by the mask check (left padding), or the prefix read twice (a prompt
    cache filled by hand). Only the uncached tokens go in now, and the result is one-shot's."""
    model = tiny(["attention", "lact"], mlps="inplace_ttt", pad_token_id=0)
    _perturb_fast_params(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        part = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert part.past_key_values.seen == 11
        mask2 = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
        out = model.generate(part.sequences, attention_mask=mask2, past_key_values=part.past_key_values,
                             max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref) and out.past_key_values.seen == 14
        prompt = ids[:1]  # a prompt cache filled by hand, then generate from the whole prompt
        cache = model(prompt[:, :6], use_cache=True).past_key_values
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
        assert torch.equal(out.sequences, model.generate(prompt, max_new_tokens=4, do_sample=False))
        assert out.past_key_values.seen == 9 + 3


@pytest.mark.parametrize("name", ["qkv_proj", "gate_proj", "lr_proj"])
def test_an_adapter_on_a_lact_weight_read_directly_is_refused(name):
    """LaCT stacks or splits these weights itself: an adapter wrapping them would be ignored."""
    model = tiny(["lact", "swa"])
    mixer = model.model.layers[0].mixer
    setattr(mixer, name, Adapter(getattr(mixer, name)))
    with pytest.raises(FastWeightsError, match=f"{name} of a LaCT layer is wrapped by Adapter"):
        model(torch.randint(0, VOCAB, (1, 9)), use_cache=False)


@pytest.mark.parametrize("glue", ["auto", "torch"])
@pytest.mark.parametrize("mode", ["eval", "train", "cached"])
def test_lact_runs_under_cpu_bf16_autocast(glue, mode):
    """A LaCT model (float32 weights) under bf16 autocast: eval, training (with gradients) and
    cached decoding give bf16 logits within bf16 error of float32 (the fast branch's RoPE
    in float32 once promoted q_f, k_f to float32 while v_f stayed bf16, and the op refused)."""
    model = tiny(["lact", "swa"], lact_glue=glue, lact_update="gd")
    _perturb_fast_params(model)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if mode == "train":
            model.train()
            out = model(ids, labels=ids)
            out.loss.backward()
            logits = out.logits
        elif mode == "eval":
            logits = model(ids, use_cache=False).logits
        else:
            out = model(ids[:, :6], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(6, 13):
                out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
            logits = torch.cat(steps, 1)
    assert logits.dtype == torch.bfloat16
    assert rel(logits.float(), ref) < 2e-2  # measured 4e-3
    if mode == "train":
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 and bool(g.isfinite().all()) for g in grads)


@pytest.mark.parametrize("via", ["argument", "config"])
def test_return_dict_false_gives_tuples_as_qwen3(via):
    """``return_dict=False`` (argument or ``config.return_dict``) gives the outputs' tuples, None
    fields left out, in Qwen3's order for the same call: (loss, logits, cache, hidden_states)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = tiny(["lact", "swa"])
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=6)).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    calls = [{}, {"labels": ids}, {"use_cache": True}, {"labels": ids, "use_cache": True, "output_hidden_states": True}]
    for kw in calls:
        kw = {"use_cache": False, **kw}
        with torch.no_grad():
            full = model(ids, **kw)
            theirs = qwen(ids, **kw, return_dict=False)  # (Qwen3 5.24 itself fails with config.return_dict=False)
            if via == "config":
                model.config.return_dict = False
                ours = model(ids, **kw)
                model.config.return_dict = True
            else:
                ours = model(ids, **kw, return_dict=False)
            base_kw = {k: v for k, v in kw.items() if k != "labels"}
            base_full = model.model(ids, **base_kw)
            base = model.model(ids, **base_kw, return_dict=False) if via == "argument" else None
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert type(a) is type(b) or (hasattr(a, "get_seq_length") and hasattr(b, "get_seq_length"))
        assert torch.equal(ours[1 if "labels" in kw else 0], full.logits)
        if "labels" in kw:
            assert torch.equal(ours[0], full.loss)
        if base is not None:
            assert isinstance(base, tuple) and len(base) == 1 + kw["use_cache"] + bool(kw.get("output_hidden_states"))
            assert torch.equal(base[0], base_full.last_hidden_state)


def test_logits_to_keep_takes_an_int_or_an_index_tensor():
    """``logits_to_keep``: an int keeps the last positions, a 1-D tensor selects positions (as
    transformers' decoders; a tensor once failed on ``if logits_to_keep``)."""
    model = tiny(["lact", "swa"])
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert torch.allclose(model(ids, use_cache=False, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
        index = torch.tensor([0, 4, 2])
        kept = model(ids, use_cache=False, logits_to_keep=index).logits
        per_row = torch.tensor([[0, 6], [3, 1]])  # (B, K) positions of each row (gave (B, B, K, V))
        rows = model(ids, use_cache=False, logits_to_keep=per_row).logits
        mask = torch.tensor([[True, False, False, True, False, False, True], [False] * 6 + [True]])
        flat = model(ids, use_cache=False, logits_to_keep=mask).logits  # (count, V) (was an IndexError)
    assert kept.shape == (2, 3, VOCAB) and torch.allclose(kept, full[:, index], atol=1e-6)
    assert rows.shape == (2, 2, VOCAB) and torch.allclose(rows, torch.stack([full[0, [0, 6]], full[1, [3, 1]]]),
                                                          atol=1e-6)
    assert flat.shape == (4, VOCAB) and torch.allclose(flat, full[mask], atol=1e-6)
    from fastweights.models import compat

    x = torch.randn(2, 7, 5)
    for keep in (0, 3, index, per_row, mask):  # without transformers' own function (5.17): the same
        with mock.patch.object(compat, "_slice_logits_to_keep", None):
            ours = compat.keep_positions(x, keep)
        assert torch.equal(ours, compat.keep_positions(x, keep) if compat._slice_logits_to_keep else ours)
    assert torch.equal(compat.keep_positions(x, per_row), torch.stack([x[0, [0, 6]], x[1, [3, 1]]]))


def test_the_trainers_prediction_step_leaves_the_cache_out():
    """HF Trainer.predict/evaluate keep the output fields not in config.keys_to_ignore_at_inference:
    'past_key_values' alone left transformers 5.24's 'cache' in, and the Trainer could not pad it."""
    model = tiny(["lact", "swa"])
    with torch.no_grad():
        out = model(torch.randint(0, VOCAB, (2, 7)), use_cache=True)
    kept = [k for k in out.keys() if k not in model.config.keys_to_ignore_at_inference + ["loss"]]
    assert kept == ["logits"], kept


def test_attention_mask_must_cover_the_cache_and_the_input():
    """attention_mask (B, M) needs M = cached + N (transformers' meaning). Longer without a cache
    once took positions from the missing columns and changed the output silently; it is refused,
    naming M, N and the missing cache."""
    model = tiny(["lact", "swa"])
    ids = torch.randint(0, VOCAB, (2, 6))
    ones = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\(2, 6\).*got \(2, 8\): no cache holds the 2 tokens"):
            model(ids, attention_mask=ones, use_cache=False)
        with pytest.raises(ValueError, match=r"\(2, 6\).*got \(2, 8\): no cache"):
            model(ids, attention_mask=ones, past_key_values=HybridCache(model.config))
        cache = model(ids[:, :4], attention_mask=ones[:, :4], use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"\(2, 6\), M = 4 cached tokens \+ N=2 new ones, got \(2, 5\)"):
            model(ids[:, 4:], attention_mask=ones[:, :5], past_key_values=cache)
        assert torch.equal(model(ids, attention_mask=ones[:, :6], use_cache=False).logits,
                           model(ids, use_cache=False).logits)


@pytest.mark.parametrize("shape", [(1, 5), (3, 6), (2, 6, 1), (7,)])
def test_position_ids_of_another_shape_are_refused_by_name(shape):
    model = tiny(["lact", "swa"])
    ids = torch.randint(0, VOCAB, (2, 6))
    msg = f"position_ids must be (B, N) = (2, 6), (1, N) or (N,), got {shape}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        model(ids, position_ids=torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("mixers,mlps", [(["lact", "swa"], "swiglu"), (["attention", "lact"], "inplace_ttt")])
def test_an_empty_batch_runs_and_an_empty_sequence_is_refused(mixers, mlps):
    """B = 0 gives empty logits, with or without a cache and through a cached step (once raw
    reshape/max errors); N = 0 is refused by name (once an IndexError)."""
    model = tiny(mixers, mlps)
    ids = torch.randint(0, VOCAB, (0, 6))
    with torch.no_grad():
        assert model(ids, use_cache=False).logits.shape == (0, 6, VOCAB)
        out = model(ids, attention_mask=torch.ones(0, 6, dtype=torch.long), use_cache=True)
        assert out.logits.shape == (0, 6, VOCAB)
        step = model(ids[:, :1], attention_mask=torch.ones(0, 7, dtype=torch.long), past_key_values=out.past_key_values)
        assert step.logits.shape == (0, 1, VOCAB)
        for kw in ({"use_cache": False}, {"use_cache": True}):
            with pytest.raises(ValueError, match=r"no tokens: \(B, N\) = \(2, 0\); a fastweights_hybrid model needs "
                                                 r"N >= 1$"):
                model(torch.zeros(2, 0, dtype=torch.long), **kw)
        cache = model(torch.zeros(1, 4, dtype=torch.long), use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"generate\(\) with a returned cache takes the whole sequence, or the "
                                             r"new tokens with the full attention_mask"):  # what generate slices to
            model(torch.zeros(1, 0, dtype=torch.long), past_key_values=cache)


@pytest.mark.parametrize("mixers", [["swa", "attention"], ["lact", "swa"]])
def test_flex_backend_on_cpu_refuses_gradients_by_name(mixers):
    """attn_backend='flex' is accepted at config time (configs are built on CPU before moving to a
    GPU) and runs on CPU without gradients; a call that takes gradients on CPU is refused naming
    the backend and the CPU choices (was torch's NotImplementedError from the backward)."""
    model = tiny(mixers, attn_backend="flex")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref = tiny(mixers)(ids, use_cache=False).logits
        assert rel(model(ids, use_cache=False).logits, ref) < 1e-5
    model.train()
    with pytest.raises(ValueError, match=r"attn_backend='flex' cannot take gradients on CPU.*'auto' or 'sdpa'"):
        model(ids, labels=ids).loss.backward()


def test_labels_with_a_cut_logits_to_keep_are_named():
    """labels with logits_to_keep=1 failed inside cross_entropy ("Expected input batch_size (0) to
    match target batch_size (12)")."""
    model = tiny(["lact", "swa"])
    ids = torch.randint(0, VOCAB, (2, 7))
    for keep in (1, torch.arange(7).flip(0)):  # positions cut, or all of them in another order
        with pytest.raises(ValueError, match=r"labels need the logits of every position, in order: pass "
                                             r"logits_to_keep=0"):
            model(ids, labels=ids, logits_to_keep=keep)
    with pytest.raises(ValueError, match=r"labels must be \(B, N\) = \(2, 7\), as the input, got \(2, 3\)"):
        model(ids, labels=ids[:, :3])
    assert torch.isfinite(model(ids, labels=ids).loss)
