"""A small synthetic text corpus and prepared dataset for the data/train/eval/CLI tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("def class return import self value data model train token layer weight fast slow "
         "loss step chunk update memory state key query index list dict print yield").split()


def write_corpus(root: Path, docs: int = 24, seed: int = 0, max_words: int = 1500) -> Path:
    """``docs`` text documents (half .txt, half as JSONL lines) of 50..``max_words`` words."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(docs):
        n = rng.randint(min(50, max_words), max_words)
        text = " ".join(rng.choice(WORDS) + ("\n" if rng.random() < 0.1 else "") for _ in range(n))
        if i % 2:
            lines.append(json.dumps({"text": text, "id": i}))
        else:
            (root / f"doc{i:02d}.txt").write_text(text)
    (root / "more.jsonl").write_text("\n".join(lines) + "\n")
    return root


def prepare_args(corpus: Path, out: Path) -> list[str]:
    return ["--corpus", str(corpus), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.25"]


def train_args(data: Path, out: Path, steps: int = 4, **extra) -> list[str]:
    args = ["--data", str(data), "--out", str(out), "--steps", str(steps), "--seq-len", "48",
            "--batch-size", "2", "--warmup", "2", "--save-every", "2", "--no-progress", "--threads", "1"]
    extra.setdefault("model", "tiny")
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args
