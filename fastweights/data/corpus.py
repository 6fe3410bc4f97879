"""Corpora: the built-in Python-source corpus and user directories of text.

A corpus is a list of :class:`Document` (name, text) in a fixed order, a deterministic
train/validation split by a hash of each name, and a manifest (file, byte and document
counts plus a SHA-256 checksum) that makes a run reproducible. Exact repeats of a document's
text are dropped (a copy could otherwise land in the other split). JSONL and parquet records
are named by their file and a hash of their text.

The default corpus (``source="python"``) is the Python source of the running interpreter:
the standard library plus site-packages. Each top-level package or stdlib module is one
document, its ``.py`` files concatenated in sorted path order, each preceded by a line
``# file: <relative path>``. This gives long, repository-level documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from fastweights._progress import progress_bar
from fastweights.errors import FastWeightsError

__all__ = ["Corpus", "Document", "build_corpus", "hash_order", "python_sources", "split_of"]

_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


@dataclass(frozen=True)
class Document:
    """One document: a unique ``name``, its ``text`` and the number of source files in it."""

    name: str
    text: str
    files: int = 1


@dataclass
class Corpus:
    """Documents in a fixed order, split into train and validation by a hash of the name."""

    documents: list[Document]
    source: str
    val_fraction: float
    manifest: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Document]:
        """The documents of split ``name`` ("train" or "val"), in corpus order."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return [d for d in self.documents if split_of(d.name, self.val_fraction) == name]


def name_bytes(name: str) -> bytes:
    """A document name as bytes: UTF-8, with a file name's bytes that are not UTF-8 (which
    Python reads as lone surrogates, U+DC80-U+DCFF) as they were: ``os.fsencode`` on a UTF-8
    file system, and the same bytes on any machine."""
    return name.encode("utf-8", "surrogateescape")


def split_of(name: str, val_fraction: float) -> str:
    """Deterministic split of a document: "val" if the SHA-256 of its name, read as a
    fraction in [0, 1), is below ``val_fraction``, else "train"."""
    h = int.from_bytes(hashlib.sha256(name_bytes(name)).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def _py_files(path: Path) -> list[Path]:
    """Sorted ``.py`` files under ``path`` (or ``[path]`` for a module file)."""
    if path.is_file():
        return [path]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith((".dist-info", ".egg-info")))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def python_sources() -> list[tuple[str, Path]]:
    """The roots of the default corpus: ``[("stdlib", dir), ("site-packages", dir), ...]``."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    seen = {roots[0][1].resolve()}
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p.resolve() not in seen:
            seen.add(p.resolve())
            roots.append(("site-packages" if len(roots) == 1 else f"site-packages-{len(roots) - 1}", p))
    return roots


def _python_documents() -> list[tuple[str, Path, list[Path]]]:
    units = []
    for label, root in python_sources():
        for entry in sorted(root.iterdir()):
            skip = entry.name.startswith(".") or entry.name.endswith((".dist-info", ".egg-info"))
            if skip or entry.name in _SKIP_DIRS:
                continue
            if entry.is_file() and entry.suffix != ".py":
                continue
            files = _py_files(entry)
            if files:
                units.append((f"{label}/{entry.stem if entry.is_file() else entry.name}", root, files))
    return units


def _read_python_doc(root: Path, files: list[Path], max_doc_bytes: int) -> tuple[str, int]:
    """The document text and the number of files in it."""
    parts, size = [], 0
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        part = f"# file: {f.relative_to(root).as_posix()}\n{text}"
        if not part.endswith("\n"):
            part += "\n"
        if max_doc_bytes and parts and size + len(part.encode()) > max_doc_bytes:
            break
        parts.append(part)
        size += len(part.encode())
    return "".join(parts), len(parts)


def _sample_key(name: str) -> bytes:
    return hashlib.sha256(b"sample:" + name_bytes(name)).digest()


def hash_order(items: list, name=lambda d: d.name) -> list:
    """``items`` (documents, or what ``name`` names) in the order of a hash of their names,
    independent of the split hash: the deterministic sample order of ``--max-mb`` and of the
    BPE's training text."""
    return sorted(items, key=lambda d: _sample_key(name(d)))


def _record_name(rel: str, text: str) -> str:
    """The name of a JSONL/parquet record: its file and a hash of its text (not its line, so that
    deleting or reordering lines moves no other record between the splits)."""
    return f"{rel}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def _corpus_files(root: Path) -> list[Path]:
    """The ``.txt``, ``.jsonl`` and ``.parquet`` files under ``root`` (extensions in any case),
    in sorted path order: symlinked directories are followed (each real directory is read once,
    so a link back up ends there; a link to ``root`` itself or to a directory above it is not
    followed, which would read files outside the corpus), hidden files and directories (names
    starting with '.') are skipped."""
    files, seen = [], set()
    top = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or (dirpath != str(root) and _contains(real, top)):  # a cycle, a second link, a link up
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted: the first path to a directory wins
        for name in filenames:
            f = Path(dirpath) / name
            if not name.startswith(".") and f.suffix.lower() in _EXTENSIONS and f.is_file():
                files.append(f)
    return sorted(files)


def _contains(outer: str, inner: str) -> bool:
    """Whether the real directory ``outer`` is ``inner`` or one of its parents."""
    return os.path.commonpath([outer, inner]) == outer


def _user_documents(root: Path, text_field: str, progress: bool = True) -> tuple[list[Document], int, list[str]]:
    """Documents from a directory of ``.txt``, ``.jsonl`` (one document per line, field
    ``text_field``) and, with pyarrow installed, ``.parquet`` files; the number of files; and
    the ``.txt`` files that are not valid UTF-8 (read with U+FFFD for their bad bytes)."""
    files = _corpus_files(root)
    if not files:
        raise FastWeightsError(f"no .txt, .jsonl or .parquet files under {root} (hidden files and directories, "
                               f"whose names start with '.', are skipped)")
    docs, replaced = [], []
    for f in progress_bar(files, desc="reading corpus", unit="file", disable=len(files) < 20 or not progress):
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() == ".txt":
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as err:  # kept, with U+FFFD for the bad bytes: prepare says so
                text = raw.decode("utf-8-sig", errors="replace")
                bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # the decoder counts from after a BOM
                replaced.append(f"{rel} (byte {err.start + bom})")
            # as a text-mode read would (JSONL and parquet texts keep theirs: "\r\n" is in their strings)
            docs.append(Document(rel, text.replace("\r\n", "\n").replace("\r", "\n")))
        elif f.suffix.lower() == ".jsonl":
            with f.open("rb") as fh:
                for i, raw in enumerate(fh):
                    try:
                        line = raw.decode("utf-8-sig" if i == 0 else "utf-8")  # a BOM may open the file
                    except UnicodeDecodeError as err:
                        bom = 3 if i == 0 and raw.startswith(b"\xef\xbb\xbf") else 0
                        raise FastWeightsError(f"{f}:{i + 1}: not UTF-8 ({err.reason} at byte {err.start + bom})"
                                               ) from None
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise FastWeightsError(f"{f}:{i + 1}: invalid JSON ({err.msg} at column {err.colno})") from None
                    if not isinstance(row, dict):
                        raise FastWeightsError(f"{f}:{i + 1}: each line must be a JSON object with field "
                                               f"{text_field!r}, got a {type(row).__name__}")
                    if text_field not in row:
                        raise FastWeightsError(f"{f}:{i + 1}: no field {text_field!r} (fields: {sorted(row)})")
                    text = _text(row[text_field], f"{f}:{i + 1}", text_field)
                    docs.append(Document(_record_name(rel, text), text))
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise FastWeightsError(f"{f}: reading parquet needs pyarrow (pip install 'fastweights[parquet]', "
                                       f"or pip install pyarrow)") from None
            table = pq.read_table(f)
            if text_field not in table.column_names:
                raise FastWeightsError(f"{f}: no column {text_field!r} (columns: {table.column_names})")
            for i, t in enumerate(table.column(text_field).to_pylist()):
                text = _text(t, f"{f} row {i}", text_field)
                docs.append(Document(_record_name(rel, text), text))
    return docs, len(files), replaced


def _text(value, where: str, field: str) -> str:
    """A document's text, which must be a string (not a number, a list, bytes or null) that
    UTF-8 can encode (JSON's escapes allow lone surrogates)."""
    if not isinstance(value, str):
        try:
            shown = json.dumps(value)
        except (TypeError, ValueError):  # not JSON: parquet bytes, say
            shown = f"{type(value).__name__} {value!r}"
        raise FastWeightsError(f"{where}: field {field!r} must be a string, got {shown[:60]}")
    try:
        value.encode()
    except UnicodeEncodeError as err:
        raise FastWeightsError(f"{where}: field {field!r} is not valid Unicode ({err.reason} at character "
                               f"{err.start})") from None
    return value


def _drop_duplicates(docs: list[Document]) -> tuple[list[Document], int]:
    """``docs`` without exact repeats of an earlier document's text (the split goes by name, so
    two copies could land in both splits); and how many were dropped."""
    seen, kept = set(), []
    for d in docs:
        key = hashlib.sha256(d.text.encode()).digest()
        if key not in seen:
            seen.add(key)
            kept.append(d)
    return kept, len(docs) - len(kept)


def build_corpus(
    source: str = "python",
    val_fraction: float = 0.05,
    max_doc_bytes: int = 0,
    max_bytes: int = 0,
    text_field: str = "text",
    progress: bool = True,
) -> Corpus:
    """Build a corpus.

    Args:
        source: ``"python"`` for the default corpus, or a directory of ``.txt``/``.jsonl``/
            ``.parquet`` files (see :func:`_corpus_files`).
        val_fraction: fraction of documents (by name hash) in the validation split.
        max_doc_bytes: if > 0, a default-corpus document stops before the file that would
            take it past this many bytes (it keeps at least one file).
        max_bytes: if > 0, keep documents in order of a hash of their name (independent of
            the split hash) until this many bytes (for the default corpus, counted from file
            sizes before reading):
            a deterministic sample of the corpus.
        text_field: the JSONL field / parquet column holding the text.
        progress: show progress bars while reading.
    """
    if not 0.0 < val_fraction < 1.0:
        raise FastWeightsError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, value in (("max_doc_bytes", max_doc_bytes), ("max_bytes", max_bytes)):
        if value < 0:
            raise FastWeightsError(f"{name} must be >= 0 (0: no cap), got {value}")
    if source == "python":
        units = _python_documents()
        if max_bytes:  # choose the sample from file sizes, then read only what it keeps
            keep, total = set(), 0
            for name, _, files in hash_order(units, name=lambda u: u[0]):
                if total >= max_bytes:
                    break
                keep.add(name)
                size = sum(f.stat().st_size for f in files)
                total += min(size, max_doc_bytes) if max_doc_bytes else size
            units = [u for u in units if u[0] in keep]
        docs = []
        for name, root, files in progress_bar(units, desc="reading Python sources", unit="doc", disable=not progress):
            text, nfiles = _read_python_doc(root, files, max_doc_bytes)
            docs.append(Document(name, text, nfiles))
        nfiles, replaced = None, []  # each document counts its files
    else:
        root = Path(source)
        if not root.exists():
            raise FastWeightsError(f"corpus directory not found: {source}")
        if not root.is_dir():
            raise FastWeightsError(f"corpus source must be 'python' or a directory, got the file {source}")
        docs, nfiles, replaced = _user_documents(root, text_field, progress)
    docs = [d for d in docs if d.text]
    if not docs:
        raise FastWeightsError(f"the corpus {source} has no document with text")
    docs, duplicates = _drop_duplicates(docs)
    if max_bytes and source != "python":
        keep, total = set(), 0
        for d in hash_order(docs):
            if total >= max_bytes:
                break
            keep.add(d.name)
            total += len(d.text.encode())
        docs = [d for d in docs if d.name in keep]
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise FastWeightsError("corpus has duplicate document names")
    digest = hashlib.sha256()
    for d in docs:
        digest.update(name_bytes(d.name) + b"\0" + d.text.encode() + b"\0")
    corpus = Corpus(docs, source, val_fraction)
    n_val = sum(split_of(d.name, val_fraction) == "val" for d in docs)
    corpus.manifest = {
        "source": source if source == "python" else str(Path(source).resolve()),
        "python": sys.version.split()[0] if source == "python" else None,
        "documents": len(docs),
        "train_documents": len(docs) - n_val,
        "val_documents": n_val,
        "files": sum(d.files for d in docs) if nfiles is None else nfiles,
        "duplicates_dropped": duplicates,
        "not_utf8": replaced[:20],  # .txt files read with U+FFFD for their bad bytes (the first 20)
        "not_utf8_files": len(replaced),
        "bytes": sum(len(d.text.encode()) for d in docs),
        "val_fraction": val_fraction,
        "max_doc_bytes": max_doc_bytes if source == "python" else 0,  # a default-corpus setting only
        "max_bytes": max_bytes,
        "sha256": digest.hexdigest(),
    }
    return corpus
