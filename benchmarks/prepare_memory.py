"""Peak memory of tokenising a corpus with long documents (``fastweights prepare``'s last step).

Builds a synthetic corpus in a temporary directory (``--big`` documents of about ``--big-mb``
MB, plus 30 small ones), trains a 400-token BPE on it, then reports how much the process's
peak resident memory (``ru_maxrss``) grows while ``tokenize_corpus`` runs. Run it in a fresh
process per measurement (the peak only grows):

    PYTHONPATH=. python benchmarks/prepare_memory.py [--big 6] [--big-mb 9]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time
from pathlib import Path

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "def", "return", "日本", "x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", type=int, default=6, help="long documents")
    ap.add_argument("--big-mb", type=float, default=9.0, help="size of each long document (MB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTWEIGHTS_CACHE"] = str(Path(tmp) / "cache")
        from fastweights.data.corpus import build_corpus
        from fastweights.data.store import tokenize_corpus
        from fastweights.data.tokenizer import train_bpe

        root, rng = Path(tmp) / "corpus", random.Random(0)
        root.mkdir()
        lines = int(args.big_mb * 2**20 / 66)  # ~66 bytes per line of 12 words
        for i in range(args.big):
            (root / f"big{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12))
                                                        for _ in range(lines)))
        for i in range(30):
            (root / f"small{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 3000))))
        corpus = build_corpus(str(root), 0.2, progress=False)
        tok = train_bpe(corpus, 400, sample_bytes=1 << 20, progress=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        t = time.perf_counter()
        tokenize_corpus(corpus, tok, Path(tmp) / "data", progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        mb = corpus.manifest["bytes"] / 2**20
        print(f"corpus {mb:.1f} MB in {corpus.manifest['documents']} documents: peak memory {before} MB before "
              f"tokenising, {after} MB after (+{after - before} MB), {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
