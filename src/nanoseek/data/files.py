"""Files a user points a command at: paths, globs and folders resolved to the files of the kinds a
reader takes (the pretraining corpus: text, JSON lines and parquet; chat and problem data: JSON lines),
and opened for reading, gzipped or not. One place for the corpus, `sft --data` and `jsonl:` tasks, which
import nothing else of the package here (the corpus reads tasks: this module must not).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, suffixes in (("txt", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return None if kind == "parquet" and path.name.lower().endswith(".gz") else kind
    return None


# The suffixes of each reader's kind, for the errors that say which files are read
_KIND_SUFFIXES = {"txt": TEXT_SUFFIXES, "jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES}


def resolve_files(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    kinds: Sequence[str] = ("txt", "jsonl", "parquet"),
) -> list[Path]:
    """Expand files, globs and directories (recursively) into a sorted, de-duplicated file list.
    `kinds`: the readers' kinds (`file_kind`) the caller reads: chat and problem files are JSONL only, and
    a folder's other files (a Hugging Face dataset's README.md) are left out of them, with a warning."""
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    kinds = tuple(kinds)
    suffixes = [s for k in kinds for s in _KIND_SUFFIXES[k]]
    gz = [s + ".gz" for k in kinds if k != "parquet" for s in _KIND_SUFFIXES[k]]  # parquet compresses inside
    use = "use " + (", ".join(suffixes) + ", or .gz" if len(gz) > 1 else " or ".join(suffixes + gz))
    files: list[Path] = []

    def left_out(where: str, others: list[str]) -> None:
        # said, not skipped in silence: a folder of .csv or .html files trained on what was left
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        warnings.warn(
            f"{where}: {len(others)} file(s) of other types left out of the data ({shown}); {use}",
            stacklevel=3,
        )

    for item in items:
        text = str(item)
        # a path that exists is itself, a glob only otherwise: `wiki [en].txt` is that file, where its
        # glob would match `wiki e.txt` (or nothing)
        if Path(text).is_dir():
            found, others = _folder_files(text, kinds)
            if not found:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                also = f" (only {shown})" if others else ""
                raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {text}{also}")
            if others:
                left_out(text, others)
            files.extend(found)
        elif Path(text).is_file() or (len(kinds) == 1 and Path(text).exists()):
            kind = file_kind(Path(text))
            # a file named outright is read as a one-kind caller's kind whatever its name says but parquet
            # (JSON lines in `chats.json` or `chats.txt` are chats to `sft --data`, as they were before it
            # took folders: a run trained on one resumes), a pipe too (`--data <(zcat chats.jsonl.gz)`);
            # the corpus picks its reader by the name
            if kind not in kinds and not (kind != "parquet" and len(kinds) == 1):
                raise ValueError(f"unsupported file type: {text} ({use})")
            files.append(Path(text))
        elif Path(text).exists():
            # a pipe (`--data <(zcat corpus.txt.gz)`) given to the corpus, which reads its files more than
            # once and resumes them at a byte offset: it was "data source not found", for one that exists
            raise ValueError(
                f"{text} is a pipe or device, not a file: the corpus is read more than once (and resumed "
                "at a byte offset); save it to a file first (a .gz is read as it is)"
            )
        elif any(c in text for c in "*?["):
            matched = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            bad = [m for m in matched if m.is_file() and file_kind(m) not in kinds]
            if bad:
                raise ValueError(f"unsupported file type: {bad[0]} ({use})")
            # a folder the glob matches is read as one named outright (`--data 'shards/*'` over
            # shards/en/ and shards/fr/): it was dropped, its files silently missing from the data, where
            # the shell's expansion of the same glob read them
            matches, others = [], []
            for m in matched:
                found, left = _folder_files(str(m), kinds) if m.is_dir() else ([m] if m.is_file() else [], [])
                matches += found
                others += [str(m / p) for p in left]
            if not matches:
                raise FileNotFoundError(f"no files match {text}")
            if others:
                left_out(text, list(dict.fromkeys(others)))  # (`**` matches a folder and those inside it)
            # in the glob's order, as before its folders were read: `d/**` matches d/ first, whose files
            # in a folder's order (d/a/b.txt before d/a.txt) changed the file list a run's data position
            # records, and a run started with it could not resume
            files.extend(sorted(dict.fromkeys(matches), key=str))
        else:
            raise FileNotFoundError(f"data source not found: {text}")
    first: dict[Path, Path] = {}  # each file once, where it was first named
    for f in files:
        first.setdefault(f.resolve(), f)
    files = list(first.values())
    # found now, not as a traceback when the reader gets there (hours into a run). Not a pipe, which
    # is read once: opened and closed here, a named one (`mkfifo`) lost its writer's data to this check
    # and the read then waited forever
    for f in (f for f in files if f.is_file()):
        try:
            open(f, "rb").close()  # noqa: SIM115
        except OSError as e:
            raise ValueError(f"cannot read {f}: {e.strerror}") from e
    return files


def _folder_files(root: str, kinds: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The files under `root` of the readers' `kinds`, sorted, and those of others (relative to it)."""
    present = [p for p in _walk(root) if p.is_file()]
    found = sorted(p for p in present if file_kind(p) in kinds)
    if any(file_kind(p) in ("jsonl", "parquet") for p in found):
        # a Hugging Face dataset's folder keeps its card (README.md) and license beside the records: read
        # as a document, the card's YAML header and tables went into the corpus
        cards = [p for p in found if file_kind(p) == "txt" and _DATASET_NOTES.match(p.name)]
        if cards:
            warnings.warn(
                f"{root}: {', '.join(str(p.relative_to(root)) for p in cards)} left out of the data: a data "
                "set's card or license beside its records, not its text (name the file in --data to train on it)",
                stacklevel=4,
            )
            found = [p for p in found if p not in cards]
    return found, sorted(str(p.relative_to(root)) for p in present if file_kind(p) not in kinds)


_DATASET_NOTES = re.compile(r"(readme|license|licence|changelog|citation)([._-].*)?$", re.IGNORECASE)


def _walk(root: str) -> Iterator[Path]:
    """The files under `root`, symlinked folders not followed (as `Path.rglob`), hidden files and folders
    (.git, .ipynb_checkpoints' copies, .cache) left out. A folder that cannot be listed is an error:
    rglob skips it without a word, and its files would silently be missing from the corpus."""

    def fail(e: OSError) -> None:
        raise ValueError(f"cannot read the folder {e.filename}: {e.strerror}") from e

    for folder, dirs, names in os.walk(root, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(folder, n) for n in names if not n.startswith("."))


def open_binary(path: Path) -> io.BufferedReader | gzip.GzipFile:
    """`path` opened for reading bytes, decompressed on the fly where it ends in .gz (SFT's chat data too)."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115


def json_array_note(line: str | bytes) -> str:
    """What to add to the error for a JSON lines file's `line` where it opens a JSON array: a data set
    saved as one array (`json.dump(rows)`, an Alpaca-style .json) was "not valid JSON" at its `[`, or a
    line that is no object, which did not say what the reader takes instead."""
    opens = line.lstrip()[:1] in ("[", b"[")
    return (
        "; this line opens a JSON array: JSON lines hold one object per line, not one array of them"
        if opens
        else ""
    )


def skip_byte_order_mark(f: io.BufferedReader | gzip.GzipFile) -> None:
    """Past a UTF-8 byte-order mark at the start of `f` (Windows editors write one): it is neither text
    nor JSON (json.loads skips it only in front of a record, not before a blank line)."""
    if f.peek(3)[:3] == b"\xef\xbb\xbf":  # (peeked: a named pipe cannot seek back)
        f.read(3)
