"""Packed rows in a model: transformers attention (sdpa, eager) resets at position_ids == 0
when attention_mask is None and there is no cache, and converted In-Place TTT layers reset
their fast weights there. Also run against transformers 5.17 by ``make test-compat``."""

import numpy as np
import pytest
import torch

from fastweights.data.packing import row_fields
from fastweights.models import convert, ttt_parameters
from fastweights.models.presets import build_model


def _packed_vs_separate(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lengths]
    toks = torch.cat(docs + [torch.zeros(1, dtype=torch.long)]).numpy()
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.array([len(lengths)])])
    f = {k: torch.from_numpy(v)[None] for k, v in row_fields(toks, ids).items()}
    with torch.no_grad():
        packed = model(input_ids=f["input_ids"], position_ids=f["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
    return ((packed - alone).norm() / alone.norm()).item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ttt", [False, True])
def test_packed_rows_equal_documents_alone(attn, ttt):
    """transformers resets attention at position_ids == 0 (attention_mask None, no cache), and
    converted layers reset their fast weights there: a packed row equals its documents."""
    model = build_model("tiny", 101, seed=1).eval()
    model.config._attn_implementation = attn
    if ttt:
        convert(model, layers=[0, 2], chunk_size=8, lr=1.0, target="embed")
        with torch.no_grad():
            for n, p in ttt_parameters(model):
                if "ttt_conv" in n:
                    p.normal_(0, 0.5)
    assert _packed_vs_separate(model, [13, 1, 30, 22]) < 1e-5
    # a sanity check that the comparison can fail: without resets the documents mix
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 101, (1, 40), generator=g)
    with torch.no_grad():
        whole = model(input_ids=x, use_cache=False).logits[0, 20:]
        tail = model(input_ids=x[:, 20:], use_cache=False).logits[0]
    assert ((whole - tail).norm() / tail.norm()).item() > 1e-3
