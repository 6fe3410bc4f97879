"""``fastweights convert``: convert a local Hugging Face causal LM to In-Place TTT and save it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastweights.config import option, parse
from fastweights.errors import FastWeightsError, warn
from fastweights.models.compat import hf_progress_bars
from fastweights.models.presets import load_model


@dataclass
class ConvertConfig:
    model: str = option("local Hugging Face model directory (Llama, Qwen2, Qwen3, Mistral, ...)", "")
    out: str = option("output directory", "")
    layers: list[int] | None = option("decoder layers to convert (default: every 6th from 0)", None)
    chunk_size: int = option("tokens per fast-weight update (official 4096; the paper finds 512-1024 best)", 4096)
    lr: float = option("inner learning rate eta", 3.0)
    target: str = option("target source: hidden (continual training) or embed (from scratch)", "hidden")
    proj: bool = option("learn the target projection P", True)
    max_update_norm: float | None = option("clip each chunk's fast-weight update to this Frobenius norm (default: "
                                           "no clipping)", None)
    dtype: str = option("dtype of the saved model: auto (the checkpoint's own), float32, bfloat16 or float16", "auto")
    progress: bool = option("show transformers' progress bars (loading and saving the model)", True)
    overwrite: bool = option("write into a non-empty --out (its files that the conversion does not rewrite stay, "
                             "and are named)", False)


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str]) -> int:
    from fastweights.models import convert

    cfg = parse(ConvertConfig, argv, "fastweights convert", __doc__)
    if not cfg.model or not cfg.out:
        raise FastWeightsError("pass --model DIR and --out DIR")
    if cfg.dtype not in DTYPES:
        raise FastWeightsError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    out, src = Path(cfg.out), Path(cfg.model)
    if out.exists() and not out.is_dir():  # save_pretrained would only log it and return
        raise FastWeightsError(f"--out {cfg.out} exists and is not a directory")
    before = _check_out(out, src, cfg.overwrite)  # before the model loads
    with hf_progress_bars(cfg.progress):
        model = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
        convert(model, layers=cfg.layers, chunk_size=cfg.chunk_size, lr=cfg.lr, target=cfg.target, proj=cfg.proj,
                max_update_norm=cfg.max_update_norm)
        model.save_pretrained(cfg.out)
    if (src / "tokenizer.json").exists() or (src / "tokenizer_config.json").exists():
        from fastweights.data.tokenizer import load_tokenizer

        load_tokenizer(src).save_pretrained(cfg.out)
    left = sorted(n for n, t in before.items() if (out / n).exists() and (out / n).stat().st_mtime_ns == t)
    if left:
        warn(f"--overwrite: {len(left)} files in {out} are from before and were not rewritten: "
             f"{', '.join(left[:8])}{', ...' if len(left) > 8 else ''} (remove an old eval.json or PNG: they are "
             "not this model's)")
    print(f"converted layers {model.config.ttt_layers} (chunk {cfg.chunk_size}, lr {cfg.lr}, "
          f"target {cfg.target}, {str(model.dtype).removeprefix('torch.')}) -> {cfg.out}")
    return 0


def _check_out(out: Path, src: Path, overwrite: bool) -> dict[str, int]:
    """Refuse ``--out`` that is the source model's directory, or is not empty without ``--overwrite``;
    return the files already there with their modification times (ns)."""
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise FastWeightsError(f"--out {out} is the --model directory: converting in place would overwrite the "
                               "source model; give another --out")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(p.name for p in entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise FastWeightsError(f"--out {out} is not empty ({len(entries)} entries: {shown}): give a new or empty "
                               "directory, or pass --overwrite to write the converted model into it")
    return {p.name: p.stat().st_mtime_ns for p in entries if p.is_file()}
