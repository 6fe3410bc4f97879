"""Context and data parallelism on gloo with 2 and 4 CPU processes (issue 6).

Each scenario runs once per world size in spawned processes and is compared against the
single-process computation of the same inputs, made inside every worker.
"""

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_world

from fastweights.distributed import inplace_ttt_cp
from fastweights.ops.inplace_ttt import inplace_ttt_chunked


def rel(a, b, floor=1e-12):
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


def _positions(B, N, starts_per_row):
    """(B, N) in-document positions, documents starting at the given columns of each row."""
    pos = torch.empty(B, N, dtype=torch.long)
    for b, starts in enumerate(starts_per_row):
        cuts = sorted(set([0, *starts]))
        for i, lo in enumerate(cuts):
            hi = cuts[i + 1] if i + 1 < len(cuts) else N
            pos[b, lo:hi] = torch.arange(hi - lo)
    return pos


# (B, N, d, f, C, document starts per row, shard lengths as fractions or None for even)
OP_CASES = {
    "one-doc": (2, 37, 6, 10, 5, [[], []]),
    "packed": (2, 45, 7, 9, 4, [[3, 12, 13, 30], [16, 18, 22, 29]]),
    "chunk-spans-shards": (1, 41, 5, 11, 16, [[9]]),
}


def _op_worker(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    out = {}
    for name, (B, N, d, f, C, doc_starts) in OP_CASES.items():
        g = torch.Generator().manual_seed(hash(name) % 1000)
        z = torch.randn(B, N, f, generator=g, dtype=dtype)
        s = torch.randn(B, N, d, generator=g, dtype=dtype)
        w0 = torch.randn(d, f, generator=g, dtype=dtype) / f**0.5
        conv = torch.randn(d, 5, generator=g, dtype=dtype) * 0.5
        proj = torch.randn(d, d, generator=g, dtype=dtype) / d**0.5
        lr = torch.tensor(0.7, dtype=dtype)
        cot = torch.randn(B, N, d, generator=g, dtype=dtype)
        pos = _positions(B, N, doc_starts)
        # uneven contiguous shards: rank r gets about (r + 2) parts
        weights = torch.tensor([r + 2 for r in range(world)], dtype=torch.float64)
        bounds = [0, *torch.round(torch.cumsum(weights, 0) / weights.sum() * N).long().tolist()]
        lo, hi = bounds[rank], bounds[rank + 1]

        leaves = [t.clone().requires_grad_() for t in (z, s, w0, conv, proj, lr)]
        o_ref = inplace_ttt_chunked(*leaves[:6], C, position_ids=pos)
        (o_ref * cot).sum().backward()
        ref = [o_ref.detach()[:, lo:hi], leaves[0].grad[:, lo:hi], leaves[1].grad[:, lo:hi],
               *(t.grad for t in leaves[2:])]

        mine = [z[:, lo:hi].clone(), s[:, lo:hi].clone(), w0.clone(), conv.clone(), proj.clone(), lr.clone()]
        mine = [t.requires_grad_() for t in mine]
        o = inplace_ttt_cp(*mine, C, position_ids=pos[:, lo:hi], block_size=7)
        (o * cot[:, lo:hi]).sum().backward()
        got = [o.detach(), mine[0].grad, mine[1].grad]
        for t in mine[2:]:  # parameter gradients: sum over ranks
            dist.all_reduce(t.grad)
            got.append(t.grad)
        errs = torch.tensor([rel(a, b) for a, b in zip(got, ref)], dtype=torch.float64)
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        out[name] = dict(zip(["o", "z", "s", "w0", "conv", "proj", "lr"], errs.tolist()))
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_op_context_parallel_matches_one_process(world, dtype, tol):
    results = run_world(world, _op_worker, dtype)[0]
    for case, errs in results.items():
        for what, err in errs.items():
            assert err <= tol, f"{case}: {what} rel err {err:.2e} > {tol}"


# --------------------------------------------------------------------------- model
MODEL_CASES = {
    # B, N, documents per row (None: one per row), target, shard lengths (None: even)
    "one-doc": (2, 29, None, "hidden", None),
    "packed-embed": (1, 31, [[7, 16]], "embed", "uneven"),
}


def _tiny_converted(target):
    from tiny_models import tiny_model

    from fastweights.models import convert, ttt_modules

    model = convert(tiny_model("qwen3", layers=3), layers=[0, 2], chunk_size=5, lr=3.0, target=target).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in ttt_modules(model):
            m.ttt_conv.weight.copy_(torch.randn(m.ttt_conv.weight.shape, generator=g))
            m.ttt_proj.weight.add_(torch.randn(m.ttt_proj.weight.shape, generator=g) * 0.3)
    return model


def _model_worker(rank, world):
    import copy

    import torch.nn.functional as F
    from tiny_models import VOCAB

    from fastweights.distributed import all_reduce_gradients, apply_context_parallel, cp_batch, cp_loss

    out = {}
    for name, (B, N, docs, target, split) in MODEL_CASES.items():
        model = _tiny_converted(target)
        ids = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(11))
        pos = None if docs is None else _positions(B, N, docs)
        # one process: the whole sequence, HF's packed-sequence handling from position_ids
        ref_model = copy.deepcopy(model)
        logits = ref_model(ids, position_ids=pos, use_cache=False).logits
        ref_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        ref_loss.backward()
        # context parallel
        handle = apply_context_parallel(model)
        lengths = None if split is None else [N // world + (r - world // 2) for r in range(world)]
        if lengths is not None:
            lengths[-1] += N - sum(lengths)
        batch = cp_batch(ids, labels=ids, position_ids=pos, lengths=lengths)
        logits = model(batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        loss = cp_loss(logits, batch.targets)
        loss.backward()
        all_reduce_gradients(model)
        loss_mean = loss.detach().clone()
        dist.all_reduce(loss_mean)
        loss_mean /= world
        grads = {n: p.grad for n, p in model.named_parameters()}
        errs = {n: rel(grads[n], p.grad, 1e-6) for n, p in ref_model.named_parameters()}
        handle.remove()
        out[name] = {"loss": abs(loss_mean.item() - ref_loss.item()) / ref_loss.item(),
                     "grad": max(errs.values()), "worst": max(errs, key=errs.get),
                     "conv_grad_norm": grads["model.layers.2.mlp.ttt_conv.weight"].norm().item(),
                     "restored": model.config._attn_implementation}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_model_step_context_parallel_matches_one_process(world):
    results = run_world(world, _model_worker)[0]
    for case, r in results.items():
        assert r["loss"] <= 1e-6, (case, r)
        assert r["grad"] <= 1e-5, (case, r)
        assert r["conv_grad_norm"] > 0, (case, r)
        assert r["restored"] != "fastweights_cp_allgather", (case, r)
