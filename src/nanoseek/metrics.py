"""The metrics log: each stage appends JSON lines `{"stage": ..., "step": ..., ...}` to RUN/metrics.jsonl.

Stages talk to the report only through this file, so it is append-only and every line stands alone.
What they show while they run goes through `progress_bar`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Seconds between a progress bar's redraws where it writes to no terminal (a CI log, a file): each redraw
# is a line there, and tqdm's default 0.1 s wrote one per training step.
LOG_REDRAW_S = 30.0


def progress_bar(*args: Any, **kwargs: Any) -> Any:
    """A tqdm bar (tqdm's arguments), redrawn at most every `LOG_REDRAW_S` seconds off a terminal."""
    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    # a notebook's cell (ipykernel's stream) is no tty, but its front end redraws a bar in place, as a
    # terminal does: throttled as a log, a bar there moved once every 30 s
    in_cell = type(stream).__module__.startswith("ipykernel.")
    if not (getattr(stream, "isatty", lambda: False)() or in_cell):
        kwargs.setdefault("mininterval", LOG_REDRAW_S)
        # a fixed miniters: tqdm's monitor thread redraws a bar whose self-tuned miniters grew above 1
        # once `maxinterval` (10 s) passed without a redraw, a second line 10-20 s after each one
        kwargs.setdefault("miniters", 1)
    return tqdm(*args, **kwargs)


def _clean(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per call; safe to share between stages of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.stage = stage
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int | None = None, **fields: Any) -> dict[str, Any]:
        record = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **fields}
        record = _clean(record)
        if self.enabled:
            append_records(self.path, [record])
        return record


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records to a metrics.jsonl, one JSON object per line."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not lines:
        return
    try:
        # a lone surrogate (a path from the command line or a file name holding bytes that are no UTF-8,
        # which Python decodes with surrogateescape: grpo's `init`, eval's `checkpoint`) failed the write
        # with a UnicodeEncodeError; written as its JSON escape (`\udce9`, inside a string), it reads back as it was
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            # after a torn last line (a write cut short by a full disk or a power cut), on a line of its
            # own: appended to the fragment, the first record would be skipped with it
            f.write("\n" + lines if _torn(path) else lines)
    except OSError as e:  # a write's error (a full disk) names no file: the CLI's one line names this one
        if e.filename is None:
            e.filename = str(path)
        raise


def _torn(path: Path) -> bool:
    """Whether the file ends inside a line."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_metrics(path: str | os.PathLike, stage: str | None = None) -> Iterator[dict[str, Any]]:
    """Records of a metrics.jsonl (or a run directory holding one), optionally of one stage.

    A torn last line (a kill mid-write, maybe inside a multi-byte character), or any line that is no
    JSON object, is skipped rather than failing the reader.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return
    # bytes that are no UTF-8 (a character cut in two) become U+FFFD: their line fails as JSON, no other
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if stage is None or rec.get("stage") == stage:
                yield rec
