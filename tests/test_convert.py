"""Drop-in conversion of Hugging Face causal LMs to In-Place TTT (issue 2)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, VOCAB, Adapter, load_in_fresh_process, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import fastweights
from fastweights.errors import FastWeightsError
from fastweights.models import convert, default_layers, load_pretrained, ttt_modules, ttt_parameters


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def ids(B=2, N=40, seed=0):
    return torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, use_cache=False, **kw).logits


def perturb(model, seed=1, conv=0.3):
    """Non-zero conv (and a fresh P) so that TTT changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ttt_modules(model):
            m.ttt_conv.weight.copy_(torch.randn(m.ttt_conv.weight.shape, generator=g) * conv)
            m.ttt_proj.weight.add_(torch.randn(m.ttt_proj.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["hidden", "embed"])
def test_conversion_leaves_logits_unchanged(family, target):
    model = tiny_model(family)
    x = ids()
    before = logits(model, x)
    convert(model, chunk_size=8, lr=1.0, target=target)
    assert [i for i, layer in enumerate(model.model.layers) if layer.mlp in ttt_modules(model)] == [0, 6]
    assert rel(logits(model, x), before) <= 1e-6
    assert type(model).__name__ == "InPlaceTTT" + type(tiny_model(family, layers=1)).__name__
    assert model.config.model_type == f"inplace_ttt_{family}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conv_gets_gradient_and_a_step_changes_the_loss(family):
    model = convert(tiny_model(family).train(), layers=[0, 3], chunk_size=8, lr=3.0)
    x = ids(N=48)
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    for name, p in ttt_parameters(model):
        if "ttt_conv" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    opt = torch.optim.AdamW([p for _, p in ttt_parameters(model)], lr=1e-2)
    opt.step()
    with torch.no_grad():
        loss2 = model(x, labels=x, use_cache=False).loss
    assert abs(loss2.item() - loss.item()) > 1e-6


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ttt_changes_outputs_only_after_the_first_chunk(family):
    model = tiny_model(family)
    x = ids(N=30)
    base = logits(model, x)
    convert(model, layers=[0, 2], chunk_size=8, lr=3.0)
    perturb(model)
    out = logits(model, x)
    assert torch.equal(out[:, :8], base[:, :8])  # chunk 0 reads W0 in every TTT layer
    assert (out[:, 8:] - base[:, 8:]).abs().amax(dim=-1).min() > 0  # every later position changes


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["hidden", "embed"])
def test_save_and_reload_round_trip(family, target, tmp_path):
    model = convert(tiny_model(family), layers=[1, 4], chunk_size=6, lr=0.7, target=target)
    perturb(model)
    x = ids()
    ref = logits(model, x)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ttt_layers"] == [1, 4] and cfg["ttt_chunk"] == 6 and cfg["ttt_lr"] == 0.7
    assert cfg["ttt_target"] == {"hidden": "hidden_states", "embed": "input_embed"}[target]
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    for loaded in (load_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert torch.equal(logits(loaded.eval(), x), ref)


def test_official_checkpoint_layout_loads(tmp_path):
    """A base checkpoint plus mlp.ttt_conv/ttt_proj weights and the official config keys."""
    base = tiny_model("qwen3")
    base.save_pretrained(tmp_path)
    ours = convert(tiny_model("qwen3"), layers=[0, 5], chunk_size=8, lr=3.0, target="embed")
    perturb(ours)
    weights = load_file(tmp_path / "model.safetensors")
    for i in (0, 5):
        mlp = ours.model.layers[i].mlp
        weights[f"model.layers.{i}.mlp.ttt_conv.weight"] = mlp.ttt_conv.weight.detach().clone()
        weights[f"model.layers.{i}.mlp.ttt_proj.weight"] = mlp.ttt_proj.weight.detach().clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3"
    cfg.update(ttt_layers=[0, 5], ttt_lr=3.0, ttt_chunk=8, ttt_proj=True, ttt_target="input_embed")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(tmp_path)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(ours, x))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_checkpoint_without_ttt_weights_loads_as_its_base_model(family, tmp_path):
    """Converting at load time (a plain checkpoint, a config with ttt_* keys): the missing conv and
    P get convert's init (zero conv, diagonal P), so the model equals the base model; a checkpoint
    that holds them keeps its values."""
    base = tiny_model(family)
    base.save_pretrained(tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg.update(ttt_layers=[1, 4], ttt_lr=3.0, ttt_chunk=4, ttt_proj=True, ttt_target="hidden_states")
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(tmp_path / "base").eval()
    x = ids()
    assert torch.equal(logits(loaded, x), logits(base, x))
    for m in ttt_modules(loaded):
        assert m.ttt_conv.weight.abs().max() == 0
        P = m.ttt_proj.weight
        assert torch.equal(P, torch.diag(torch.diag(P))) and 0 < P.abs().max() < 0.2
    trained = convert(tiny_model(family), layers=[1, 4], chunk_size=4)
    perturb(trained)
    trained.save_pretrained(tmp_path / "trained")
    again = load_pretrained(tmp_path / "trained")
    for a, b in zip(ttt_parameters(again), ttt_parameters(trained), strict=True):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_load_pretrained_takes_config_keywords_as_from_pretrained_does(tmp_path):
    """load_pretrained(path, ttt_max_update_norm=τ) raised a TypeError from the model's __init__
    (transformers passes the keywords there when a config is given): keywords that are config
    attributes now update the config, in our layout and the official one, and are checked as
    AutoModelForCausalLM.from_pretrained checks them; loading options (dtype) still reach loading."""
    model = convert(tiny_model("llama", layers=2), layers=[1], chunk_size=4)
    perturb(model)
    model.save_pretrained(tmp_path / "ours")
    official = tmp_path / "official"
    tiny_model("llama", layers=2).save_pretrained(official)
    cfg = json.loads((official / "config.json").read_text())
    cfg.update(ttt_layers=[1], ttt_lr=3.0, ttt_chunk=4, ttt_proj=True, ttt_target="hidden_states")
    (official / "config.json").write_text(json.dumps(cfg))
    kw = dict(ttt_max_update_norm=1.0, ttt_lr=0.25, dtype=torch.float64)
    loaded = [load_pretrained(tmp_path / "ours", **kw), AutoModelForCausalLM.from_pretrained(tmp_path / "ours", **kw),
              load_pretrained(official, **kw)]
    for m in loaded:
        assert m.config.ttt_max_update_norm == 1.0 and m.config.ttt_lr == 0.25 and m.dtype == torch.float64
        assert [(mlp.max_update_norm, mlp.lr) for mlp in ttt_modules(m)] == [(1.0, 0.25)]
    assert torch.equal(logits(loaded[0], ids()), logits(loaded[1], ids()))
    for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"max_update_norm must be None \(no clipping\) or a finite number > 0, "
                                             r"got -1\.0"):
            load(tmp_path / "ours", ttt_max_update_norm=-1.0)
        with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
            load(tmp_path / "ours", ttt_chunk=0)


def test_loading_never_unpickles(tmp_path):
    model = convert(tiny_model("llama", layers=2), chunk_size=4)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
        (dict(chunk_size=-4), "chunk_size must be a positive integer, got -4"),
        (dict(layers=[0, 7]), r"layer index 7 is out of range: the model has 7 layers \(0..6\)"),
        (dict(layers=[-1]), "layer index -1 is out of range"),
        (dict(layers=[]), r"layers must name at least one decoder layer \(0..6\), got \[\]"),
        (dict(layers=1), r"layers must be a list of decoder layer indices \(0..6\), got 1"),
        (dict(layers="02"), r"layers must be a list of decoder layer indices \(0..6\), got '02'"),
        (dict(layers=[1.0]), r"layer indices must be integers, got 1.0 \(float\)"),
        (dict(layers=[True]), r"layer indices must be integers, got True \(bool\)"),
        (dict(proj="no"), "proj must be True or False, got 'no'"),
        (dict(target="logits"), "target must be one of"),
        (dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
        (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
        (dict(lr=-1.0), "lr must be a finite number >= 0, got -1.0"),
        (dict(lr=True), "lr must be a finite number >= 0, got True"),  # a bool is not a rate
        (dict(lr="0.1"), "lr must be a finite number >= 0, got '0.1'"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match=match):
        convert(model, **kwargs)
    assert not ttt_modules(model)


def test_integer_scalars_name_layers():
    """NumPy integers and 0-d integer tensors are layer indices like ints."""
    import numpy as np

    for layers in ([np.int64(1), 4], torch.tensor([1, 4]), (1, 4)):
        model = convert(tiny_model("qwen3"), layers=layers)
        assert model.config.ttt_layers == [1, 4]
        assert all(type(i) is int for i in model.config.ttt_layers)


def test_unsupported_model_names_type_and_what_is_missing():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(FastWeightsError, match="'gpt2'.*no decoder `layers`.*llama, mistral, qwen2, qwen3 and alike"):
        convert(gpt2)


def test_other_gated_families_warn_and_load_in_a_fresh_process(tmp_path):
    """A gated-MLP family outside SUPPORTED_FAMILIES (Gemma) converts with a warning that says
    how to load it, and the loader of the CLI loads the saved model in a fresh process."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=12)).eval()
    with pytest.warns(UserWarning, match=r"'gemma' is not among the tested families .*load_pretrained"):
        convert(model, layers=[1], chunk_size=4)
    model.save_pretrained(tmp_path / "gemma-ttt")
    name, logits = load_in_fresh_process(tmp_path / "gemma-ttt", tmp_path)
    assert name == "InPlaceTTTGemmaForCausalLM"
    with torch.no_grad():
        assert torch.equal(logits, model(torch.arange(12).view(1, 12) % 50).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tested families convert silently
        convert(tiny_model("llama", layers=2))


def test_converting_twice_is_an_error():
    model = convert(tiny_model("qwen2", layers=2))
    with pytest.raises(FastWeightsError, match="already converted"):
        convert(model)


def test_defaults_follow_the_official_release():
    model = convert(tiny_model("qwen3", layers=13))
    assert default_layers(13) == [0, 6, 12]
    assert model.config.ttt_layers == [0, 6, 12]
    m = ttt_modules(model)[0]
    assert (m.chunk_size, m.lr, m.target) == (4096, 3.0, "hidden")
    assert tuple(m.ttt_conv.weight.shape) == (24, 1, 5) and m.ttt_conv.weight.abs().max() == 0
    P = m.ttt_proj.weight
    assert torch.equal(P, torch.diag(torch.diagonal(P))) and 0.005 < P.diagonal().std() < 0.05


@pytest.mark.parametrize("target", ["hidden", "embed"])
def test_packed_rows_equal_documents_one_at_a_time(target):
    """Attention (through position_ids) and the fast weights both restart at each document."""
    model = convert(tiny_model("qwen3"), layers=[0, 3], chunk_size=5, lr=2.0, target=target)
    perturb(model)
    lengths = [13, 4, 17]
    docs = [ids(1, n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    out = logits(model, packed, position_ids=pos)
    singles = torch.cat([logits(model, d) for d in docs], dim=1)
    assert rel(out, singles) < 1e-5


def test_inputs_embeds_feed_the_embed_target():
    model = convert(tiny_model("llama"), layers=[0], chunk_size=4, target="embed")
    perturb(model)
    x = ids(N=20)
    with torch.no_grad():
        a = model(x, use_cache=False).logits
        b = model(inputs_embeds=model.get_input_embeddings()(x), use_cache=False).logits
    assert torch.equal(a, b)


def test_package_import_registers_auto_classes():
    from transformers import AutoConfig

    for family in FAMILIES:
        assert AutoConfig.for_model(f"inplace_ttt_{family}").model_type == f"inplace_ttt_{family}"
    assert fastweights.convert is convert


@pytest.mark.parametrize("how", ["convert", "add_fwl"])
def test_conversion_leaves_a_shared_config_alone(how):
    """from_config(cfg) does not copy cfg: converting one model must not convert the others
    built from it, nor cfg. The converted model's layers follow its own config afterwards."""
    from fastweights.models import add_fwl

    base = tiny_model("qwen3", layers=2)
    cfg = base.config
    other = AutoModelForCausalLM.from_config(cfg).eval()
    assert other.config is cfg
    model = AutoModelForCausalLM.from_config(cfg).eval()
    convert(model, layers=[1], chunk_size=4) if how == "convert" else add_fwl(model)
    for m in (base, other):
        assert type(m.config).__name__ == "Qwen3Config" and m.config.model_type == "qwen3"
        assert not hasattr(m.config, "ttt_layers") and not hasattr(m.config, "fwl_expansion")
        assert type(AutoModelForCausalLM.from_config(m.config)).__name__ == "Qwen3ForCausalLM"
    assert all(m.config is model.config for m in model.modules() if "config" in m.__dict__)
    model.set_attn_implementation("eager")
    layer_cfg = model.model.layers[0].self_attn.config
    assert layer_cfg is model.config and layer_cfg._attn_implementation == "eager"
    assert cfg._attn_implementation != "eager"


def test_a_bare_decoder_is_refused():
    """AutoModel gives the decoder without its head: relabelling it as a causal LM broke forward
    and save_pretrained; convert names what it needs instead."""
    from transformers import AutoModel

    decoder = AutoModel.from_config(tiny_model("qwen3", layers=2).config)
    with pytest.raises(FastWeightsError, match="needs the causal LM \\(Qwen3ForCausalLM.*got Qwen3Model"):
        convert(decoder, layers=[1])
    assert type(decoder).__name__ == "Qwen3Model" and not fastweights.models.is_converted(decoder)


@pytest.mark.parametrize("name", ["down_proj", "ttt_proj"])
def test_an_adapter_on_a_weight_read_directly_is_refused(name):
    """The fast-weight op reads down_proj's and P's weights directly: an adapter on them would be
    dropped silently (peft LoRA: no gradient, and the logits changed on merging)."""
    model = convert(tiny_model("qwen3", layers=2), layers=[1], chunk_size=4).eval()
    mlp = model.model.layers[1].mlp
    setattr(mlp, name, Adapter(getattr(mlp, name)))
    with pytest.raises(FastWeightsError, match=f"{name} of an In-Place TTT MLP is wrapped by Adapter"):
        logits(model, ids())
    model.model.layers[0].mlp.gate_proj = Adapter(model.model.layers[0].mlp.gate_proj)  # a plain layer: fine
    setattr(mlp, name, getattr(mlp, name).base_layer)
    logits(model, ids())


def test_embed_target_follows_a_replaced_embedding():
    """target="embed" reads the embeddings through a hook: an embedding module set after the
    conversion (set_input_embeddings, an adapter's wrapper) must be hooked too (it raised
    'needs the token embeddings')."""
    import copy

    model = convert(tiny_model("qwen3", layers=2), layers=[1], chunk_size=4, target="embed").eval()
    perturb(model)
    x = ids()
    ref = logits(model, x)
    model.set_input_embeddings(copy.deepcopy(model.get_input_embeddings()))
    assert torch.equal(logits(model, x), ref)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids) * 1.0

    model.set_input_embeddings(Wrapper(model.get_input_embeddings()))
    assert torch.equal(logits(model, x), ref)
    model.model.embed_tokens.inner.weight.requires_grad_(True)
    model(x, use_cache=False).logits.sum().backward()
    assert model.model.embed_tokens.inner.weight.grad.abs().sum() > 0


def test_flattened_rows_in_eval_mode_equal_documents_one_at_a_time():
    """transformers' DataCollatorWithFlattening gives cu_seq_lens_q; in eval mode the hook made a
    cache by default, and the TTT MLP then refused the packed rows naming a cache nobody passed."""
    from transformers import DataCollatorWithFlattening

    model = convert(tiny_model("llama"), layers=[0, 3], chunk_size=4).eval()
    perturb(model)
    docs = [ids(1, n, seed=i)[0].tolist() for i, n in enumerate([9, 4, 11])]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    batch.pop("labels")
    with torch.no_grad():
        out = model(**batch).logits
    singles = torch.cat([logits(model, torch.tensor([d])) for d in docs], dim=1)
    assert rel(out, singles) < 1e-5
    with pytest.raises(ValueError, match="pass use_cache=False"), torch.no_grad():
        model(**batch, use_cache=True)


def test_a_one_element_tensor_rate_is_a_number():
    """convert(lr=torch.tensor(3.0)) was refused as 'not a finite number >= 0'."""
    model = convert(tiny_model("qwen3"), lr=torch.tensor(2.5))
    assert model.config.ttt_lr == 2.5 and type(model.config.ttt_lr) is float


def test_convert_refuses_a_model_that_runs_context_parallel():
    """TTT layers added after apply_context_parallel stepped locally on each shard (rank 1 off by
    5e-3); the handle is what marks such a model."""
    model = tiny_model("qwen3")
    model._fw_context_parallel = object()
    with pytest.raises(FastWeightsError, match="this model runs context-parallel: call remove"):
        convert(model)


def test_rates_given_as_parameters_or_integer_tensors():
    """as_rate took only plain float tensors: an nn.Parameter rate and torch.tensor(1) were refused."""
    assert convert(tiny_model("qwen3"), lr=torch.nn.Parameter(torch.tensor(2.0))).config.ttt_lr == 2.0
    assert convert(tiny_model("qwen3"), lr=torch.tensor(1)).config.ttt_lr == 1.0


def test_cu_seqlens_and_position_ids_that_disagree_are_refused():
    """The TTT MLPs followed cu_seq_lens_q and attention position_ids: boundaries that disagree ran
    silently, each part of the model on its own documents."""
    from transformers import DataCollatorWithFlattening

    model = convert(tiny_model("llama"), layers=[0, 3], chunk_size=4).eval()
    docs = [ids(1, n, seed=i)[0].tolist() for i, n in enumerate([9, 4, 11])]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    batch.pop("labels")
    with torch.no_grad():
        model(**batch)  # the collator's boundaries agree
        wrong = dict(batch, cu_seq_lens_q=torch.tensor([0, 9, 12, 24], dtype=torch.int32))
        with pytest.raises(FastWeightsError, match=r"cu_seq_lens_q \[0, 9, 12, 24\] and position_ids \(documents "
                                                   r"starting at \[0, 9, 13\]\) describe different documents"):
            model(**wrong)
