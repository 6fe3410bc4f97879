"""LaCT's contiguous fast path (no carried state, no document start after token 0): forward and
every gradient against the sequential reference, its dispatch, and its compiled form (GPU)."""

import copy
import pickle

import numpy as np
import pytest
import torch

import fastweights.ops.lact as lact_op
from fastweights.ops.lact import _resolve_compile, lact_chunked, lact_reference
from tests.test_lact_op import NAMES, assert_grads_match, make, rel

CASES = [  # update, order, C, (D, Dh, D2)
    ("gd", "apply_update", 8, (6, 10, 7)),
    ("momentum", "apply_update", 8, (6, 10, 7)),
    ("muon", "apply_update", 8, (6, 10, 7)),  # W2's shape differs: two Newton-Schulz chains
    ("muon", "apply_update", 7, (6, 6, 6)),  # all square: one stacked state, one chain of three matrices
    ("gd", "apply_update", 8, (7, 7, 7)),
    ("momentum", "apply_update", 6, (6, 6, 6)),
    ("muon", "update_apply", 5, (5, 5, 5)),
    ("momentum", "update_apply", 9, (6, 10, 7)),
    ("gd", "update_apply", 40, (6, 10, 7)),  # one chunk longer than the sequence
]


def grads_vs_reference(inputs, kw, compile=False):
    ref = lact_reference(*inputs, **kw)
    out = lact_chunked(*inputs, **kw, compile=compile)
    go = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, inputs, go, allow_unused=True)
    gc = torch.autograd.grad(out, inputs, go, allow_unused=True)
    return out, ref, gc, gr


@pytest.mark.parametrize("update,order,C,dims", CASES, ids=[f"{u}-{o}-C{c}-{d[0]}{d[1]}{d[2]}" for u, o, c, d in CASES])
def test_fast_path_matches_reference_fwd_and_grads(update, order, C, dims):
    D, Dh, D2 = dims
    inputs = make(B=2, H=3, N=29, D=D, Dh=Dh, D2=D2, seed=13)  # 29 % C != 0
    out, ref, gc, gr = grads_vs_reference(inputs, dict(chunk_size=C, update=update, order=order))
    assert rel(out, ref) < 1e-10
    assert_grads_match(gc, gr, inputs, unread={"beta"} if update == "gd" or C >= 29 else set())


PACKED = [[29], [7, 20, 2], [16, 13]]  # per row: one document; short and long ones; chunk-aligned ones


def packed_positions(rows=PACKED):
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in rows])


@pytest.mark.parametrize("update,order,C,dims", CASES, ids=[f"{u}-{o}-C{c}-{d[0]}{d[1]}{d[2]}" for u, o, c, d in CASES])
def test_packed_fast_path_matches_reference_fwd_and_grads(monkeypatch, update, order, C, dims):
    """Rows of packed documents (no state in or out) take the chunk loop on a layout aligned to
    the documents, the state reset where they start (rows resetting at different chunks, one row
    never), updating only the chunks that some chunk reads: forward and every gradient equal the
    sequential reference's (float64)."""
    calls, fast = [], lact_op._lact_contiguous
    monkeypatch.setattr(lact_op, "_lact_contiguous", lambda *a, **k: calls.append(k["resets"].shape) or fast(*a, **k))
    D, Dh, D2 = dims
    inputs = make(B=3, H=2, N=29, D=D, Dh=Dh, D2=D2, seed=17)
    kw = dict(chunk_size=C, update=update, order=order, position_ids=packed_positions())
    out, ref, gc, gr = grads_vs_reference(inputs, kw)
    chunks = sum(-(-n // C) for lens in PACKED for n in lens)
    updates = chunks - (len(sum(PACKED, [])) if order == "apply_update" else 0)
    (L, U), = calls  # the six documents' update chunks on L lanes of U slots
    assert L * U >= updates
    if order == "apply_update":  # never more slots than a row of one document updates, rounded up
        assert U <= -(-29 // C)
    assert rel(out, ref) < 1e-10
    unread = {"k", "v", "lr", "beta"} if C >= 29 and order == "apply_update" else set()
    assert_grads_match(gc, gr, inputs, unread | ({"beta"} if update == "gd" else set()))


def test_packed_fast_path_compiled_loop(monkeypatch):
    """With compilation on and gradients taken, the packed rows' whole chunk loop compiles as one
    graph (fullgraph: the resets are tensors; traced with aot_eager, what inductor compiles on
    CUDA) and gives the reference's output and gradients."""
    compiled = []

    def fake(fn, scope, mode):
        compiled.append((fn.__name__, scope, mode))
        return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(lact_op, "_compiled", fake)
    inputs = make(B=3, H=2, N=29, D=6, Dh=6, D2=6, seed=19)
    kw = dict(chunk_size=6, update="muon", position_ids=packed_positions())
    ref = lact_reference(*inputs, **kw)
    out = lact_chunked(*inputs, **kw, compile=True)
    assert compiled == [("_contiguous_loop", "loop", "default")]
    assert rel(out, ref) < 1e-10
    go = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, go)
    want = torch.autograd.grad(ref, inputs, go)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert rel(a, b) < 1e-9, name


@pytest.mark.parametrize("order", ["apply_update", "update_apply"])
@pytest.mark.parametrize("rows,C", [(PACKED, 8), (PACKED, 5), ([[1] * 9, [9], [4, 5]], 4), ([[9], [9], [9]], 16),
                                    ([[2] * 20], 4), ([[1] * 40], 4), ([[12, 3, 9], [24]], 4)])
def test_lanes_layout(rows, C, order):
    """Packed documents on lanes. Update slots: exactly the tokens of the chunks whose update is
    read (all but each document's last with apply-then-update), each document's in consecutive
    slots of one lane from a chunk start that resets, no two tokens in one slot. Reads: chunk i
    of a document lies on the slot of its update i - 1 (apply-then-update) or i; the first
    chunks (apply-then-update) are read apart; every token is read once, and the reads come
    back in token order unchanged (with their gradient)."""
    pos = packed_positions(rows)
    B, N = pos.shape
    lanes = lact_op.LaCTLanes(pos == 0, C, order)
    L, U = lanes.L, lanes.U
    assert lanes.resets.shape == (L, U) and U >= 1
    ids = torch.arange(1, B * N + 1, dtype=torch.float64).view(B, 1, N, 1)
    on_updates, on_reads = lanes.to_updates(ids).flatten(), lanes.to_reads(ids).flatten()
    assert on_updates.shape == on_reads.shape == (L * U * C,)
    where_update = {int(t): i for i, t in enumerate(on_updates.tolist()) if t}
    where_read = {int(t): i for i, t in enumerate(on_reads.tolist()) if t}
    first = set(int(t) for t in lanes.first(ids).flatten().tolist())
    assert len(where_update) == int((on_updates > 0).sum()) and len(where_read) == int((on_reads > 0).sum())
    used = torch.zeros(L * U, dtype=torch.long)
    update_tokens, starting = 0, 0
    shift = 1 if order == "apply_update" else 0
    for b, lens in enumerate(rows):
        lo = 0
        for n in lens:
            toks = [b * N + lo + i + 1 for i in range(n)]
            lo += n
            chunks = -(-n // C)
            mine = toks[:(chunks - shift) * C]
            update_tokens += len(mine)
            for i in range(shift * C):  # the first chunk, read with the initial weights
                if i < n:
                    assert toks[i] in first and toks[i] not in where_read
            if not mine:
                continue
            starting += 1
            u = torch.tensor([where_update[t] for t in mine])
            assert int(u[0]) % C == 0 and torch.equal(u, u[0] + torch.arange(len(mine)))  # consecutive
            assert int(u[0]) // (U * C) == int(u[-1]) // (U * C)  # on one lane
            assert bool(lanes.resets.flatten()[int(u[0]) // C])
            for i in range(shift * C, n):  # read on the slot of the update before it
                assert where_read[toks[i]] == int(u[0]) + i - shift * C
            used.index_add_(0, u // C, torch.ones(len(u), dtype=torch.long))  # tokens per update slot
    assert len(where_update) == update_tokens  # no other token on the update slots
    assert len(where_read) + len(first) == B * N and not first & set(where_read)
    assert int(lanes.resets.sum()) == starting
    assert torch.equal(lanes.upd_count.flatten(), used.clamp(min=1))
    x = torch.randn(B, 2, N, 3, dtype=torch.float64, requires_grad=True)
    on = lanes.to_reads(x)
    assert float(on.detach().abs().sum()) + float(lanes.first(x).detach().abs().sum()) == pytest.approx(
        float(x.detach().abs().sum()))  # empty slots: zeros
    back = lanes.tokens(on, lanes.first(x) if shift else None)
    assert torch.equal(back, x)
    (g,) = torch.autograd.grad(back, x, torch.ones_like(x))
    assert torch.equal(g, torch.ones_like(x))


def test_lanes_fill_up():
    """The lanes' count and length: U is the most update chunks of one document or per row,
    rounded up to a quarter of ceil(N / C) (at least that quarter); documents fill lanes of U
    slots first fit, so one row keeps one lane, and several rows' documents share lanes."""
    def shape(rows, C, order="apply_update"):
        lanes = lact_op.LaCTLanes(packed_positions(rows) == 0, C, order)
        return lanes.L, lanes.U

    assert shape([[16]], 4) == (1, 3)  # one document: 4 chunks, 3 updates
    assert shape([[16]], 4, "update_apply") == (1, 4)
    assert shape([[5] * 3 + [1]], 4) == (1, 3)  # one update per document of 5
    assert shape([[3] * 5 + [1]], 4) == (1, 1)  # no update: one slot all the same
    assert shape([[3] * 5 + [1]], 4, "update_apply") == (1, 6)
    assert shape([[1] * 9 + [7]], 2) == (1, 4)  # G0 = 8: 3 updates, rounded up to a multiple of 2
    assert shape([[1] * 16], 4) == (1, 1)
    assert shape([[1] * 16], 4, "update_apply") == (1, 16)  # 16 chunks of one token: one lane of 16
    assert shape([[16], [16]], 4) == (2, 3)  # a row each
    # update chunks per document (1, 0), (0, 1), (1): 3 in all, 1 per row; the rows share lanes
    assert shape([[6, 2], [1, 7], [8]], 4) == (3, 1)
    assert shape([[6, 2], [1, 7], [8]], 4, "update_apply") == (3, 3)
    assert shape([[12, 3, 9], [24]], 4) == (2, 5)  # 2, 0, 2 and 5 updates: 5 per lane at most
    assert shape([[8], [8]], 8) == (1, 1)  # no update at all: one lane
    assert shape([[8], [8]], 8, "update_apply") == (2, 1)


def test_fast_path_muon_without_beta():
    q, k, v, lr, _, w1, w2, w3 = make(B=1, H=2, N=20, D=4, Dh=4, seed=2)
    kw = dict(chunk_size=6, update="muon")
    inputs = (q, k, v, lr, None, w1, w2, w3)
    ref = lact_reference(*inputs, **kw)
    out = lact_chunked(*inputs, **kw, compile=False)
    assert rel(out, ref) < 1e-10
    (ga,), (gb,) = torch.autograd.grad(out.sum(), [k]), torch.autograd.grad(ref.sum(), [k])
    assert rel(ga, gb) < 1e-9 and float(gb.norm()) > 0


def test_dispatch(monkeypatch):
    """Whole-sequence rows take the fast path; packed documents take it on a document-aligned
    layout (test_packed_fast_path_matches_reference_fwd_and_grads); streaming takes neither."""
    calls, packed_calls = [], []
    fast, lanes = lact_op._lact_contiguous, lact_op.LaCTLanes
    monkeypatch.setattr(lact_op, "_lact_contiguous", lambda *a, **k: calls.append(1) or fast(*a, **k))
    monkeypatch.setattr(lact_op, "LaCTLanes", lambda *a, **k: packed_calls.append(1) or lanes(*a, **k))
    inputs = make(B=2, N=12, grad=False)
    lact_chunked(*inputs, chunk_size=4, update="muon")
    lact_chunked(*inputs, chunk_size=4, update="muon", position_ids=torch.arange(12).expand(2, 12))
    assert len(calls) == 2
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    packed = lact_chunked(*inputs, chunk_size=4, update="muon", position_ids=pos)
    assert len(calls) == 3 and len(packed_calls) == 1
    lact_chunked(*inputs, chunk_size=4, update="muon", output_final_state=True)
    lact_chunked(*inputs, chunk_size=4, update="muon", position_ids=pos, output_final_state=True)
    assert len(calls) == 3 and len(packed_calls) == 1
    alone = lact_reference(*[t[:, :, 5:] for t in inputs[:5]], *inputs[5:], chunk_size=4, update="muon")
    assert rel(packed[:, :, 5:], alone) < 1e-10


@pytest.mark.parametrize("order", ["apply_update", "update_apply"])
def test_shared_lanes_equal_the_call_s_own(monkeypatch, order):
    """Lanes built once by lact_lanes (as the layers of one pass share them) give what the call
    builds from position_ids, output and every gradient bitwise; the call then reads no
    document starts; rows of one document need none."""
    inputs = make(B=3, H=2, N=29, D=5, Dh=5, D2=5, seed=21)
    pos = packed_positions()
    kw = dict(chunk_size=6, update="muon", order=order)
    own = lact_chunked(*inputs, **kw, position_ids=pos, compile=False)
    lanes = lact_op.lact_lanes(pos == 0, 6, order)
    assert isinstance(lanes, lact_op.LaCTLanes) and lanes.first_tokens.device == pos.device
    monkeypatch.setattr(lact_op, "doc_starts", lambda *a, **k: pytest.fail("the call read document starts"))
    shared = lact_chunked(*inputs, **kw, lanes=lanes, compile=False)
    assert torch.equal(shared, own)
    go = torch.randn_like(own)
    ga = torch.autograd.grad(own, inputs, go, allow_unused=True)
    gb = torch.autograd.grad(shared, inputs, go, allow_unused=True)
    for name, a, b in zip(NAMES, ga, gb, strict=True):
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), name
    assert lact_op.lact_lanes(torch.arange(29).expand(3, 29) == 0, 6, order) is None


def test_lanes_errors():
    inputs = make(B=3, H=2, N=29, D=5, Dh=5, D2=5, seed=2, grad=False)
    pos = packed_positions()
    lanes = lact_op.lact_lanes(pos == 0, 6)
    with pytest.raises(ValueError, match=r"\(B, N, chunk_size, order\) = \(3, 29, 6, 'apply_update'\).*\(3, 29, 7"):
        lact_chunked(*inputs, chunk_size=7, lanes=lanes)
    with pytest.raises(ValueError, match="update_apply"):
        lact_chunked(*inputs, chunk_size=6, order="update_apply", lanes=lanes)
    with pytest.raises(ValueError, match="not both"):
        lact_chunked(*inputs, chunk_size=6, lanes=lanes, position_ids=pos)
    with pytest.raises(ValueError, match="no state"):
        lact_chunked(*inputs, chunk_size=6, lanes=lanes, output_final_state=True)
    with pytest.raises(ValueError, match=r"\(B, N\) bool tensor, got \(29,\)"):
        lact_op.lact_lanes(pos[0] == 0, 6)
    with pytest.raises(ValueError, match=r"torch.int64"):
        lact_op.lact_lanes(pos, 6)
    with pytest.raises(ValueError, match="lanes are on meta, the inputs on cpu"):
        lact_chunked(*inputs, chunk_size=6, lanes=lact_op.lact_lanes(pos == 0, 6, device="meta"))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        lact_op.lact_lanes(pos == 0, 0)
    with pytest.raises(ValueError, match=r"got np.int64\(6\) \(type int64, not a Python int: pass int\(chunk_size\)"):
        lact_op.lact_lanes(pos == 0, np.int64(6))
    with pytest.raises(ValueError, match="order must be one of .*'sideways'"):
        lact_op.lact_lanes(pos == 0, 6, "sideways")
    huge = torch.zeros(1, 1, dtype=torch.bool).expand(2, 2**30)  # no memory behind it
    with pytest.raises(ValueError, match=r"int32: B·N = 2147483648 must be below 2\*\*31"):
        lact_op.LaCTLanes(huge, 6)
    # one lane of one slot of a 2**31-token chunk: the slot maps overflow int32 (no memory behind it)
    two_docs = torch.tensor([[True, False, True, False]])
    with pytest.raises(ValueError, match=r"int32: L·U·C = 2147483648 must be below 2\*\*31"):
        lact_op.LaCTLanes(two_docs, 2**31)


def test_bf16_fast_path_close_to_float32_path():
    """bf16 matmuls with a float32 state: close to the same path in float32."""
    inputs32 = make(B=1, H=2, N=100, D=8, Dh=8, dtype=torch.float32, seed=5, grad=False)
    ref = lact_chunked(*inputs32, chunk_size=24, update="momentum", compile=False)
    low = [t.bfloat16() for t in inputs32[:5]]
    out = lact_chunked(*low, *inputs32[5:], chunk_size=24, update="momentum", compile=False)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ref) < 3e-2


def test_compiled_calls_raise_the_recompile_limit_only_while_they_run(monkeypatch):
    """The op raised dynamo's recompile limit for the whole process (the user's own torch.compile
    code too); now only its compiled calls run with it."""
    import torch._dynamo.config as dynamo_config

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *a: seen.append(dynamo_config.recompile_limit)
                        or fn(*a))
    monkeypatch.setattr(lact_op, "_COMPILED", {})
    with dynamo_config.patch(recompile_limit=8):  # (monkeypatch's undo would break torch's config module)
        f = lact_op._compiled(lambda x: x + 1, "step", "default")
        assert dynamo_config.recompile_limit == 8
        assert f(1) == 2 and seen == [64] and dynamo_config.recompile_limit == 8


def test_resolve_compile(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(lact_op.COMPILE_ENV, raising=False)
    assert _resolve_compile(None, cpu) is None and _resolve_compile(None, cuda) == "default"
    assert _resolve_compile(False, cuda) is None and _resolve_compile(True, cpu) == "default"
    monkeypatch.setenv(lact_op.COMPILE_ENV, "0")
    assert _resolve_compile(None, cuda) is None
    monkeypatch.setenv(lact_op.COMPILE_ENV, "reduce-overhead")
    assert _resolve_compile(None, cuda) == "reduce-overhead"
    with pytest.raises(ValueError, match=r"^compile must be None, .*got 'fast'"):
        _resolve_compile("fast", cuda)
    monkeypatch.setenv(lact_op.COMPILE_ENV, "bogus")  # named by the variable it came from
    with pytest.raises(ValueError, match=rf"^{lact_op.COMPILE_ENV} must be None, .*got 'bogus'"):
        _resolve_compile(None, cuda)
    monkeypatch.delenv(lact_op.SCOPE_ENV, raising=False)
    assert lact_op._resolve_scope(None) == "step" and lact_op._resolve_scope(None, training=True) == "loop"
    assert lact_op._resolve_scope("loop") == "loop" and lact_op._resolve_scope("step", training=True) == "step"
    monkeypatch.setenv(lact_op.SCOPE_ENV, "loop")
    assert lact_op._resolve_scope(None) == "loop"
    with pytest.raises(ValueError, match="^compile scope must be one of"):
        lact_op._resolve_scope("layer")
    monkeypatch.setenv(lact_op.SCOPE_ENV, "layer")
    with pytest.raises(ValueError, match=rf"^{lact_op.SCOPE_ENV} must be one of .*got 'layer'"):
        lact_op._resolve_scope(None)


def test_whole_loop_traces_as_one_graph():
    """The chunk loop compiles whole (fullgraph: no graph break), forward and gradients equal
    to the reference; traced with aot_eager (what inductor would compile), 37 tokens, chunk 8."""
    inputs = make(B=1, H=2, N=37, D=8, Dh=8, D2=8, dtype=torch.float64, seed=6)
    kw = dict(chunk_size=8, update="muon")
    ref = lact_reference(*inputs, **kw)
    go = torch.randn_like(ref)
    loop = torch.compile(lact_op._contiguous_loop, backend="aot_eager", fullgraph=True, dynamic=False)
    out = loop(*inputs, 8, "muon", "apply_update")
    assert rel(out, ref) < 1e-12
    got = torch.autograd.grad(out, inputs, go, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, go, allow_unused=True)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert rel(a, b) < 1e-9, name


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("order", ["apply_update", "update_apply"])
def test_reads_in_groups_match_reference(monkeypatch, group, order):
    """The reads leave the update loop in groups of READ_GROUP chunks: groups of 1, 2 and 3 over
    6 chunks whose last is short (43 tokens, chunk 8; the last group partial for 2 of 3 sizes)
    give the reference's output and every gradient (float64)."""
    monkeypatch.setattr(lact_op, "READ_GROUP", group)
    inputs = make(B=2, H=2, N=43, D=6, Dh=10, D2=7, seed=21)
    out, ref, gc, gr = grads_vs_reference(inputs, dict(chunk_size=8, update="muon", order=order))
    assert rel(out, ref) < 1e-10
    for name, a, b in zip(NAMES, gc, gr, strict=True):
        assert float(b.norm()) > 0, name
        assert rel(a, b) < 1e-9, name


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["step", "loop"])
@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_compiled_fast_path_matches_reference_gpu(update, scope):
    """torch.compile'd chunk step or whole loop on CUDA (float32) against the float64 CPU reference."""
    inputs = make(B=2, H=2, N=70, D=16, Dh=16, D2=16, dtype=torch.float64, seed=4)
    kw = dict(chunk_size=16, update=update)
    ref = lact_reference(*inputs, **kw)
    go = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, inputs, go, allow_unused=True)
    dev = [t.detach().float().cuda().requires_grad_(True) for t in inputs]
    out = lact_chunked(*dev, **kw, compile=True, compile_scope=scope)
    gc = torch.autograd.grad(out, dev, go.float().cuda(), allow_unused=True)
    assert rel(out.double().cpu(), ref) < 1e-4
    for name, a, b in zip(NAMES, gc, gr, strict=True):
        if name == "beta" and update == "gd":
            continue  # gd ignores beta: no gradient either way
        assert rel(a.double().cpu(), b) < 1e-3, name


def test_graphs_setting_on_cpu_runs_eagerly_and_loop_graphs_need_cuda():
    """``compile="graphs"`` means nothing on CPU (eager, as ``auto``); LoopGraphs refuses CPU tensors."""
    assert _resolve_compile("graphs", torch.device("cpu")) is None
    assert _resolve_compile("graphs", torch.device("cuda")) == "graphs"
    inputs = make(B=1, H=2, N=37, D=8, Dh=8, D2=8, dtype=torch.float64, seed=8)
    kw = dict(chunk_size=8, update="muon")
    graphs = lact_op.LoopGraphs()
    out = lact_chunked(*inputs, **kw, compile="graphs", graphs=graphs)
    assert rel(out, lact_reference(*inputs, **kw)) < 1e-12
    with pytest.raises(ValueError, match="needs CUDA tensors, got device cpu"):
        graphs(*inputs, 8, "muon", "apply_update")
    graphs = lact_op.LoopGraphs(max_captures=3, reuse_outputs=True)
    graphs._entries["x"] = object()  # a layer holding captures can be deep-copied and pickled
    for other in (copy.deepcopy(graphs), pickle.loads(pickle.dumps(graphs))):
        assert len(other._entries) == 0 and other.max_captures == 3 and other.reuse_outputs
    with pytest.raises(ValueError, match="max_captures must be >= 1, got 0"):
        lact_op.LoopGraphs(max_captures=0)


@pytest.mark.gpu
@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_loop_graphs_match_reference_gpu(update):
    """CUDA-graphed loop (float32) against the float64 CPU reference, on three fresh sets of
    inputs (replays), two call sites chained as two layers; gradients returned fresh (kept
    across steps unchanged); a second forward before a backward makes that backward raise."""
    torch.backends.cuda.matmul.allow_tf32 = False
    kw = dict(chunk_size=16, update=update)
    sites = [lact_op.LoopGraphs(), lact_op.LoopGraphs()]
    kept = None
    for step in range(3):
        inputs = make(B=2, H=2, N=70, D=16, Dh=16, D2=16, dtype=torch.float64, seed=20 + step)
        second_w = [t.detach().clone().requires_grad_(True) for t in inputs[5:]]
        ref1 = lact_reference(*inputs, **kw)
        ref = lact_reference(ref1, *inputs[1:5], *second_w, **kw)  # layer 2 reads layer 1's output
        go = torch.randn_like(ref)
        want = torch.autograd.grad(ref, [*inputs, *second_w], go, allow_unused=True)
        dev = [t.detach().float().cuda().requires_grad_(True) for t in [*inputs, *second_w]]
        o1 = lact_chunked(*dev[:8], **kw, compile="graphs", graphs=sites[0])
        out = lact_chunked(o1, *dev[1:5], *dev[8:], **kw, compile="graphs", graphs=sites[1])
        got = torch.autograd.grad(out, dev, go.float().cuda(), allow_unused=True)
        assert rel(out.double().cpu(), ref) < 1e-4
        for name, a, b in zip(NAMES + ["w1'", "w2'", "w3'"], got, want, strict=True):
            if name == "beta" and update == "gd":
                continue
            assert rel(a.double().cpu(), b) < 1e-3, (step, name)
        if kept is not None:  # last step's gradient was not overwritten by this step's replay
            assert torch.equal(kept[0], kept[1])
        kept = (got[5], got[5].clone())
    o_first = lact_chunked(*dev[:8], **kw, compile="graphs", graphs=sites[0])
    lact_chunked(*dev[:8], **kw, compile="graphs", graphs=sites[0]).sum().backward()
    with pytest.raises(RuntimeError, match="overwritten by a later forward"):
        o_first.sum().backward()


@pytest.mark.gpu
def test_loop_graphs_evict_and_recapture_gpu():
    """With room for one capture, alternating sequence lengths (one not a multiple of the
    chunk) evicts and recaptures; every call still matches the float64 CPU reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    kw = dict(chunk_size=16, update="muon")
    graphs = lact_op.LoopGraphs(max_captures=1)
    for step, N in enumerate([70, 48, 70]):
        inputs = make(B=1, H=2, N=N, D=16, Dh=16, D2=16, dtype=torch.float64, seed=40 + step)
        ref = lact_reference(*inputs, **kw)
        go = torch.randn_like(ref)
        want = torch.autograd.grad(ref, inputs, go, allow_unused=True)
        dev = [t.detach().float().cuda().requires_grad_(True) for t in inputs]
        out = lact_chunked(*dev, **kw, compile="graphs", graphs=graphs)
        got = torch.autograd.grad(out, dev, go.float().cuda(), allow_unused=True)
        assert len(graphs._entries) == 1
        assert rel(out.double().cpu(), ref) < 1e-4, N
        for name, a, b in zip(NAMES, got, want, strict=True):
            assert rel(a.double().cpu(), b) < 1e-3, (N, name)


@pytest.mark.gpu
@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_packed_fast_path_on_cuda_matches_reference_gpu(monkeypatch, update):
    """Packed rows on CUDA (float32) against the float64 CPU reference, output and every gradient:
    the whole loop compiled by inductor, then replayed from CUDA graphs for three sets of
    documents, two of them on lanes of one shape (one capture per shape, replayed with new
    resets). The rows move by the Triton kernel, straight into the graphs' q, k, v buffers once
    a capture of the lanes' shape exists."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from fastweights.ops import rows as rows_op

    launch, into = rows_op._launch, []
    monkeypatch.setattr(rows_op, "_launch", lambda *a, **k: into.append(len(a) > 4 and a[4] is not None)
                        or launch(*a, **k))
    graphs = lact_op.LoopGraphs()
    seen = set()
    sets = [PACKED, PACKED, [[3, 26], [29], [10, 10, 9]], [[2] * 14 + [1], [29], [1, 28]]]
    shapes = {(lanes.L, lanes.U) for lanes in (lact_op.LaCTLanes(packed_positions(r) == 0, 8) for r in sets[1:])}
    assert len(shapes) == 2
    for step, rows in enumerate(sets):
        inputs = make(B=3, H=2, N=29, D=16, Dh=16, D2=16, dtype=torch.float64, seed=60 + step)
        kw = dict(chunk_size=8, update=update, position_ids=packed_positions(rows))
        ref = lact_reference(*inputs, **kw)
        go = torch.randn_like(ref)
        want = torch.autograd.grad(ref, inputs, go, allow_unused=True)
        dev = [t.detach().float().cuda().requires_grad_(True) for t in inputs]
        kw["position_ids"] = kw["position_ids"].cuda()
        mode = dict(compile=True) if step == 0 else dict(compile="graphs", graphs=graphs)
        into.clear()
        out = lact_chunked(*dev, **kw, **mode)
        shape = (lambda la: (la.L, la.U))(lact_op.LaCTLanes(packed_positions(rows) == 0, 8))
        assert into.count(True) == (3 if step > 0 and shape in seen else 0), (step, into)
        assert len(into) >= 6  # q, k, v, lr, β, the first reads and the way back: all on the kernel
        if step > 0:
            seen.add(shape)
        got = torch.autograd.grad(out, dev, go.float().cuda(), allow_unused=True)
        assert rel(out.double().cpu(), ref) < 1e-4, step
        for name, a, b in zip(NAMES, got, want, strict=True):
            if name == "beta" and update == "gd":
                continue
            assert rel(a.double().cpu(), b) < 1e-3, (step, name)
    assert len(graphs._entries) == 2


@pytest.mark.parametrize("update", ["gd", "momentum", "muon"])
def test_decoding_skips_the_updates_no_row_keeps(monkeypatch, update):
    """Decoding one token per call with a carried state runs the chunk update (gradients,
    momentum, Newton-Schulz) only in the calls where some row completes a chunk (once every
    call, its result discarded), and gives bitwise the outputs and states of running every
    update (``SKIP_OPEN_CHUNK_UPDATES = False``) and the full pass's outputs; one row starts a
    new document mid-stream, so the rows complete chunks at different calls."""
    inputs = make(B=2, N=15, D=6, Dh=6, seed=17, grad=False)
    C = 4
    pos = torch.stack([torch.arange(15), torch.cat([torch.arange(6), torch.arange(9)])])
    full = lact_reference(*inputs, chunk_size=C, update=update, position_ids=pos)
    steps = []
    real_step = lact_op._step
    monkeypatch.setattr(lact_op, "_step", lambda *a: steps.append(1) or real_step(*a))

    def decode(skip):
        monkeypatch.setattr(lact_op, "SKIP_OPEN_CHUNK_UPDATES", skip)
        steps.clear()
        state, outs, states = None, [], []
        for n in range(15):
            piece = [t[:, :, n:n + 1] for t in inputs[:5]] + list(inputs[5:])
            o, state = lact_chunked(*piece, chunk_size=C, update=update, position_ids=pos[:, n:n + 1],
                                    state=state, output_final_state=True)
            outs.append(o)
            states.append(state)
        return torch.cat(outs, 2), states, len(steps)

    out, states, n_steps = decode(True)
    out_all, states_all, n_steps_all = decode(False)
    # row 0 completes chunks at tokens 3, 7, 11; row 1 at 3 and at 9, 13 (its second document)
    assert (n_steps, n_steps_all) == (5, 15)
    assert torch.equal(out, out_all)
    for s, s_all in zip(states, states_all, strict=True):
        for name, t in vars(s).items():
            t_all = getattr(s_all, name)
            assert (torch.equal(t, t_all) and t.dtype == t_all.dtype) if torch.is_tensor(t) else t == t_all, name
    assert rel(out, full) < 1e-10
