"""add_fwl on a tiny Qwen3: glue, cached generation, padding, save/load, training."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen3Config, Qwen3ForCausalLM

import fastweights  # noqa: F401  (registers the model types)
from fastweights.errors import FastWeightsError
from fastweights.models.fwl import FWLCache, add_fwl, fwl_layer
from fastweights.ops.fwl import FWLParams, FWLState, fwl_reference

V = 53


def plain(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=20, intermediate_size=36, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=10, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    return Qwen3ForCausalLM(cfg)


def tiny(step_size=0.3, seed=0):
    return add_fwl(plain(seed), step_size=step_size, block_size=5, grad_scale=1.0).eval()


def rel(a, b):
    return ((a - b).norm() / (b.norm() + 1e-12)).item()


def test_logits_are_the_fwl_block_on_the_body_output():
    m = tiny()
    ids = torch.randint(1, V, (2, 11))
    h = m.model(ids).last_hidden_state
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    fw = fwl_layer(m)
    ref, _ = fwl_reference(h.double(), targets, FWLParams(*(t.double() for t in fw.params())), fw.step_sizes.double(),
                           m.lm_head.weight.double())
    got = m(ids, use_cache=False).logits
    assert rel(got.double(), ref) < 1e-5
    with torch.no_grad():
        fw.step_sizes.zero_()
    assert rel(m(ids, use_cache=False).logits, got) > 1e-3  # the fast weights change the logits


def test_generate_cached_logits_equal_full_forward():
    m = tiny()
    ids = torch.randint(1, V, (2, 7))
    out = m.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True, output_logits=True,
                     pad_token_id=0)
    assert isinstance(out.past_key_values, FWLCache)
    full = m(out.sequences, use_cache=False).logits
    assert rel(torch.stack(out.logits, 1), full[:, 6:-1]) < 1e-5
    # chunked prefill then several tokens at once through the same cache
    cache = FWLCache(config=m.config)
    a = m(out.sequences[:, :5], past_key_values=cache, use_cache=True).logits
    b = m(out.sequences[:, 5:9], past_key_values=cache, use_cache=True).logits
    c = m(out.sequences[:, 9:], past_key_values=cache, use_cache=True).logits
    assert rel(torch.cat([a, b, c], 1), full) < 1e-5


def test_left_padded_batch_equals_rows_alone():
    m = tiny(seed=1)
    rows = [torch.randint(1, V, (n,)) for n in (8, 5)]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 8 - len(r):] = r
        mask[i, 8 - len(r):] = 1
    out = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                     output_logits=True, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = m.generate(r[None], max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                           output_logits=True, pad_token_id=0)
        assert torch.equal(out.sequences[i, 8:], alone.sequences[0, len(r):])
        assert rel(torch.stack(out.logits, 1)[i], torch.stack(alone.logits, 1)[0]) < 1e-4


def test_positional_arguments_mean_what_their_keywords_do():
    """The head's hook read the mask, positions and cache from keywords only: m(ids, mask) let the
    padding into the fast weights, positional position_ids did not reset documents, and a
    positional cache raised."""
    m = tiny(seed=2).double()
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)
    with torch.no_grad():
        assert torch.equal(m(ids, mask).logits, m(ids, attention_mask=mask).logits)
        assert torch.equal(m(ids, None, pos, use_cache=False).logits,
                           m(ids, position_ids=pos, use_cache=False).logits)
        cache = m(ids[:, :5], use_cache=True).past_key_values
        assert torch.equal(m(ids[:, 5:], None, None, cache).logits,
                           m(ids[:, 5:], past_key_values=m(ids[:, :5], use_cache=True).past_key_values).logits)


def test_save_load_round_trip(tmp_path):
    m = tiny()
    fwl_layer(m).grad_scale = m.config.fwl_grad_scale = 0.25
    with torch.no_grad():
        fwl_layer(m).step_sizes.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    ids = torch.randint(1, V, (2, 9))
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(m2).__name__ == "FWLQwen3ForCausalLM"
    assert m2.config.fwl_expansion == 4 and m2.config.fwl_block_size == 5
    assert fwl_layer(m2).grad_scale == 0.25
    assert torch.equal(fwl_layer(m2).step_sizes, fwl_layer(m).step_sizes)
    assert torch.equal(m2(ids, use_cache=False).logits, m(ids, use_cache=False).logits)
    assert m2.lm_head.weight is not m2.model.embed_tokens.weight  # the block's own unembedding (default)
    assert torch.equal(m2.lm_head.weight, m.lm_head.weight)


def _plain(seed=0):
    torch.manual_seed(seed)
    cfg = tiny().config.to_dict()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("fwl_")} | {"tie_word_embeddings": True}
    return Qwen3ForCausalLM(Qwen3ForCausalLM.config_class(**cfg))


def test_block_gets_its_own_unembedding_unless_tied(tmp_path):
    """The reference code's FWL block has its own unembedding. By default add_fwl copies the
    model's (tied) unembedding into the head, so training the block's output space no longer
    moves the input embedding; ``tied=True`` keeps the head on the shared tensor."""
    base = _plain()
    emb = base.model.embed_tokens.weight.detach().clone()
    m = add_fwl(base).train()
    assert m.lm_head.weight is not m.model.embed_tokens.weight and torch.equal(m.lm_head.weight, emb)
    assert m.config.tie_word_embeddings is False and m.config.fwl_tied is False
    ids = torch.randint(1, V, (1, 8))
    m(ids, labels=ids, use_cache=False).loss.backward()
    emb_grad = m.model.embed_tokens.weight.grad
    assert m.lm_head.weight.grad.abs().sum() > 0
    assert emb_grad[torch.tensor(sorted(set(range(V)) - set(ids.flatten().tolist())))].abs().sum() == 0
    m.save_pretrained(tmp_path / "own")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "own")
    assert m2.lm_head.weight is not m2.model.embed_tokens.weight and torch.equal(m2.lm_head.weight, m.lm_head.weight)

    t = add_fwl(_plain(), tied=True)
    assert t.lm_head.weight is t.model.embed_tokens.weight and t.config.tie_word_embeddings
    t.save_pretrained(tmp_path / "tied")
    t2 = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert t2.lm_head.weight is t2.model.embed_tokens.weight and fwl_layer(t2) is not None


def test_residual_variant_is_drop_in(tmp_path):
    cfg = tiny().config
    ids = torch.randint(1, V, (2, 9))
    torch.manual_seed(3)
    base = Qwen3ForCausalLM(Qwen3ForCausalLM.config_class(**{k: v for k, v in cfg.to_dict().items()
                                                             if not k.startswith("fwl_")})).eval()
    before = base(ids, use_cache=False).logits
    m = add_fwl(base, residual=True, step_size=0.0)
    assert torch.equal(m(ids, use_cache=False).logits, before)  # gain 0 and no steps: an identity
    with torch.no_grad():
        fwl_layer(m).step_sizes.fill_(0.01)
    near = m(ids, use_cache=False).logits  # the fast gain and bias now move away from 0
    assert 0 < rel(near, before) < 0.05
    with torch.no_grad():
        fwl_layer(m).ln_weight.normal_()
    changed = m(ids, use_cache=False).logits
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert m2.config.fwl_residual is True and fwl_layer(m2).residual
    assert torch.equal(m2(ids, use_cache=False).logits, changed)


def test_training_reaches_step_sizes_and_body():
    m = tiny().train()
    ids = torch.randint(1, V, (2, 10))
    loss = m(ids, labels=ids, use_cache=False).loss
    loss.backward()
    fw = fwl_layer(m)
    assert fw.step_sizes.grad.abs().min() > 0
    assert m.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_cache_reorder_indexes_the_fwl_state():
    m = tiny()
    cache = FWLCache(config=m.config)
    m(torch.randint(1, V, (3, 6)), past_key_values=cache, use_cache=True)
    before = FWLState(*(t.clone() for t in cache.fwl_state))
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    for a, b in zip(cache.fwl_state, before, strict=True):
        assert torch.equal(a, b[idx])
    for bad in (2, -1):  # keep two tokens (the older, positive form); remove one
        with pytest.raises(FastWeightsError, match=r"cannot crop an FWLCache from 6 to \d tokens"):
            cache.crop(bad)
    cache.crop(0)  # removes nothing
    assert cache.get_seq_length() == 6


def test_errors():
    m = tiny()
    with pytest.raises(FastWeightsError, match="input_ids"):
        m(inputs_embeds=torch.randn(1, 3, 20))
    with pytest.raises(FastWeightsError, match="already"):
        add_fwl(m)
    filled = DynamicCache(config=m.config)
    m.model(torch.randint(1, V, (1, 3)), past_key_values=filled, use_cache=True)  # the body alone fills it
    with pytest.raises(FastWeightsError, match="FWLCache"):
        m(torch.randint(1, V, (1, 2)), past_key_values=filled, use_cache=True)
    with pytest.raises(FastWeightsError, match="not supported"):
        add_fwl(type("NoHead", (Qwen3ForCausalLM,), {"get_output_embeddings": lambda self: None})(m.config))
    ids = torch.randint(1, V, (2, 4))
    with pytest.raises(FastWeightsError, match=r"cache_implementation='static' cannot carry the FWL state"):
        m.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static", pad_token_id=0)
    # no cache at all: transformers ignores the cache kind, and so does the FWL model
    m.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static", pad_token_id=0, use_cache=False)
    with pytest.raises(FastWeightsError, match=r"assisted or speculative decoding .* not supported by FWLQwen3"):
        m.generate(ids[:1], max_new_tokens=2, do_sample=False, prompt_lookup_num_tokens=2, pad_token_id=0)
    with pytest.raises(FastWeightsError, match=r"continuous batching .* not supported by FWLQwen3"):
        m.init_continuous_batching()  # the entry of generate_batch and cache_implementation="paged"
    cache = FWLCache(config=m.config)
    m(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(FastWeightsError, match="batch size changed .* holds 2 sequences, the input has 3"):
        m(torch.randint(1, V, (3, 1)), past_key_values=cache, use_cache=True)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            add_fwl(plain(), eps=eps)


def test_fwl_and_inplace_ttt_do_not_combine():
    """Each needs its own generation cache: either order is refused by name."""
    from fastweights.models import convert

    with pytest.raises(FastWeightsError, match="FWL head cannot also be converted to In-Place TTT"):
        convert(tiny(), layers=[0], chunk_size=4)
    ttt = convert(plain(), layers=[0], chunk_size=4)
    with pytest.raises(FastWeightsError, match="In-Place TTT model cannot also take an FWL head"):
        add_fwl(ttt)


def test_a_loaded_model_converted_in_memory_takes_the_new_type(tmp_path):
    """A config from from_pretrained holds its own model_type: convert and add_fwl replace it, and
    add_fwl refuses the converted model (before: it took the head, and generate failed later)."""
    from transformers import AutoModelForCausalLM

    from fastweights.models import convert

    plain().save_pretrained(tmp_path / "p")
    ttt = convert(AutoModelForCausalLM.from_pretrained(tmp_path / "p"), layers=[0], chunk_size=4)
    assert ttt.config.model_type == "inplace_ttt_" + plain().config.model_type
    with pytest.raises(FastWeightsError, match="In-Place TTT model cannot also take an FWL head"):
        add_fwl(ttt)
    fwl = add_fwl(AutoModelForCausalLM.from_pretrained(tmp_path / "p"))
    assert fwl.config.model_type == "fwl_" + plain().config.model_type


def test_an_fwl_model_of_another_family_loads_in_a_fresh_process(tmp_path):
    """add_fwl works on any causal LM, but only four families were registered at import: the CLI
    could not load a saved fwl_gpt2 (unknown model family)."""
    from tiny_models import load_in_fresh_process
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = add_fwl(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0,
                                               eos_token_id=0)), block_size=4).eval()
    model.save_pretrained(tmp_path)
    name, logits = load_in_fresh_process(tmp_path, tmp_path)
    assert name == "FWLGPT2LMHeadModel"
    with torch.no_grad():
        assert torch.allclose(logits, model(torch.arange(12)[None], use_cache=False).logits, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings(tmp_path, tied):
    """``resize_token_embeddings`` on an FWL model (its head is no nn.Linear, which transformers'
    resize needed): the unembedding grows, its old rows and the block unchanged (frozen or not),
    tied weights stay tied, and the model saves, loads and runs."""
    m = add_fwl(plain(), tied=tied).eval()
    for p in fwl_layer(m).parameters():
        p.requires_grad_(False)
    fwl_layer(m).step_sizes.requires_grad_(True)
    old = m.lm_head.weight.detach().clone()
    block = {k: v.clone() for k, v in fwl_layer(m).state_dict().items()}
    m.resize_token_embeddings(V + 7)
    w = m.lm_head.weight
    assert w.shape == (V + 7, 20) and torch.equal(w[:V], old) and m.config.vocab_size == V + 7
    assert (w is m.model.embed_tokens.weight) == tied
    assert all(torch.equal(v, fwl_layer(m).state_dict()[k]) for k, v in block.items())
    assert [p.requires_grad for p in fwl_layer(m).parameters()] == [
        p is fwl_layer(m).step_sizes for p in fwl_layer(m).parameters()]
    ids = torch.randint(1, V + 7, (2, 6))
    with torch.no_grad():
        logits = m(ids, use_cache=False).logits
    assert logits.shape == (2, 6, V + 7)
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, logits)
