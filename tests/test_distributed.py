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
