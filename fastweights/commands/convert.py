"""``fastweights convert``: convert a local Hugging Face causal LM to In-Place TTT and save it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastweights.config import option, parse
from fastweights.errors import FastWeightsError
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


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str]) -> int:
    from fastweights.models import convert

    cfg = parse(ConvertConfig, argv, "fastweights convert", __doc__)
    if not cfg.model or not cfg.out:
        raise FastWeightsError("pass --model DIR and --out DIR")
    if cfg.dtype not in DTYPES:
        raise FastWeightsError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():  # save_pretrained would only log it and return
        raise FastWeightsError(f"--out {cfg.out} exists and is not a directory")
    with hf_progress_bars(cfg.progress):
        model = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
        convert(model, layers=cfg.layers, chunk_size=cfg.chunk_size, lr=cfg.lr, target=cfg.target, proj=cfg.proj,
                max_update_norm=cfg.max_update_norm)
        model.save_pretrained(cfg.out)
    src = Path(cfg.model)
    if (src / "tokenizer.json").exists() or (src / "tokenizer_config.json").exists():
        from fastweights.data.tokenizer import load_tokenizer

        load_tokenizer(src).save_pretrained(cfg.out)
    print(f"converted layers {model.config.ttt_layers} (chunk {cfg.chunk_size}, lr {cfg.lr}, "
          f"target {cfg.target}, {str(model.dtype).removeprefix('torch.')}) -> {cfg.out}")
    return 0
