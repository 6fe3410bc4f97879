"""GLA and DeltaNet mixers (flash-linear-attention) in the hybrid model: cached decoding equals
the full forward, padding and packed documents equal the documents alone (forward and
gradients), generate, save/load, and every combination trains.

fla's kernels are Triton kernels: these tests run on CUDA, or on CPU under the Triton
interpreter (``make test-fla``: ``TRITON_INTERPRET=1 pytest tests/test_hybrid_fla.py``, part of
``make test``). In a plain CPU run they skip.
"""

import functools
import os

import pytest
import torch

from fastweights.models.hybrid import HybridForCausalLM
from tests.test_hybrid_model import (
    VOCAB,
    _corpus,
    _perturb_fast_params,
    greedy_by_full_forwards,
    rel,
    tiny,
    train_losses,
)

pytest.importorskip("fla.layers", reason="needs flash-linear-attention")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
if not (CUDA or INTERPRET):
    pytest.skip("fla kernels need CUDA or TRITON_INTERPRET=1 (make test-fla)", allow_module_level=True)

# Autotuning picks each kernel's launch configuration by timing the candidates. These tests check
# numbers, not speed, so every candidate gets the same time and the first configuration runs:
# under the interpreter there is no GPU to time with, and on CUDA it saves minutes of compiling
# candidates on a cold Triton cache. The untimed choice is not written to Triton's disk cache,
# where later real runs would read it.
from triton.runtime import autotuner  # noqa: E402


def _no_timing(self):
    return lambda kernel_call, quantiles: [0.0, 0.0, 0.0]


def _no_disk_cache(self, tuning_key, configs, bench_fn):
    bench_fn()
    return False


autotuner.Autotuner.do_bench = functools.cached_property(_no_timing)
autotuner.Autotuner.do_bench.__set_name__(autotuner.Autotuner, "do_bench")
autotuner.Autotuner.check_disk_cache = _no_disk_cache
if CUDA:
    # the checks compare float32 functions at 1e-5: Triton's float32 dots must not use TF32
    os.environ["TRITON_F32_DEFAULT"] = "ieee"
DEVICE = torch.device("cuda" if CUDA else "cpu")

# fla's layers run their chunked kernels on more than 64 tokens (after unpadding: all rows' tokens
# together) and their recurrent kernels on fewer. The chunked kernels do not run under the Triton
# interpreter (they call ``.to`` on loop counters), so on CPU the tests stay at 64 tokens or fewer.
# fla's DeltaNet has no float32 chunked kernel (FlaMixer runs it in bfloat16 autocast, tested
# below): the float32 comparisons keep DeltaNet at 64 tokens or fewer.


def n_long(mixers):
    return 70 if CUDA and "deltanet" not in mixers else 20


def packed_lens(kind):
    return [29, 41, 13] if CUDA and kind != "deltanet" else [23, 29, 11]


# on CUDA, widths at which fla's kernels run their usual tiles (head dims 16 and up); SDPA for the
# attention layers (flex would compile its own Triton kernels under this module's autotuning patch)
WIDTH = dict(hidden_size=128, num_attention_heads=4, intermediate_size=96, attn_backend="sdpa") if CUDA else {}


def model_for(mixers, mlps="swiglu", **kw):
    model = tiny(mixers, mlps, **WIDTH, **kw).to(DEVICE)
    _perturb_fast_params(model)
    return model


DECODE = [(["gla", "swa"], "swiglu"), (["deltanet", "lact"], "inplace_ttt"), (["gla", "deltanet"], "swiglu")]


@pytest.mark.parametrize("mixers,mlps", DECODE, ids=["-".join(m) + "-" + p for m, p in DECODE])
def test_cached_decoding_equals_full_forward(mixers, mlps):
    """Left-padded prefill (on CUDA more than 64 tokens: fla's chunked kernels), then token-by-token
    decoding (its recurrent kernels, from the cached state), equals the full forward (float32,
    1e-5), and the padded row equals that row alone."""
    model = model_for(mixers, mlps)
    g = torch.Generator().manual_seed(1)
    n_pre = n_long(mixers)
    n = n_pre + 8
    ids = torch.randint(0, VOCAB, (2, n), generator=g).to(DEVICE)
    mask = torch.ones(2, n, dtype=torch.long, device=DEVICE)
    mask[1, :5] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(ids[1:, 5:], use_cache=False).logits
        out = model(ids[:, :n_pre], attention_mask=mask[:, :n_pre], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(n_pre, n):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        cut = model(ids[:, n_pre:], attention_mask=mask[:, n_pre:], use_cache=False).logits
    keep = mask.bool()
    assert rel(torch.cat(steps, 1)[keep], full[keep]) < 1e-5
    assert rel(full[1, 5:], alone[0]) < 1e-5
    assert rel(cut[:, -1], full[:, -1]) > 1e-3  # the state carries: without the prefix it differs


@pytest.mark.parametrize("kind", ["gla", "deltanet"])
def test_packed_equals_one_by_one_forward_and_gradients(kind):
    """Three documents packed in one row (position ids restart at 0) give each document's
    logits and the summed parameter gradients of the documents run alone."""
    model = model_for([kind, "swa"])
    lens = packed_lens(kind)
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, VOCAB, (1, n), generator=g).to(DEVICE) for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0).to(DEVICE)
    weight = torch.randn(1, sum(lens), VOCAB, generator=g).to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    packed = model(torch.cat(docs, 1), position_ids=pos, use_cache=False).logits
    got = torch.autograd.grad((packed * weight).sum(), params, allow_unused=True)
    alone, want, start = [], [torch.zeros_like(p) for p in params], 0
    for d in docs:
        logits = model(d, use_cache=False).logits
        grads = torch.autograd.grad((logits * weight[:, start:start + d.shape[1]]).sum(), params, allow_unused=True)
        want = [w + (0 if gr is None else gr) for w, gr in zip(want, grads, strict=True)]
        alone.append(logits)
        start += d.shape[1]
    assert rel(packed, torch.cat(alone, 1)) < 1e-5
    fla_grads = [(a, b) for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True)
                 if ".mixer.layer." in name and a is not None]
    assert fla_grads and all(float(b.norm()) > 0 for _, b in fla_grads)
    for a, b in zip(got, want, strict=True):
        assert rel(torch.zeros_like(b) if a is None else a, b) < 1e-4


@pytest.mark.parametrize("kind", ["gla", "deltanet"])
def test_generate_reorder_save_load(kind, tmp_path):
    model = model_for([kind, "swa"])
    prompt = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7, do_sample=False)
    seq = greedy_by_full_forwards(model, prompt, 7)
    assert torch.equal(out, seq)
    with torch.no_grad():
        # the cache's rows follow batch_select_indices (beam search reorders with it)
        cache = model(seq[:, :10], use_cache=True).past_key_values
        cache.batch_select_indices(torch.tensor([1, 0], device=DEVICE))
        step = model(seq.flip(0)[:, 10:], past_key_values=cache, use_cache=True).logits
        assert rel(step, model(seq.flip(0), use_cache=False).logits[:, 10:]) < 1e-5
    model.save_pretrained(tmp_path)
    loaded = HybridForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    assert loaded.config.mixers == [kind, "swa"]
    with torch.no_grad():
        assert torch.equal(loaded(seq).logits, model(seq).logits)


TRAIN = [(kind, mlp) for kind in ("gla", "deltanet") for mlp in ("swiglu", "inplace_ttt")]


@pytest.mark.parametrize("mixer,mlp", TRAIN, ids=[f"{a}-{b}" for a, b in TRAIN])
def test_each_combination_trains(mixer, mlp):
    """A few AdamW steps on a small piece of real text lower the loss."""
    model = tiny([mixer, mixer], mlp, seed=3, ttt_lr=0.3, ttt_chunk=16, **WIDTH).to(DEVICE).train()
    # small: under the interpreter every kernel program runs in Python
    losses = train_losses(model, _corpus(2, 32).to(DEVICE))
    assert all(v == v for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.gpu
def test_deltanet_float32_long_inputs_run_in_bf16_autocast():
    """fla's chunked DeltaNet kernel is bf16-only: above 64 tokens a float32 call warns, runs in
    bfloat16 autocast and returns float32 close (bf16 level) to fla's float32 recurrent kernel."""
    from fastweights.models.hybrid.fla_mixer import FlaMixer
    from tests.test_hybrid_model import layout_for

    torch.manual_seed(4)
    mixer = FlaMixer(128, 4, "deltanet").to(DEVICE)
    x = torch.randn(2, 150, 128, device=DEVICE, requires_grad=True)
    layout = layout_for(torch.arange(150).expand(2, 150).clone())
    layout.single_doc = True
    with pytest.warns(UserWarning, match="bfloat16 autocast"):
        y, _ = mixer(x, layout)
    assert y.dtype == torch.float32
    mixer.layer.mode = "fused_recurrent"  # what the layer runs on short inputs, float32 throughout
    ref = mixer.layer(x)[0]
    assert rel(y, ref) < 3e-2
    gx, = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all() and float(gx.norm()) > 0
