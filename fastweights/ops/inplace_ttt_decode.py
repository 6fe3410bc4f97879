"""In-Place TTT across model calls: the fast-weight state of one layer (decoding and streaming).

The semantics are those of :func:`~fastweights.ops.inplace_ttt.inplace_ttt_reference`, split over
calls. Per sequence, the state of one TTT layer is (docs/generation.md):

* the completed chunks of the open document, in one of two forms (accumulated in float32,
  float64 for float64 inputs):

  - **factored**: their ``z`` (n, f) and targets ``v`` (n, d); a token reads
    ``η (z Zᵀ) V`` (block-causal linear attention), ``n·(d+f)`` numbers;
  - **dense**: ``S = Σ vᵀ z`` (d, f); a token reads ``η z Sᵀ``, ``d·f`` numbers.

  The state is factored while ``n·(d+f) < d·f`` and switches to dense as soon as
  ``n ≥ d·f/(d+f)``, the point where dense is no larger (n counts the longest row of the batch);
* the buffer of the open chunk: its ``z`` (< C, f) and target source ``s`` (< C, d). The conv
  looks up to two tokens ahead inside the chunk, so a chunk's update is made when it completes.

Rows of a batch are independent: each has its own count of tokens, so left-padded rows complete
their chunks at different steps. Padding tokens are skipped: they are never buffered and never
counted, so the fast weights see each row as if its padding were absent.

:class:`StepPlan` is the host-side bookkeeping of one model call (which columns hold real tokens,
where documents start, how many tokens each row had before), shared by all TTT layers;
:class:`InPlaceTTTState` holds one layer's tensors and advances them by one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastweights.ops.inplace_ttt import check_max_update_norm, chunk_ids, clip_targets, inplace_ttt, ttt_target
from fastweights.ops.inplace_ttt_fast import _addmm_into

__all__ = ["STATE_FORMS", "InPlaceTTTState", "StepPlan"]

STATE_FORMS = ("auto", "dense", "factored")
_STATE_TENSORS = ("dense", "past_z", "past_v", "buf_z", "buf_s")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sum_vz(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per row Σ_t v_tᵀ z_t: v (R, L, d) float32, z (R, L, f) → (R, d, f) float32 (float64 for float64).

    As in the CUDA fast path, half-precision operands on CUDA accumulate straight into float32
    (tensor cores); elsewhere the operands are upcast.
    """
    acc = _acc(z.dtype)
    if not (z.is_cuda and z.dtype in (torch.float16, torch.bfloat16)):
        return torch.bmm(v.to(acc).transpose(1, 2), z.to(acc))
    out = torch.zeros(z.shape[0], v.shape[2], z.shape[2], dtype=acc, device=z.device)
    vl = v.to(z.dtype)
    for r in range(z.shape[0]):
        _addmm_into(out[r], vl[r].t(), z[r], beta=1.0)
    return out


# --------------------------------------------------------------------------- plan
@dataclass
class _Layout:
    """Per-row positions of one call for chunk length C, in window coordinates.

    The window of row b is its open chunk's buffer (``buf[b]`` tokens) followed by its real new
    tokens; column 0 is the start of the open chunk.
    """

    buf: list[int]  # buffered tokens before the call
    full: list[int]  # tokens of completed chunks before the call (open document)
    length: list[int]  # window length
    starts: list[list[int]]  # window columns that start a document (0 always)
    cont_end: list[int]  # the first columns that do not belong to the continuing document
    last: list[int]  # window column of the last document start
    done: list[int]  # tokens from `last` on that complete chunks in this call
    new_full: list[int]  # completed-chunk tokens after the call
    simple: bool  # window == new tokens (no buffer, no padding, one document per row)
    tensors: dict = field(default_factory=dict)


class StepPlan:
    """Host-side bookkeeping of one model call through a cache; shared by all TTT layers.

    Args:
        before: real tokens of each row's open document before the call (B,).
        length: N, the columns of this call.
        real: (B, N) bool, False on padding; None when every token is real.
        starts: (B, N) bool, True where a document starts (``position_ids == 0``); or None.
    """

    def __init__(self, before: list[int], length: int, real: torch.Tensor | None, starts: torch.Tensor | None):
        B = len(before)
        self.batch, self.length = B, length
        self.before = list(before)
        # one device-to-host transfer for both masks
        both = [t.to(torch.bool).expand(B, length) for t in (real, starts) if t is not None]
        host = torch.stack(both).cpu() if both else None
        real_h = None if real is None else host[0]
        starts_h = None if starts is None else host[-1]
        if real_h is not None and bool(real_h.all()):
            real_h = None
        # real columns per row (None: all of them)
        self.cols: list[list[int]] | None = (
            None if real_h is None else [torch.nonzero(real_h[b]).flatten().tolist() for b in range(B)]
        )
        self.counts = [length] * B if self.cols is None else [len(c) for c in self.cols]
        # resets[b]: indices into row b's real tokens that start a document
        self.resets: list[list[int]] = [[] for _ in range(B)]
        if starts_h is not None:
            st = starts_h if real_h is None else starts_h & real_h
            rank = None if real_h is None else real_h.long().cumsum(1) - 1  # column -> index among real tokens
            for b, j in torch.nonzero(st).tolist():
                self.resets[b].append(j if rank is None else int(rank[b, j]))
        # rows whose first real token starts a new document: their old state is dropped
        self.fresh = [bool(r and r[0] == 0) for r in self.resets]
        self.effective = [0 if f else n for f, n in zip(self.fresh, self.before, strict=True)]
        self.after = []
        for b in range(B):
            inner = [j for j in self.resets[b] if j > 0]
            self.after.append(self.counts[b] - inner[-1] if inner else self.effective[b] + self.counts[b])
        self.decode = length == 1 and self.cols is None and not any(self.resets)
        self._layouts: dict[int, _Layout] = {}

    def layout(self, chunk_size: int) -> _Layout:
        """Window positions for chunk length C (computed once per C and shared)."""
        if chunk_size in self._layouts:
            return self._layouts[chunk_size]
        C = chunk_size
        buf = [n % C for n in self.effective]
        full = [n - r for n, r in zip(self.effective, buf, strict=True)]
        length, starts, cont_end, last, done, new_full = [], [], [], [], [], []
        for b in range(self.batch):
            L = buf[b] + self.counts[b]
            st = [0] + [buf[b] + j for j in self.resets[b] if j > 0]
            ls = st[-1]
            nc = (L - ls) // C * C
            length.append(L)
            starts.append(st)
            cont_end.append(st[1] if len(st) > 1 else L)
            last.append(ls)
            done.append(nc)
            new_full.append((full[b] if ls == 0 else 0) + nc)
        simple = self.cols is None and not any(buf) and not any(len(s) > 1 for s in starts)
        lay = _Layout(buf, full, length, starts, cont_end, last, done, new_full, simple)
        self._layouts[C] = lay
        return lay


# --------------------------------------------------------------------------- state
class InPlaceTTTState:
    """The fast-weight state of one In-Place TTT layer for a batch of sequences.

    Args:
        chunk_size: the layer's C.
        form: ``"auto"`` (factored while smaller, then dense), ``"dense"`` or ``"factored"``.

    Tensors (all with the batch first, so beam search can reorder them):
        dense (B, d, f), or past_z (B, n, f) and past_v (B, n, d) (rows zero past their own n);
        buf_z (B, cap, f), buf_s (B, cap, d): the open chunk, in the dtypes of z and s.
    """

    def __init__(self, chunk_size: int, form: str = "auto"):
        if form not in STATE_FORMS:
            raise ValueError(f"form must be one of {STATE_FORMS}, got {form!r}")
        self.chunk_size, self.form = chunk_size, form
        self.dense: torch.Tensor | None = None
        self.past_z: torch.Tensor | None = None
        self.past_v: torch.Tensor | None = None
        self.buf_z: torch.Tensor | None = None
        self.buf_s: torch.Tensor | None = None

    def _tensors(self) -> list[str]:
        return [n for n in _STATE_TENSORS if getattr(self, n) is not None]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (1-D long), in that order: beam reorder, repeat, select."""
        for n in self._tensors():
            t = getattr(self, n)
            setattr(self, n, t.index_select(0, index.to(t.device)))

    def save(self) -> tuple:
        """The state as it is now, for :meth:`restore` (references: a call never writes into a tensor
        it found, except the buffer past its tokens, which nothing reads)."""
        return tuple(getattr(self, n) for n in _STATE_TENSORS)

    def restore(self, saved: tuple) -> None:
        """Go back to what :meth:`save` returned (a model call that failed)."""
        for n, t in zip(_STATE_TENSORS, saved, strict=True):
            setattr(self, n, t)

    def numel(self) -> int:
        """Numbers held for the completed chunks (the dense or factored state, not the buffer)."""
        return sum(getattr(self, n).numel() for n in ("dense", "past_z", "past_v") if getattr(self, n) is not None)

    # ---------------------------------------------------------------- reading
    def read(self, z: torch.Tensor) -> torch.Tensor | None:
        """``z`` (B, L, f) → the state's contribution before η, (B, L, d) float32; None if empty."""
        if self.dense is not None:
            return torch.bmm(z.to(self.dense.dtype), self.dense.transpose(1, 2))
        if self.past_z is not None:
            za = z.to(self.past_z.dtype)
            return torch.bmm(torch.bmm(za, self.past_z.transpose(1, 2)), self.past_v)
        return None

    # ---------------------------------------------------------------- writing
    def _zero_rows(self, rows: list[int]) -> None:
        for n in ("dense", "past_z", "past_v"):
            t = getattr(self, n)
            if t is not None and rows:  # a new tensor: the old one may be restored (save)
                setattr(self, n, t.index_fill(0, torch.tensor(rows, device=t.device), 0))

    def _ensure_buffer(self, B: int, need: int, f: int, d: int, z: torch.Tensor, s: torch.Tensor,
                       fresh: bool = False) -> None:
        """Room for ``need`` open-chunk tokens per row: z's buffer in z's dtype, s's in s's.
        ``fresh``: new, empty tensors even where the old ones have room (they are to be rewritten)."""
        cap = 0 if self.buf_z is None else self.buf_z.shape[1]
        if need <= cap and not fresh:
            return
        new_cap = cap if need <= cap else min(self.chunk_size, max(need, 2 * cap))
        bz = z.new_zeros(B, new_cap, f)
        bs = s.new_zeros(B, new_cap, d)
        if cap and not fresh:
            bz[:, :cap] = self.buf_z
            bs[:, :cap] = self.buf_s
        self.buf_z, self.buf_s = bz, bs

    def _add(self, entries, delta, new_full: list[int], keep: list[bool], d: int, f: int) -> None:
        """Add completed-chunk tokens to the state.

        ``entries()`` → ``(rows, dst, z, v)``: token k goes to row ``rows[k]`` at factored position
        ``dst[k]``, with ``z`` (K, f) and ``v`` (K, d) in the accumulation dtype. ``delta()`` → the
        same tokens as a dense update Σ vᵀz, (B, d, f). Only the one the state's form needs is called.
        ``keep[b]`` False drops row b's old state first (a document started); ``new_full[b]`` is the
        number of completed-chunk tokens of row b afterwards.
        """
        B = len(new_full)
        n = max(new_full)
        if not all(keep):
            self._zero_rows([b for b in range(B) if not keep[b]])
        dense = self.form == "dense" or (self.form == "auto" and (self.dense is not None or n * (d + f) >= d * f))
        if dense:
            upd = delta()
            if self.dense is None and self.past_z is not None:  # the switch: S = Vᵀ Z
                self.dense = torch.bmm(self.past_v.transpose(1, 2), self.past_z)
                self.past_z = self.past_v = None
            self.dense = upd if self.dense is None else self.dense + upd
            return
        rows, dst, z, v = entries()
        if n == 0:
            self.past_z = self.past_v = None
            return
        old = 0 if self.past_z is None else self.past_z.shape[1]
        if self.past_z is None:
            self.past_z, self.past_v = z.new_zeros(B, n, f), z.new_zeros(B, n, d)
        elif n > old:
            self.past_z = torch.cat([self.past_z, self.past_z.new_zeros(B, n - old, f)], 1)
            self.past_v = torch.cat([self.past_v, self.past_v.new_zeros(B, n - old, d)], 1)
        elif n < old:  # rows restarted: nothing lives past n any more
            self.past_z = self.past_z[:, :n].clone(memory_format=torch.contiguous_format)
            self.past_v = self.past_v[:, :n].clone(memory_format=torch.contiguous_format)
        elif rows.numel():  # written below: a new tensor, the old one may be restored (save)
            self.past_z, self.past_v = self.past_z.clone(), self.past_v.clone()
        if rows.numel():
            self.past_z[rows, dst] = z
            self.past_v[rows, dst] = v

    # ---------------------------------------------------------------- one call
    def step(self, z: torch.Tensor, s: torch.Tensor, w0: torch.Tensor, conv_weight: torch.Tensor,
             proj: torch.Tensor | None, lr: float, plan: StepPlan, max_update_norm: float | None = None
             ) -> torch.Tensor:
        """Advance by one model call and return the TTT MLP output o (B, N, d).

        ``z`` (B, N, f) MLP hidden and ``s`` (B, N, d) target source of the call's tokens;
        ``w0`` (d, f), ``conv_weight`` (d, 1, 5), ``proj`` (d, d) or None, ``lr`` η;
        ``max_update_norm`` τ bounds each completed chunk's update (``clip_targets``).
        """
        tau = check_max_update_norm(max_update_norm)
        B, N, f = z.shape
        d = s.shape[2]
        if B != plan.batch or N != plan.length:
            raise ValueError(f"inputs of shape {tuple(z.shape[:2])} do not match the step plan ({plan.batch}, {N})")
        if B == 0:  # no rows: nothing to read or keep
            return z.new_zeros(0, N, d)
        fresh = [b for b in range(B) if plan.fresh[b] and plan.before[b] > 0]
        self._zero_rows(fresh)
        # the state's arithmetic picks its own precisions (the accumulators are float32 or float64):
        # autocast would hand it half-precision products; the plain product reads W0 in z's dtype
        with torch.autocast(z.device.type, enabled=False):
            w0 = w0.to(z.dtype)
            if plan.decode:
                return self._decode(z, s, w0, conv_weight, proj, lr, plan, d, f, tau)
            return self._window(z, s, w0, conv_weight, proj, lr, plan, d, f, tau)

    def _targets(self, s: torch.Tensor, conv_weight, proj, g: torch.Tensor) -> torch.Tensor:
        acc = _acc(s.dtype)
        return ttt_target(s.to(acc), conv_weight.to(acc), None if proj is None else proj.to(acc), g)

    def _decode(self, z, s, w0, conv_weight, proj, lr, plan, d, f, tau):
        """One real token per row, no document start: apply, buffer, update completed rows."""
        B, C = z.shape[0], self.chunk_size
        lay = plan.layout(C)
        o = F.linear(z, w0)
        u = self.read(z)
        if u is not None:
            o = (o.to(u.dtype) + lr * u).to(z.dtype)
        self._ensure_buffer(B, max(lay.buf) + 1, f, d, z, s)
        if min(lay.buf) == max(lay.buf):  # rows in step (no left-padding differences)
            self.buf_z[:, lay.buf[0]] = z[:, 0]
            self.buf_s[:, lay.buf[0]] = s[:, 0]
        else:
            key = ("decode", z.device)
            if key not in lay.tensors:
                lay.tensors[key] = (torch.arange(B, device=z.device), torch.tensor(lay.buf, device=z.device))
            ar, pos = lay.tensors[key]
            self.buf_z[ar, pos] = z[:, 0]
            self.buf_s[ar, pos] = s[:, 0]
        done = [b for b in range(B) if lay.buf[b] + 1 == C]
        if done:
            acc = _acc(z.dtype)
            rows = torch.tensor(done, device=z.device)
            zc = self.buf_z[rows, :C]
            one_chunk = torch.zeros(len(done), C, dtype=torch.long, device=z.device)
            v = clip_targets(self._targets(self.buf_s[rows, :C], conv_weight, proj, one_chunk), zc, one_chunk, lr,
                             tau)

            def entries():
                dst = torch.tensor([lay.full[b] + i for b in done for i in range(C)], device=z.device)
                return rows.repeat_interleave(C), dst, zc.reshape(-1, f).to(acc), v.reshape(-1, d)

            def delta():
                return torch.zeros(B, d, f, dtype=acc, device=z.device).index_add_(0, rows, _sum_vz(v, zc))

            new_full = [lay.full[b] + (C if b in done else 0) for b in range(B)]
            self._add(entries, delta, new_full, [True] * B, d, f)
        return o

    def _window(self, z, s, w0, conv_weight, proj, lr, plan, d, f, tau):
        """General call: per row, the open chunk's buffer followed by the real new tokens."""
        B, N = z.shape[:2]
        C, lay, dev = self.chunk_size, plan.layout(self.chunk_size), z.device
        acc = _acc(z.dtype)
        if lay.simple:
            zc, sc, pos, Lmax = z, s, None, N
        else:
            nb = max(lay.buf)
            Lmax = max(lay.length)
            idx = torch.zeros(B, max(Lmax, 1), dtype=torch.long)
            valid = torch.zeros(B, max(Lmax, 1), dtype=torch.bool)
            starts = torch.zeros(B, max(Lmax, 1), dtype=torch.bool)
            for b in range(B):
                cols = range(N) if plan.cols is None else plan.cols[b]
                row = list(range(lay.buf[b])) + [nb + c for c in cols]
                idx[b, : len(row)] = torch.tensor(row, dtype=torch.long)
                valid[b, : len(row)] = True
                starts[b, lay.starts[b]] = True
                if lay.length[b] < Lmax:  # the filler is a document of its own
                    starts[b, lay.length[b]] = True
            idx, valid = idx[:, :Lmax].to(dev), valid[:, :Lmax].to(dev)
            src_z = z if nb == 0 else torch.cat([self.buf_z[:, :nb], z], 1)
            src_s = s if nb == 0 else torch.cat([self.buf_s[:, :nb], s], 1)
            m = valid.unsqueeze(-1)
            zc = torch.gather(src_z, 1, idx.unsqueeze(-1).expand(-1, -1, f)) * m.to(z.dtype)
            sc = torch.gather(src_s, 1, idx.unsqueeze(-1).expand(-1, -1, d)) * m.to(s.dtype)
            pos = (~starts[:, :Lmax]).long().to(dev)
        if Lmax == 0:
            return F.linear(z, w0)
        oc = inplace_ttt(zc, sc, w0, conv_weight, proj, lr, C, position_ids=pos, max_update_norm=tau)
        u = self.read(zc)
        if u is not None:
            cont = torch.arange(Lmax, device=dev).unsqueeze(0) < torch.tensor(lay.cont_end, device=dev).unsqueeze(1)
            oc = (oc.to(u.dtype) + lr * u * cont.unsqueeze(-1).to(u.dtype)).to(z.dtype)

        # completed chunks of each row's last document enter the state
        keep = [lay.last[b] == 0 for b in range(B)]
        if any(lay.done) or not all(keep):
            starts = torch.zeros(B, Lmax, dtype=torch.bool, device=dev) if pos is None else pos == 0
            v = None
            if any(lay.done):
                g = chunk_ids(starts, C)[0]
                v = clip_targets(self._targets(sc, conv_weight, proj, g), zc, g, lr, tau)

            def entries():
                rows_h, dst_h, src_h = [], [], []
                for b in range(B):
                    base = lay.full[b] if keep[b] else 0
                    rows_h += [b] * lay.done[b]
                    dst_h += range(base, base + lay.done[b])
                    src_h += range(lay.last[b], lay.last[b] + lay.done[b])
                rows, src, dst = (torch.tensor(x, dtype=torch.long, device=dev) for x in (rows_h, src_h, dst_h))
                if not rows_h:
                    return rows, dst, zc.new_zeros(0, f, dtype=acc), zc.new_zeros(0, d, dtype=acc)
                return rows, dst, zc[rows, src].to(acc), v[rows, src]

            def delta():
                if v is None:
                    return torch.zeros(B, d, f, dtype=acc, device=dev)
                col = torch.arange(Lmax, device=dev).unsqueeze(0)
                lo = torch.tensor(lay.last, device=dev).unsqueeze(1)
                hi = lo + torch.tensor(lay.done, device=dev).unsqueeze(1)
                m = ((col >= lo) & (col < hi)).unsqueeze(-1).to(acc)
                return _sum_vz(v * m, zc)

            self._add(entries, delta, lay.new_full, keep, d, f)

        # the open chunk of each row's last document becomes the buffer
        bufs = [lay.length[b] - lay.last[b] - lay.done[b] for b in range(B)]
        if any(bufs):  # new tensors: these rows' old buffers may be overwritten, and may be restored (save)
            self._ensure_buffer(B, max(bufs), f, d, z, s, fresh=True)
            rows_h = [b for b in range(B) for _ in range(bufs[b])]
            dst_h = [i for b in range(B) for i in range(bufs[b])]
            src_h = [lay.last[b] + lay.done[b] + i for b in range(B) for i in range(bufs[b])]
            rows = torch.tensor(rows_h, dtype=torch.long, device=dev)
            src = torch.tensor(src_h, dtype=torch.long, device=dev)
            dst = torch.tensor(dst_h, dtype=torch.long, device=dev)
            self.buf_z[rows, dst] = zc[rows, src]
            self.buf_s[rows, dst] = sc[rows, src]

        if lay.simple:
            return oc
        o = F.linear(z, w0)  # padding keeps the plain MLP output
        rows_h, cols_h, win_h = [], [], []
        for b in range(B):
            cols = range(N) if plan.cols is None else plan.cols[b]
            rows_h += [b] * len(cols)
            cols_h += cols
            win_h += range(lay.buf[b], lay.buf[b] + len(cols))
        if rows_h:
            rows = torch.tensor(rows_h, dtype=torch.long, device=dev)
            o[rows, torch.tensor(cols_h, dtype=torch.long, device=dev)] = oc[
                rows, torch.tensor(win_h, dtype=torch.long, device=dev)]
        return o
