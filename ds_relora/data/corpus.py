"""Document sources for ``prepare-data``: the embedded stdlib corpus, local files, HF datasets.

:func:`open_documents` resolves a ``prepare.source`` string eagerly (so a missing path or a bad
extension fails before any work starts) and returns a lazy iterator of document texts, in a
deterministic order. Local ``.json``/``.parquet`` files are read through
``datasets.load_dataset(..., streaming=True)``, the very code path a ``hf:`` source takes, so
the hub path is exercised by tests that only have local files; ``.jsonl`` files are read line
by line here, in memory bounded by the longest line.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ds_relora.errors import DataError

# Builder name of ``datasets.load_dataset`` per extension; "text" means one file = one document.
EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_EXT_LIST = ", ".join(EXTENSIONS)
# Folders of the interpreter's library that are not the standard library itself.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}

Log = Callable[[str], None]


def open_documents(source: str, *, text_field: str = "text", split: str = "train", log: Log = print,
                   exclude: Path | None = None) -> Iterator[str]:
    """Iterator over the non-blank document texts of ``source`` (see ``PrepareConfig.source``).

    Files under ``exclude`` (the output folder) are skipped by folder and glob sources, so a
    rerun into a folder inside the corpus does not read its own tokenizer JSON as data.
    """
    source = str(source).strip()
    if source == "stdlib":
        return _stdlib_documents(stdlib_files(), log)
    if source.startswith("hf:"):
        return _hub_documents(source, text_field, split)
    files = resolve_local_files(source, exclude)
    return _local_documents(files, text_field)


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by path relative to its folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    # os.walk with pruning: descending into a large site-packages would dominate the run time.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    if not found:
        raise DataError(f"no .py files found in the standard library folder {root}: use a local source (prepare.source=PATH) instead of 'stdlib'")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents(files: list[Path], log: Log) -> Iterator[str]:
    undecodable = 0
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            # lib2to3/test data deliberately holds files in other encodings; they are not text here.
            undecodable += 1
            continue
        except OSError:
            continue
        if text.strip():
            yield text
    if undecodable:
        log(f"stdlib: skipped {undecodable} files that are not valid UTF-8")


def resolve_local_files(source: str, exclude: Path | None = None) -> list[Path]:
    """Data files named by a local file, folder (recursive) or glob, in sorted order."""
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        matches = (Path(p) for p in glob.glob(expanded, recursive=True))
        files = sorted(p for p in matches if p.is_file() and not _under(p, exclude))
        if not files:
            raise DataError(f"source glob {source!r} matches no files: fix the pattern or point prepare.source at an existing file or folder")
        for f in files:
            _check_extension(f)
        return files
    path = Path(expanded)
    if not path.exists():
        raise DataError(f"source {source!r} does not exist: set prepare.source to an existing file, folder or glob, 'stdlib', or hf:NAME[:CONFIG]")
    if path.is_dir():
        # Hidden entries (.git, caches) are never data; skipping them keeps reruns stable.
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and _extension(p) in EXTENSIONS and not _under(p, exclude)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"no documents found: folder {path} holds no {_EXT_LIST} files; put data files there or point prepare.source elsewhere")
        return files
    _check_extension(path)
    return [path]


def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.absolute().is_relative_to(folder.absolute())


def _extension(path: Path) -> str:
    return path.suffix.lower()


def _check_extension(path: Path) -> None:
    if _extension(path) not in EXTENSIONS:
        raise DataError(f"cannot read {path}: unknown extension {path.suffix or '(none)'!r}; convert it to one of {_EXT_LIST} or leave it out of prepare.source")


def _local_documents(files: list[Path], text_field: str) -> Iterator[str]:
    empty = [p for p in files if _is_empty(p)]
    if len(empty) == len(files):
        what = f"{files[0]} is" if len(files) == 1 else f"all {len(files)} files of the source ({files[0]}, ...) are"
        raise DataError(f"{what} empty: put documents there (one JSON object per line for .jsonl) or point prepare.source elsewhere")
    # Consecutive files of one kind go to one load_dataset call: fewer builder start-ups, same order.
    for builder, group in itertools.groupby(files, key=_reader):
        group = list(group)
        if builder == "text":
            for path in group:
                yield from _nonblank([_read_text_file(path)])
            continue
        if builder == "lines":
            for path in group:
                yield from _nonblank(_texts_from_rows(_json_lines(path, text_field), text_field, str(path)))
            continue
        import datasets  # noqa: PLC0415  (datasets takes seconds to import; only streaming/HF sources need it)

        # An empty file has no rows to infer columns from: the builder fails with a bare StopIteration.
        group = [p for p in group if not _is_empty(p)]
        if not group:
            continue
        where = str(group[0]) if len(group) == 1 else f"{group[0]} (+{len(group) - 1} more files)"
        if builder == "json":
            # Its reader logs a parse failure before raising; the DataError below says it in one line.
            logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
        try:
            rows = datasets.load_dataset(builder, data_files=[str(p) for p in group], split="train", streaming=True)
        except Exception as exc:  # the builders raise many types; the user needs the file and the cause
            raise _unreadable(group, builder, where, exc) from exc
        yield from _nonblank(_texts_from_rows(_guard_rows(rows, group, builder, where), text_field, where))


def _reader(path: Path) -> str:
    # JSON lines are read here, one line at a time: the datasets json builder holds ~6 copies of
    # a batch (bytes, split lines, Arrow blocks, Python rows), 120 MB more for one 20 MB line.
    # .json (possibly one array) and .parquet keep the builders, the hub's own code path.
    return "lines" if _extension(path) == ".jsonl" else EXTENSIONS[_extension(path)]


def _json_lines(path: Path, text_field: str) -> Iterator[dict]:
    """The objects of a JSON-lines file, blank lines skipped. A row without ``text_field`` after
    one that had it is a row without text (as in an Arrow table); the first row decides."""

    seen_field = False
    lineno = 0
    # Text mode: each line is decoded once, as it is read (no bytes copy beside the str).
    with open(path, encoding="utf-8-sig") as f:
        try:
            # Not enumerate(): its cached result tuple keeps the previous line alive after `del
            # line`, a second copy of a 20 MB document while it is tokenized.
            for line in f:
                lineno += 1
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path} line {lineno} is not valid JSON ({getattr(err, 'msg', err)}): fix or delete that line") from None
                del line
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {lineno} is not valid JSON (a {type(row).__name__}, not an object): fix or delete that line")
                if text_field in row:
                    seen_field = True
                elif seen_field:
                    continue
                yield row
        except UnicodeDecodeError as err:
            raise DataError(f"{path} line {lineno + 1} is not valid UTF-8 ({err.reason}): re-encode the file as UTF-8") from None


def _is_empty(path: Path) -> bool:
    size = path.stat().st_size
    if size > 4096:
        return False
    return not path.read_bytes().strip()


def _guard_rows(rows: Iterable[dict], group: list[Path], builder: str, where: str) -> Iterator[dict]:
    """``rows`` with a reader failure (pyarrow parses lazily, mid-stream) turned into one line."""
    try:
        yield from rows
    except Exception as exc:
        raise _unreadable(group, builder, where, exc) from exc


def _unreadable(group: list[Path], builder: str, where: str, exc: BaseException) -> DataError:
    if builder == "json":
        if bad := _first_bad_json_line(group):
            path, lineno, msg = bad
            return DataError(f"{path} line {lineno} is not valid JSON ({msg}): fix or delete that line")
    return DataError(f"cannot read {where} as {builder} ({_first_line(exc)}): check that the file is valid {builder}")


def _first_bad_json_line(group: list[Path]) -> tuple[Path, int, str] | None:
    """(file, 1-based line, reason) of the first line of a JSON-lines file that does not parse."""

    for path in group:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
            if head.startswith(b"["):  # one JSON array, not JSON lines
                continue
            f.seek(0)
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    value = json.loads(raw)
                except ValueError as err:
                    return path, lineno, getattr(err, "msg", str(err))
                if not isinstance(value, dict):
                    return path, lineno, f"a {type(value).__name__}, not an object"
    return None


def _read_text_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not valid UTF-8 text: re-encode it as UTF-8 or leave it out of prepare.source") from None


def _hub_documents(source: str, text_field: str, split: str) -> Iterator[str]:
    name, _, config = source[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"source {source!r} names no dataset: write it as hf:NAME or hf:NAME:CONFIG, e.g. hf:allenai/c4:en")
    import datasets  # noqa: PLC0415  (datasets takes seconds to import; only streaming/HF sources need it)

    try:
        rows = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as exc:  # network, auth, unknown name or config: all need the same hint
        raise DataError(
            f"cannot open HF dataset {name!r} (config {config or None!r}, split {split!r}): {_first_line(exc)}; "
            "check the name/config/split and network access, or prepare from a local copy"
        ) from exc
    return _nonblank(_texts_from_rows(rows, text_field, source))


def _texts_from_rows(rows: Iterable[dict], text_field: str, where: str) -> Iterator[str]:
    for row in rows:
        if text_field not in row:
            fields = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(f"{where}: rows have no field {text_field!r} (fields: {fields}); set prepare.text_field to the field that holds the text")
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text; set prepare.text_field to a string field")
        yield text


def _nonblank(texts: Iterable[str]) -> Iterator[str]:
    # A blank document would add a lone EOS to the stream and teach the model nothing.
    return (t for t in texts if t and not t.isspace())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
