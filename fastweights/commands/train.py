"""``fastweights train``: train a preset or a local Hugging Face model on a prepared dataset."""

from __future__ import annotations

import json
import os

from fastweights.config import parse
from fastweights.train.trainer import TrainConfig, train


def main(argv: list[str]) -> int:
    cfg = parse(TrainConfig, argv, "fastweights train", __doc__)
    summary = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 reports
        print(json.dumps(summary, indent=2))
    return 0
