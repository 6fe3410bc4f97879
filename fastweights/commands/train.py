"""``fastweights train``: train a preset or a local Hugging Face model on a prepared dataset."""

from __future__ import annotations

import json

from fastweights.config import parse
from fastweights.train.trainer import TrainConfig, train


def main(argv: list[str]) -> int:
    cfg = parse(TrainConfig, argv, "fastweights train", __doc__)
    print(json.dumps(train(cfg), indent=2))
    return 0
