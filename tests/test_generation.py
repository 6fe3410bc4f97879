"""Generation with fast weights: cached decoding equals a full forward pass (issue 4).

Every test uses a tiny random model (d = 24, f = 40, so the factored state turns dense at
n = d·f/(d+f) = 15 tokens) whose conv and P are non-zero, so the fast weights change the logits.
"""

import copy

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, continuation_errors, tiny_model
from transformers import DynamicCache

from fastweights.errors import FastWeightsError
from fastweights.models import InPlaceTTTCache, convert, ttt_modules
from fastweights.models.compat import enable_activation_checkpointing

D, F = 24, 40  # tiny_model's widths


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: extra threads only add overhead (and the CI machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base_model(family="qwen3", layers=3, seed=0):
    return tiny_model(family, layers=layers, seed=seed, max_position_embeddings=32768, pad_token_id=0)


def ttt_model(family="qwen3", chunk=5, target="hidden", seed=0, layers=3, ttt_layers=(0, 2)):
    """A converted model with non-zero conv and P (a fresh conversion has a zero conv)."""
    model = convert(base_model(family, layers, seed), layers=list(ttt_layers), chunk_size=chunk, lr=0.5,
                    target=target)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in ttt_modules(model):
            m.ttt_conv.weight.copy_(torch.randn(m.ttt_conv.weight.shape, generator=g) * 0.5)
            m.ttt_proj.weight.copy_(torch.randn(m.ttt_proj.weight.shape, generator=g) * 0.3)
    return model


def left_padded(batch, length, pads, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = 0, 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate passes
    return ids, mask, pos


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@torch.no_grad()
def stepwise(model, ids, mask, pos, prefill, **cache_kw):
    """Prefill ``prefill`` columns through a new cache, then one token at a time."""
    cache = InPlaceTTTCache(model.config, **cache_kw)
    out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                    past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, 1), out.past_key_values


# --------------------------------------------------------------------------- exactness
# (batch, left pads, prefill columns): with C = 5, the 10-token prefill of row 0 ends exactly on a
# chunk boundary; the other rows (and row 0 later) complete chunks in the middle of decoding.
CASES = {"batch1": (1, [0], 10), "batch3-left-padded": (3, [0, 2, 6], 10)}


@pytest.mark.parametrize("form", ["auto", "dense", "factored"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stepwise_decoding_equals_full_forward(case, form):
    batch, pads, prefill = CASES[case]
    model = ttt_model(chunk=5)
    ids, mask, pos = left_padded(batch, 27, pads)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        frozen = ttt_model(chunk=5)
        for m in ttt_modules(frozen):
            m.ttt_conv.weight.zero_()
        plain = frozen(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    step, cache = stepwise(model, ids, mask, pos, prefill, state_form=form)
    real = mask.bool()
    assert rel(step[real], full[real]) < 1e-5
    assert rel(plain[real], full[real]) > 1e-3  # the fast weights do change the logits
    assert isinstance(cache, InPlaceTTTCache)
    assert cache.ttt_tokens == [27 - p for p in pads]
    for state in cache.ttt_states.values():
        if form in ("auto", "dense"):
            assert state.dense is not None and state.past_z is None  # 20 > 15 completed tokens
        else:
            assert state.dense is None and state.past_z.shape == (batch, 25, F)  # row 0: 25 completed


def test_padding_never_enters_the_fast_weights():
    """Each left-padded row equals the same tokens run alone, unpadded, through cache and full forward."""
    model = ttt_model(chunk=4)
    pads = [0, 3, 7]
    ids, mask, pos = left_padded(3, 19, pads, seed=3)
    ids[1, :3] = torch.tensor([5, 6, 7])  # padding content must not matter either
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        no_pos = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # arange positions
    step, _ = stepwise(model, ids, mask, pos, 9)
    for b, p in enumerate(pads):
        with torch.no_grad():
            alone = model(input_ids=ids[b:b + 1, p:], use_cache=False).logits[0]
        assert rel(full[b, p:], alone) < 1e-5
        assert rel(step[b, p:], alone) < 1e-5
        assert rel(no_pos[b, p:], alone) < 1e-5  # RoPE is relative: only the mask matters


def test_padding_inside_streamed_pieces_is_skipped():
    """Gaps of padding inside and across streamed pieces: each row equals its real tokens alone."""
    model = ttt_model("llama", chunk=4)
    ids = torch.randint(1, VOCAB, (2, 30), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 7:10] = 0  # inside the first piece
    mask[0, 16:21] = 0  # across the second and third pieces
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cuts = [0, 10, 18, 19, 30]
    with torch.no_grad():
        cache, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            outs.append(out.logits)
        step = torch.cat(outs, 1)
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        for r in range(2):
            keep = mask[r].bool()
            alone = model(input_ids=ids[r:r + 1, keep], use_cache=False).logits[0]
            assert rel(step[r, keep], alone) < 1e-5
            assert rel(full[r, keep], alone) < 1e-5
    assert cache.ttt_tokens == [25, 27]


def test_embed_target_and_document_restart():
    """target='embed' through the cache; position_ids restarting at 0 start a new fast-weight document."""
    model = ttt_model(chunk=3, target="embed")
    ids, mask, _ = left_padded(2, 22, [0, 0], seed=5)
    pos = torch.cat([torch.arange(13), torch.arange(9)]).expand(2, 22).clone()
    with torch.no_grad():  # with a mask, transformers keeps attention causal across the restart, as cached
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    for prefill in (7, 14):  # the restart inside the prefill, or during decoding
        step, _ = stepwise(model, ids, mask, pos, prefill)
        assert rel(step, full) < 1e-5


def test_state_switches_to_dense_exactly_when_smaller():
    """Factored while n·(d+f) < d·f (n < 15), dense from then on; at most d·f numbers per row."""
    model = ttt_model(chunk=4)
    ids, mask, pos = left_padded(1, 21, [0], seed=7)
    cache = InPlaceTTTCache(model.config)
    seen = []
    with torch.no_grad():
        for t in range(21):
            model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            state = cache.ttt_states[0]
            n = (t + 1) // 4 * 4
            seen.append((n, state.dense is not None, state.numel()))
    for n, dense, numel in seen:
        assert dense == (n * (D + F) >= D * F)
        assert numel == (D * F if dense else n * (D + F))
        assert numel <= D * F
        assert cache.ttt_states[0].buf_z.shape[1] <= 4  # one chunk of buffered activations


def test_streaming_pieces_equal_one_forward():
    """64 pieces of 256 tokens, each call continuing the cache, equal one pass over 16384 tokens."""
    model = ttt_model(chunk=200, layers=1, ttt_layers=(0,))  # one layer: full attention over 16k is the cost
    g = torch.Generator().manual_seed(11)
    doc = torch.randint(1, VOCAB, (1, 64 * 256), generator=g)
    with torch.no_grad():
        full = model(input_ids=doc, use_cache=False).logits
        cache, pieces = None, []
        for i in range(64):
            out = model(input_ids=doc[:, 256 * i:256 * (i + 1)], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
    assert rel(torch.cat(pieces, 1), full) < 1e-5
    assert cache.ttt_tokens == [64 * 256]


def test_streaming_under_autocast_and_with_mixed_dtypes():
    """The fast-weight state under CPU bf16 autocast (generate, padded batches) raised dtype errors
    (a bf16 buffer for the float32 target source, bf16 products added into float32 sums), and a
    float64 z with float32 weights failed on the second call."""
    from fastweights.ops.inplace_ttt_decode import InPlaceTTTState, StepPlan

    model = ttt_model(chunk=4)
    ids, mask, pos = left_padded(2, 11, [0, 3])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        cache, steps = None, []
        for i in range(ids.shape[1]):  # token by token through the cache
            out = model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1],
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits.float())
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert rel(torch.cat(steps, 1)[real], full[real]) < 2e-2 and rel(full[real], ref[real]) < 2e-2  # bf16 rounding
    assert gen.shape == (2, 17)
    # float64 activations with float32 weights: the state computes in float64, as the op does
    from fastweights.ops import inplace_ttt

    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 9, F, dtype=torch.float64, generator=g)
    x = torch.randn(2, 9, D, dtype=torch.float64, generator=g)
    w0, conv = torch.randn(D, F, generator=g) * 0.2, torch.randn(D, 1, 5, generator=g)
    proj = torch.randn(D, D, generator=g)
    want = inplace_ttt(z, x, w0, conv, proj, 0.7, 4)
    st = InPlaceTTTState(4)
    parts = [st.step(z[:, i:j], x[:, i:j], w0, conv, proj, 0.7, StepPlan([i, i], j - i, None, None))
             for i, j in ((0, 5), (5, 6), (6, 9))]
    assert want.dtype == parts[0].dtype == torch.float64 and (torch.cat(parts, 1) - want).abs().max() < 1e-12


# --------------------------------------------------------------------------- generate
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_greedy_and_beam_match_uncached(family):
    """Left-padded batch, prompts of several chunks, generation across chunk boundaries."""
    model = ttt_model(family, chunk=4)
    ids, mask, _ = left_padded(3, 14, [0, 3, 5], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=9, min_new_tokens=9, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, return_dict_in_generate=True, **kw)
        ref = model.generate(ids, do_sample=False, use_cache=False, **kw)
        beam = model.generate(ids, num_beams=3, do_sample=False, **kw)
        beam_ref = model.generate(ids, num_beams=3, do_sample=False, use_cache=False, **kw)
    assert isinstance(out.past_key_values, InPlaceTTTCache)
    assert torch.equal(out.sequences, ref)
    assert torch.equal(beam, beam_ref)
    # greedy by hand, full forward each step: the same tokens
    seq, m = ids, mask
    for _ in range(9):
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_sampling_matches_uncached(family):
    model = ttt_model(family, chunk=3)
    ids, mask, _ = left_padded(2, 8, [0, 2], seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, pad_token_id=0, do_sample=True, top_k=0)
    with torch.no_grad():
        torch.manual_seed(0)
        cached = model.generate(ids, **kw)
        torch.manual_seed(0)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------- bad input
def test_cache_mismatch_raises():
    model = ttt_model(chunk=4)
    plain = base_model()
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        plain_cache = plain(input_ids=ids, use_cache=True).past_key_values
        assert type(plain_cache) is DynamicCache
        with pytest.raises(FastWeightsError, match="needs an InPlaceTTTCache"):
            model(input_ids=ids[:, :1], past_key_values=plain_cache, use_cache=True)
        ttt_cache = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(FastWeightsError, match="not an In-Place TTT layer"):
            plain(input_ids=ids[:, :1], past_key_values=ttt_cache, use_cache=True)
        ttt_cache = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="batch size changed"):
            model(input_ids=ids[:1, :1], past_key_values=ttt_cache, use_cache=True)
        with pytest.raises(FastWeightsError, match="cannot crop"):
            ttt_cache.crop(3)
        ttt_cache.crop(0)  # removes nothing (transformers 5: crop(n <= 0) removes -n tokens)
        assert ttt_cache.get_seq_length() == 6
        with pytest.raises(FastWeightsError, match="cannot carry"):
            model.generate(ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def test_assisted_decoding_is_refused_up_front_and_a_static_cache_without_a_cache_runs():
    """Prompt-lookup decoding raised from the cache's crop, and only once a candidate was
    rejected (after forward passes had run); cache_implementation='static' with use_cache=False
    (transformers ignores the cache kind then) was refused."""
    model = ttt_model(chunk=4)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7, 8, 5, 6]])
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for kw in ({"prompt_lookup_num_tokens": 2}, {"assistant_model": copy.deepcopy(model)}):
        with pytest.raises(FastWeightsError, match=r"assisted or speculative decoding .* not supported by "
                                                   r"InPlaceTTTQwen3ForCausalLM"):
            model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)
    assert not calls
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
        static = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False,
                                cache_implementation="static")
    assert torch.equal(plain, static)


def test_continuous_batching_is_refused_up_front():
    """generate(cache_implementation="paged") returned the prompts alone (the refusal was only logged
    by transformers' background thread) and generate_batch returned failed requests; every entry to
    continuous batching now raises by name, before any thread starts or any forward pass runs."""
    import threading

    model = ttt_model(chunk=4)
    ids = torch.randint(1, VOCAB, (2, 6))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    threads = [t for t in threading.enumerate() if not t.daemon]  # the generation loop's is not (tqdm's monitor is)
    refused = r"continuous batching .* is not supported by InPlaceTTTQwen3ForCausalLM: its paged cache"
    with pytest.raises(FastWeightsError, match=refused):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="paged")
    with pytest.raises(FastWeightsError, match=refused):
        model.generate_batch(ids.tolist(), max_new_tokens=3)
    with pytest.raises(FastWeightsError, match=refused), model.continuous_batching_context_manager():
        pass
    with pytest.raises(FastWeightsError, match=refused):
        model.init_continuous_batching()
    assert not calls and [t for t in threading.enumerate() if not t.daemon] == threads


@pytest.mark.parametrize("other", [dict(chunk=4), dict(target="embed"), dict(chunk=8, target="embed")])
def test_a_cache_of_a_model_with_other_ttt_settings_is_refused(other):
    """Same TTT layers, another chunk or target: the cache's fast weights would be read wrongly."""
    a = ttt_model(chunk=8)
    b = ttt_model(**{"chunk": 8, **other})
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        cache = a(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(FastWeightsError, match="made for another model's fast weights: ttt_"):
            b(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
        a(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)  # its own model continues it
    assert InPlaceTTTCache(b.config).ttt_settings["ttt_target"] == other.get("target", "hidden")


def test_default_caches():
    """use_cache=True (or the config default) gives an InPlaceTTTCache; training mode gives none by default."""
    model = ttt_model(chunk=4)
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        assert isinstance(model(input_ids=ids).past_key_values, InPlaceTTTCache)
        assert model(input_ids=ids, use_cache=False).past_key_values is None
        model.train()
        assert model(input_ids=ids).past_key_values is None
        assert isinstance(model(input_ids=ids, use_cache=True).past_key_values, InPlaceTTTCache)


def test_padded_training_with_gradient_checkpointing():
    """The recomputation in backward sees the same padding (hooks do not re-run on transformers 5.23)."""
    ids, mask, _ = left_padded(2, 17, [0, 4], seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = ttt_model(chunk=4).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if checkpointing:
            with pytest.raises(FastWeightsError, match="gradient checkpointing"):
                model(input_ids=ids, past_key_values=InPlaceTTTCache(model.config), use_cache=True)
    assert rel(grads[1], grads[0]) < 1e-6


@pytest.mark.parametrize("target,reentrant", [("hidden", False), ("hidden", True), ("embed", False)])
def test_checkpointing_with_several_forwards_before_backward(target, reentrant):
    """Each recomputed layer reads its own call's documents, padding and embeddings, even after
    later calls: a packed call, then a padded one and a no-grad one, then one backward (float64)."""
    base = ttt_model(chunk=4, target=target).double().train()
    a = torch.randint(1, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    pos_a = torch.cat([torch.arange(8), torch.arange(12)])[None]  # two packed documents
    b, mask_b, _ = left_padded(2, 17, [0, 4], seed=2)

    def grads(model):
        loss = model(a, labels=a, position_ids=pos_a).loss
        loss = loss + 0.5 * model(b, attention_mask=mask_b, labels=b.masked_fill(mask_b == 0, -100)).loss
        with torch.no_grad():
            model(b[:, :5])
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref = grads(copy.deepcopy(base))
    model = copy.deepcopy(base)
    enable_activation_checkpointing(model, use_reentrant=reentrant)
    assert (grads(model) - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_embed_target_refuses_reentrant_checkpointing():
    model = ttt_model(chunk=4, target="embed").double().train()
    enable_activation_checkpointing(model, use_reentrant=True)
    ids = torch.randint(1, VOCAB, (1, 9))
    with pytest.raises(FastWeightsError, match="target='embed' cannot be trained with reentrant"):
        model(ids, labels=ids)
    with torch.no_grad():  # nothing to differentiate: allowed
        model(ids)
    # frozen embeddings (only the fast-weight parameters train): allowed, and exact
    for name, p in model.named_parameters():
        p.requires_grad_("ttt_" in name)
    plain = copy.deepcopy(model)
    plain.gradient_checkpointing_disable()
    grads = []
    for m in (plain, model):
        m(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-14)


def test_a_decoder_layer_called_alone_reads_its_own_documents():
    """Outside a model call, a TTT layer takes position_ids from its own kwargs (float64)."""
    model = ttt_model(chunk=4).double()
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    layer, seen = model.model.layers[0], {}
    layer.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("in", (a, dict(kw))), with_kwargs=True)
    layer.register_forward_hook(lambda m, a, kw, out: seen.__setitem__("out", out), with_kwargs=True)
    with torch.no_grad():
        model(ids, position_ids=pos, use_cache=False)
        args, kw = seen["in"]
        inside = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
        alone = layer(*args, **{k: v for k, v in kw.items() if not k.startswith("_fastweights")})
        alone = alone[0] if isinstance(alone, tuple) else alone
    assert torch.equal(alone, inside)


def test_the_cache_under_either_name_and_no_context_left_after_an_error():
    """``cache=`` and ``past_key_values=`` continue alike on every transformers release; an error
    inside a layer leaves no call's inputs behind in its MLPs."""
    model = ttt_model(chunk=4).double()
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    errors = continuation_errors(model, ids, 8)
    assert max(errors.values()) < 1e-12, errors
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: 1 / 0, with_kwargs=True)
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        model(ids)
    assert all(m.ctx is None for m in ttt_modules(model))


def _raise(error):
    def hook(*args):
        raise error
    return hook


@pytest.mark.parametrize("form", ["auto", "dense", "factored"])
def test_a_failed_call_leaves_the_cache_as_it_was(form):
    """A call that raised (RoPE refusing position_ids of the wrong length, before any update) moved
    the cache's fast-weight token count on, and the retry's logits were silently wrong. Now every
    failed call puts the cache back, also one failing after TTT layers and attention layers had
    written to it (in layer 1, after layer 0; after layer 2, the second TTT layer; an interrupt,
    which skips torch's always-called hooks, is undone at the next call): the retries, through
    decoding, chunks completing at different steps per row and a document restart, equal one full
    forward."""
    model = ttt_model(chunk=4).double()
    ids, mask, pos = left_padded(2, 14, [0, 3], seed=5)
    pos[0, 10:] = torch.arange(4)  # row 0 starts a new document at column 10

    def tokens(t):  # each row's real tokens of its open document after t columns
        return [t if t <= 10 else t - 10, t - 3]

    failures = [(model.model.layers[1], "register_forward_pre_hook", RuntimeError("injected")),
                (model.model.layers[2], "register_forward_hook", RuntimeError("injected")),
                (model.model.layers[2], "register_forward_hook", KeyboardInterrupt())]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = InPlaceTTTCache(model.config, state_form=form)
        got = [model(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6],
                     past_key_values=cache).logits]
        for t0, t1 in ((6, 7), (7, 10), (10, 11), (11, 14)):
            call = dict(input_ids=ids[:, t0:t1], attention_mask=mask[:, :t1], past_key_values=cache)
            if t1 - t0 > 1:
                with pytest.raises(RuntimeError, match="must match"):
                    model(**call, position_ids=pos[:, t0:t1 - 1])
            restart = pos[:, t0:t1].clone()
            restart[0] = torch.arange(t1 - t0)  # a mistaken document start, which clears row 0's fast weights
            for module, kind, error in failures:
                handle = getattr(module, kind)(_raise(error))
                with pytest.raises(type(error)):
                    model(**call, position_ids=restart)
                handle.remove()
                if not isinstance(error, KeyboardInterrupt):
                    assert cache.ttt_tokens == tokens(t0) and cache.get_seq_length() == t0
            got.append(model(**call, position_ids=pos[:, t0:t1]).logits)
            assert cache.ttt_tokens == tokens(t1)
        assert cache.get_seq_length() == 14
        assert (torch.cat(got, 1) - want).abs().max() < 1e-12
        cache.ttt_tokens = [4, 15]
        with pytest.raises(FastWeightsError, match="inconsistent: its fast weights have read 15 tokens, "
                                                   "its attention only 14"):
            model(input_ids=ids[:, :1], past_key_values=cache)


def test_an_interrupted_call_or_a_failed_loss_is_undone_at_once():
    """A KeyboardInterrupt skips the decoder's always-called hook: the cache held the interrupted
    call's tokens until its next use, so its length was wrong, and a beam reorder in between
    mixed old fast weights with reordered attention (the retry off by 0.31). A call whose loss
    failed after the decoder kept its changes (the retry off by 0.43). The causal LM's forward
    now puts the cache back before the error leaves it."""
    model = ttt_model(chunk=4).double()
    ids = torch.randint(1, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    order = torch.tensor([1, 0])

    def interrupt(*args):
        raise KeyboardInterrupt

    with torch.no_grad():
        want = model(input_ids=ids[order], use_cache=False).logits[:, 10:]
        for fail in ("interrupt", "loss"):
            cache = model(input_ids=ids[:, :10], use_cache=True).past_key_values
            if fail == "interrupt":
                handle = model.model.layers[2].register_forward_hook(interrupt)
                with pytest.raises(KeyboardInterrupt):
                    model(input_ids=ids[:, 10:], past_key_values=cache)
                handle.remove()
            else:
                with pytest.raises(ValueError):
                    model(input_ids=ids[:, 10:], past_key_values=cache, labels=ids[:1])
            assert cache.get_seq_length() == 10 and cache.ttt_tokens == [10, 10], fail
            cache.reorder_cache(order)
            got = model(input_ids=ids[order, 10:], past_key_values=cache).logits
            assert (got - want).abs().max() < 1e-12, fail
        # the cache given by position (the 4th argument of the base signature)
        cache = model(input_ids=ids[:, :10], use_cache=True).past_key_values
        with pytest.raises(ValueError):
            model(ids[:, 10:], None, None, cache, None, ids[:1])
        assert cache.get_seq_length() == 10 and cache.ttt_tokens == [10, 10]
        # a decoder called alone, then a causal-LM call refused before the decoder ran: the
        # first call's tokens stay (the refusal has nothing of its own to undo)
        cache = InPlaceTTTCache(model.config)
        model.model(input_ids=ids[:1, :10], past_key_values=cache, use_cache=True)
        with pytest.raises(FastWeightsError, match="cu_seq_lens_q"):
            model(input_ids=ids[:1, 10:], past_key_values=cache, position_ids=torch.arange(10, 17)[None],
                  cu_seq_lens_q=torch.tensor([0, 3, 7]))
        assert cache.get_seq_length() == 10 and cache.ttt_tokens == [10]


def test_generating_from_a_checkpointed_model_in_training_mode():
    """An RL-style loop samples from the policy it trains (training mode, gradient checkpointing
    on): generate() runs without gradients, and transformers keeps the cache then (from 5.24);
    the converted model raised, and a no-grad forward with use_cache=True returned a plain
    DynamicCache without the fast weights. On releases that drop the cache here, the refusal stays."""
    from packaging.version import Version

    from fastweights.models.compat import TRANSFORMERS_VERSION, _checkpointing_keeps_cache_without_grad

    # 5.24 keeps the cache without gradients (in GradientCheckpointingLayer and merge_with_config_defaults)
    assert _checkpointing_keeps_cache_without_grad() == (TRANSFORMERS_VERSION >= Version("5.24"))
    model = ttt_model(chunk=4)
    ids = torch.randint(1, VOCAB, (1, 6))
    want = model.eval().generate(ids, max_new_tokens=9, do_sample=False)
    model.train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if _checkpointing_keeps_cache_without_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=9, do_sample=False), want)
        with torch.no_grad():
            assert isinstance(model(input_ids=ids, use_cache=True).past_key_values, InPlaceTTTCache)
    else:
        with pytest.raises(FastWeightsError, match="gradient checkpointing"):
            model.generate(ids, max_new_tokens=9, do_sample=False)
    with pytest.raises(FastWeightsError, match="gradient checkpointing"):  # with gradients: still refused
        model(input_ids=ids, past_key_values=InPlaceTTTCache(model.config), use_cache=True)
