"""fastweights.eval.flops.flop_counter: counts a GQA model's forward, restores its attention."""

import torch
from tiny_models import tiny_model

from fastweights.eval.flops import flop_counter


def test_flop_counter_counts_gqa_attention_and_restores_sdpa():
    model = tiny_model("qwen3", layers=2, attn_implementation="sdpa")  # 2 query heads, 1 kv head
    assert model.config._attn_implementation == "sdpa"
    N = 17
    ids = torch.randint(0, 97, (1, N), generator=torch.Generator().manual_seed(0))
    with flop_counter(model) as counter, torch.no_grad():
        model(ids)
    assert model.config._attn_implementation == "sdpa"
    # independent count: every linear layer 2·N·in·out, plus per layer and head QKᵀ and AV (2·N·N·dh each)
    linear = sum(2 * N * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * 2 * 2 * (2 * N * N * 12)  # layers × heads × (QKᵀ, AV) × 2·N·N·dh
    assert counter.get_total_flops() == linear + attention


def test_flop_counter_runs_ttt_layers_in_chunked_form_and_restores_them():
    from fastweights.layers.inplace_ttt import InPlaceTTTMLP
    from fastweights.models.inplace_ttt import convert

    model = convert(tiny_model("llama", layers=2), layers=[1], chunk_size=8)
    mlp = next(m for m in model.modules() if isinstance(m, InPlaceTTTMLP))
    seen = []
    with flop_counter(model) as counter, torch.no_grad():
        seen.append(mlp.ttt_op.keywords)
        model(torch.randint(0, 97, (1, 19), generator=torch.Generator().manual_seed(1)))
    assert seen == [{"impl": "chunked"}] and mlp.ttt_op is None
    assert counter.get_total_flops() > 0
