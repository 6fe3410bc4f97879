"""Experiments reproducing the papers; each module exposes ``main(argv) -> int``."""
