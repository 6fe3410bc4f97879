"""``fastweights plot``: draw the loss by position of several runs on one PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fastweights.config import parse
from fastweights.errors import FastWeightsError, check_file_path, is_int, is_real, warn
from fastweights.eval.plot import image_path, plot_position_losses


@dataclass
class PlotConfig:
    inputs: list[str] = field(default_factory=list, metadata={"help": "eval JSON files (from `fastweights eval`)"})
    labels: list[str] = field(default_factory=list,
                              metadata={"help": "one label per input (default: the differing part of each path)"})
    out: str = field(default="loss_by_position.png", metadata={"help": "PNG to write"})
    title: str = field(default="", metadata={"help": "chart title"})


def load_result(path: str) -> dict:
    """The loss-by-position result in an eval JSON (or a bare loss-by-position JSON)."""
    p = Path(path)
    if p.is_dir():
        raise FastWeightsError(f"{path} is a directory: pass an eval JSON file (e.g. {p / 'eval.json'})")
    if not p.is_file():
        raise FastWeightsError(f"file not found: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise FastWeightsError(f"{path}: not a UTF-8 text file (byte {err.start} is 0x{err.object[err.start]:02x}): "
                               "expected an eval JSON") from None
    except json.JSONDecodeError as err:
        raise FastWeightsError(f"{path}: not JSON ({err.msg})") from None
    if isinstance(data, dict):
        data = data.get("loss_by_position", data)
    if not isinstance(data, dict) or not isinstance(data.get("buckets"), list):
        raise FastWeightsError(f"{path}: no loss-by-position result (expected a 'buckets' list)")
    for i, b in enumerate(data["buckets"]):
        if not (isinstance(b, dict) and is_int(b.get("start")) and is_int(b.get("end")) and "loss" in b
                and (b["loss"] is None or is_real(b["loss"]))):
            raise FastWeightsError(f"{path}: bucket {i} is {b!r}; each bucket needs integer 'start' and 'end' and "
                                   f"a 'loss' (a number or null)")
    return data


def default_labels(paths: list[str]) -> list[str]:
    """What tells the inputs apart: their paths without the parts all of them share at the start
    and at the end (``runs/a/model/eval.json``, ``runs/b/model/eval.json`` → ``a``, ``b``)."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    if len(set(parts)) < len(parts) or len(parts) == 1:
        return ["/".join(filter(None, (Path(p).parent.name, Path(p).stem))) for p in paths]
    head = 0
    while all(len(x) > head + 1 for x in parts) and len({x[head] for x in parts}) == 1:
        head += 1
    tail = 0
    while all(len(x) > head + tail + 1 for x in parts) and len({x[-1 - tail] for x in parts}) == 1:
        tail += 1
    return ["/".join(x[head:len(x) - tail]) for x in parts]


def main(argv: list[str]) -> int:
    cfg = parse(PlotConfig, argv, "fastweights plot", __doc__)
    if not cfg.inputs:
        raise FastWeightsError("pass --inputs FILE [FILE ...]")
    if cfg.labels and len(cfg.labels) != len(cfg.inputs):
        raise FastWeightsError(f"got {len(cfg.labels)} labels for {len(cfg.inputs)} inputs")
    check_file_path("out", image_path(cfg.out))
    labels = cfg.labels or default_labels(cfg.inputs)
    curves = [(lab, load_result(p)) for lab, p in zip(labels, cfg.inputs, strict=True)]
    schemes = {tuple((x["start"], x["end"]) for x in res["buckets"]) for _, res in curves}
    if len(schemes) > 1:
        warn("the inputs use different position buckets (eval --length/--first-bucket differ); "
             "each loss is drawn on its own bucket, on one axis")
    out = plot_position_losses(curves, cfg.out, cfg.title)
    print(f"wrote {out}")
    return 0
