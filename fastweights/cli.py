"""The ``fastweights`` command. Thin: each subcommand lives in ``fastweights.commands.<name>``
and exposes ``main(argv) -> int``; experiments live in ``fastweights.experiments.<name>``."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

from fastweights.errors import FastWeightsError, FastWeightsWarning

COMMANDS = {
    "main": "the README's main job on the embedded default corpus",
    "prepare": "build a corpus and tokenise it into a dataset directory",
    "train": "train a preset or a local Hugging Face model (optionally with In-Place TTT)",
    "eval": "perplexity, loss by position and passkey retrieval of a local model",
    "convert": "convert a local Hugging Face causal LM to In-Place TTT",
    "generate": "continue a prompt with a local model",
    "plot": "draw the loss by position of several runs on one PNG",
    "experiment": "run a named experiment (fastweights experiment --help lists them)",
}


def _experiments() -> list[str]:
    import fastweights.experiments as pkg

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _run_experiment(argv: list[str]) -> int:
    names = _experiments()
    parser = argparse.ArgumentParser(prog="fastweights experiment", description="Run a named experiment.")
    parser.add_argument("name", choices=names, help="one of: " + ", ".join(names))
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if not argv:  # a missing argument, as argparse reports one: usage on stderr, status 2
        parser.print_help(sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv[:1])
    mod = importlib.import_module("fastweights.experiments." + args.name.replace("-", "_"))
    return int(mod.main(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = {name: help for name, help in COMMANDS.items()}
    parser = argparse.ArgumentParser(prog="fastweights", description="Fast weights for language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help in available.items():
        sub.add_parser(name, help=help, add_help=False)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv and argv[0] == "--version":
        print(f"fastweights {_version()}")
        return 0
    if not argv:  # no subcommand: the help on stderr, status 2 (argparse's code for a missing argument)
        parser.print_help(sys.stderr)
        return 2
    if argv[0] not in available:
        parser.parse_args(argv[:1])  # prints the usage error and exits 2
    try:
        with warnings.catch_warnings():  # the library's warnings as one line each, every time
            warnings.simplefilter("always", FastWeightsWarning)
            warnings.showwarning = _show_warning
            if argv[0] == "experiment":
                return _run_experiment(argv[1:])
            mod = importlib.import_module("fastweights.commands." + argv[0])
            return int(mod.main(argv[1:]) or 0)
    except (FastWeightsError, OSError, ValueError) as err:  # OSError: a path that cannot be written
        print(f"fastweights {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"train": " (`--resume` continues a training run from its last checkpoint)",
            "main": " (run it again with the same --out to continue its training runs)"}.get(argv[0], "")
        print(f"\nfastweights {argv[0]}: interrupted{hint}", file=sys.stderr)
        return 130


_default_show = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """``warning: <message>`` for a :class:`FastWeightsWarning` (under torchrun, from rank 0 only:
    every rank runs the same command); Python's format for the others."""
    if issubclass(category, FastWeightsWarning):
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: {message}", file=sys.stderr)
    else:
        _default_show(message, category, filename, lineno, file, line)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastweights")
    except PackageNotFoundError:  # run from a source tree without installing
        from fastweights import __version__

        return __version__


if __name__ == "__main__":
    sys.exit(main())
