"""PNG charts (matplotlib figures outside pyplot: the caller's backend is left alone): loss by
position for several runs, and the passkey accuracy heatmap."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["figure", "image_path", "plot_passkey", "plot_position_losses"]


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], dpi: float = 100, **subplots):
    """``(fig, axes)`` as pyplot's ``subplots`` returns them, made without pyplot: nothing changes the
    process's backend (a notebook's inline display stays) and nothing stays registered."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **subplots)


def _bucket_label(start: int, end: int) -> str:
    def k(n):
        return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)

    return f"{k(start)}–{k(end)}"


def bucket_axis(runs: list[tuple[str, dict]]) -> tuple[list[tuple[int, int]], list[tuple[str, list, list]]]:
    """The x axis of :func:`plot_position_losses`: every bucket (start, end) of any run, in
    position order, and per run (label, x indices, losses), each point on its own bucket (a
    bucket without a loss leaves a gap; runs with other buckets share the axis)."""
    if not runs:
        raise ValueError("plot_position_losses needs at least one run")
    spans = sorted({(x["start"], x["end"]) for _, res in runs for x in res["buckets"]})
    where = {span: i for i, span in enumerate(spans)}
    lines = []
    for label, res in runs:
        b = [x for x in res["buckets"] if x["loss"] is not None]
        lines.append((label, [where[(x["start"], x["end"])] for x in b], [x["loss"] for x in b]))
    return spans, lines


def plot_position_losses(runs: list[tuple[str, dict]], out: str | os.PathLike, title: str = "") -> Path:
    """One line per run: mean next-token loss in each position bucket.

    ``runs``: (label, result of :func:`fastweights.eval.lm.loss_by_position`)."""
    spans, lines = bucket_axis(runs)
    fig, ax = figure(figsize=(7, 4.2), dpi=120)
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xticks(range(len(spans)))
    ax.set_xticklabels([_bucket_label(*span) for span in spans])
    ax.set_xlabel("token position")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(title or "Loss by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def image_path(out: str | os.PathLike) -> Path:
    """The path an image for ``out`` is written to: ``out`` where its suffix is a format matplotlib
    writes (``.png``, ``.svg``, ``.pdf``, ...), else ``out`` with ``.png`` appended (``heat_run1.2``
    → ``heat_run1.2.png``; matplotlib would read ``2`` as a format and refuse it)."""
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out)
    if out.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        out = out.with_name(out.name + ".png")
    return out


def _save(fig, out: str | os.PathLike) -> Path:
    """Write ``fig`` to :func:`image_path` (``out``) and return the path written."""
    out = image_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_passkey(result: dict, out: str | os.PathLike, title: str = "") -> Path:
    """Heatmap of passkey accuracy: context length (rows) by needle depth (columns)."""
    acc = result["accuracy"]
    fig, ax = figure(figsize=(1.2 + 0.9 * len(result["depths"]), 1.2 + 0.6 * len(result["lengths"])), dpi=120)
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(result["depths"])))
    ax.set_xticklabels([f"{d:.0%}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])))
    ax.set_yticklabels([str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or "Passkey retrieval")
    fig.tight_layout()
    return _save(fig, out)
