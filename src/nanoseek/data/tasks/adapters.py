"""Tasks from outside: reasoning-gym datasets (``rg:<name>``) and user JSONL files (``jsonl:<path>``)."""

from __future__ import annotations

import ast
import collections
import difflib
import gzip
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import threading
import unicodedata
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from nanoseek.data.tasks.answers import (
    check_code,
    check_exact,
    check_math,
    check_numeric,
    extract_answer,
    parse_number,
    unwrap_answer,
)
from nanoseek.data.tasks.base import (
    HELDOUT_EVERY,
    LANGUAGES,
    SPLITS,
    VERIFIERS,
    Problem,
    Task,
    _check_language,
    _check_split,
    _problem_id,
    _typed_value,
    split_of,
)
from nanoseek.tokenizer import THINK_END, THINK_START

# ----------------------------------------------------------------------------------------------------
# reasoning-gym adapter
# ----------------------------------------------------------------------------------------------------


# Datasets whose gold answer is one solution of several, drawn at random (the scorer takes any): the answer,
# and the metadata fields that repeat it, are left out of the split key (puzzle24's same four numbers drawn
# twice were two problems, on either side: 25 of 64 held-out puzzles were in a 2,048-problem training pool).
_RG_SAMPLED_SOLUTION: dict[str, tuple[str, ...]] = {
    "puzzle24": (),
    "countdown": ("expression",),
    "n_queens": (),
}


def _rg_canonical(entry: dict) -> str:
    """What identifies a reasoning-gym problem for the split: its metadata (the generator's parameters:
    ``{'animals': {'dog': 2, 'giraffe': 1}}``, key order ignored) without the per-draw bookkeeping, so one
    problem worded or ordered another way ("1 giraffe, 2 dogs" / "2 dogs, 1 giraffe") lands on the same
    side; the question text when the dataset gives no metadata."""
    # (kakurasu and survo number their draws "source_idx": in the key, each draw of one puzzle was another
    # problem, and a 4x4 puzzle drawn again landed on either side)
    metadata = entry.get("metadata") or {}
    sampled = _RG_SAMPLED_SOLUTION.get(metadata.get("source_dataset", ""))
    meta = {
        k: v
        for k, v in metadata.items()
        if k not in ("source_index", "source_idx", "source_dataset", "difficulty", *(sampled or ()))
    }
    if not meta:
        return entry["question"]

    def canon(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): canon(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return x

    key = json.dumps(canon(meta), sort_keys=True, default=str)
    return key if sampled is not None else key + "|" + str(entry.get("answer"))


def _rg_options(dataset: str, config: dict[str, Any]) -> dict[str, Any]:
    """Task-spec options as the dataset config's field types: ``p_zero=0.9`` a float, ``operators=+,-`` a
    tuple, instead of the text (which reasoning-gym compares to numbers or iterates letter by letter)."""
    import dataclasses

    from reasoning_gym.factory import DATASETS

    if dataset not in DATASETS:  # (reasoning-gym said only "not registered", for a typo too)
        close = difflib.get_close_matches(dataset, list(DATASETS), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'rg:{c}' for c in close)}?" if close else ""
        raise ValueError(f"unknown reasoning-gym dataset {dataset!r}{hint} (reasoning_gym.factory.DATASETS)")
    fields = {f.name: f for f in dataclasses.fields(DATASETS[dataset][1])}
    # the dataset's seed and size are the adapter's: it draws fresh problems, as many as asked (--n,
    # --train-pool), from --seed (given here, reasoning-gym said "got multiple values for keyword 'size'")
    takes = ["partial", *(name for name in fields if name not in ("seed", "size"))]
    for k in config:
        if k in ("seed", "size"):
            raise ValueError(
                f"rg:{dataset}: {k} is not a task option: nanoseek draws as many problems as asked "
                "(eval --n, grpo --train-pool) from the run's --seed"
            )
        if k not in takes:  # (reasoning-gym's error named its config class's __init__)
            raise ValueError(
                f"bad options for task 'rg:{dataset}': no option {k!r} (it takes: {', '.join(takes)})"
            )
    out = dict(config)
    for k, v in config.items():
        f = fields.get(k)
        if f is None or not isinstance(v, (str, int)) or isinstance(v, bool):
            continue
        t = str(f.type).lower()
        default = f.default if f.default is not dataclasses.MISSING else None
        try:
            if isinstance(v, str) and ("tuple" in t or "list" in t or isinstance(default, (tuple, list))):
                items = [x.strip() for x in v.split(",") if x.strip()]
                if "float" in t:  # list[float]: weights
                    typed = [_typed_value(x, float) for x in items]
                else:
                    typed = [int(x) if re.fullmatch(r"[+-]?\d+", x) else x for x in items]
                out[k] = list(typed) if isinstance(default, list) or "list" in t else tuple(typed)
            elif "float" in t or isinstance(default, float):
                out[k] = _typed_value(str(v), float)
            elif isinstance(v, str) and re.search(r"\bint\b", t):
                out[k] = _typed_value(v, int)
        except ValueError as e:
            raise ValueError(f"option {k}={v!r} of rg:{dataset} must be {e}") from None
    return out


class ReasoningGymTask(Task):
    """Any reasoning-gym dataset (``rg:<name>``), scored by the dataset's own ``score_answer``.

    reasoning-gym's scorers give partial credit (its default pays an answer that contains the oracle,
    countdown scores near misses); this adapter returns 1.0 only when the scorer says 1.0, unless
    ``partial=True``. Prompts are English only.
    """

    languages = ("en",)

    def __init__(self, spec: str, dataset: str, partial: bool = False, **config: Any) -> None:
        import reasoning_gym

        config = _rg_options(dataset, config)
        self.name, self.dataset, self.partial, self.config = spec, dataset, bool(partial), config
        try:
            # the scorer: score_answer reads only the entry (and the dataset config)
            self._scorer = reasoning_gym.create_dataset(dataset, seed=0, size=1, **config)
        except Exception as e:
            raise ValueError(f"cannot create reasoning-gym dataset {dataset!r} with {config}: {e}") from e
        self._create = reasoning_gym.create_dataset

    def iter_problems(
        self, split: str, seed: int = 0, language: str | Sequence[str] | None = None
    ) -> Iterator[Problem]:
        _check_split(split)
        langs = () if language is None else (language,) if isinstance(language, str) else tuple(language)
        if any(x != "en" for x in langs):
            raise ValueError(f"reasoning-gym tasks are English only, got language={language!r}")
        chunk = 0
        while True:
            # fresh seeds per chunk; the split is decided by the question's hash, as for built-ins
            ds_seed = int.from_bytes(
                hashlib.blake2b(f"{self.name}|{seed}|{chunk}".encode(), digest_size=4).digest(), "big"
            )
            # small chunks first: some datasets (countdown) are slow to generate per item
            ds = self._create(self.dataset, seed=ds_seed, size=min(128, 8 << chunk), **self.config)
            for i in range(len(ds)):
                entry = ds[i]
                key = f"rg:{self.dataset}|{_rg_canonical(entry)}"
                if split_of(key) != split:
                    continue
                gold = entry.get("answer")
                yield Problem(
                    id=_problem_id(f"rg:{self.dataset}", key),
                    prompt=entry["question"],
                    answer="" if gold is None else str(gold),
                    language="en",
                    task=self.name,
                    meta={"entry": entry, "split": split},
                )
            chunk += 1

    def _in_process(self) -> bool:
        """Whether the scorer may read the model's answer in this process: reasoning-gym's default (a
        string comparison) or an allow-listed one. Others ``eval`` it (binary_matrix, n_queens) or hand
        it to sympy's ``parse_expr`` (countdown, puzzle24): ``__import__('os').system(...)`` ran in the
        trainer, ``exit()`` raised out of verify and ``9**9**9**9`` hung it."""
        from reasoning_gym.dataset import ProceduralDataset

        scorer = type(self._scorer).score_answer
        return scorer is ProceduralDataset.score_answer or self.dataset in _RG_STRING_SCORERS

    def _candidates(self, completion: str, require_think: bool) -> list[str]:
        # the answer as written, or without the markup the built-in verifiers read through (\boxed{},
        # $...$, a closing full stop), whichever scores higher: most scorers compare the text exactly, so
        # a right `\boxed{42}` or `42.` scored 0 (a gold answer that ends in a full stop still matches)
        answer = extract_answer(completion, require_think)
        return [] if answer is None else list(dict.fromkeys((answer, unwrap_answer(answer))))

    def _cache_key(self, problem: Problem, candidate: str) -> tuple:
        return (self.dataset, repr(sorted(self.config.items())), problem.id, candidate)

    def prescore(self, problems: Sequence[Problem], completions: Sequence[str]) -> None:
        """Score these answers in one sandboxed child (see ``_rg_score_sandboxed``), for the ``verify``
        calls that follow: a child per answer would import reasoning-gym once per answer."""
        if self._in_process():
            return
        jobs: dict[tuple, tuple[str, dict]] = {}
        hits: list[tuple] = []
        for problem, completion in zip(problems, completions, strict=True):
            entry = problem.meta.get("entry")
            if entry is None:
                continue
            for think in (True, False):  # the caller's require_think is not known here
                for c in self._candidates(completion, think):
                    key = self._cache_key(problem, c)
                    if key in _RG_SCORES:
                        hits.append(key)
                    else:
                        jobs[key] = (c, entry)
        scores = _rg_score_sandboxed(self.dataset, self.config, list(jobs.values())) if jobs else []
        # the whole batch is kept until its verify calls read it: a score found here and evicted by the
        # new ones, or a batch larger than the cache, was scored again in a child per answer
        _remember(dict(zip(jobs, scores, strict=True)), keep=hits)

    def verify(self, problem: Problem, completion: str, require_think: bool = False) -> float | None:
        from reasoning_gym.dataset import ProceduralDataset

        entry = problem.meta.get("entry")
        if entry is None:
            return None
        # no gold: the default scorer compares with none; a dataset's own (graph_color, propositional_logic,
        # rush_hour) checks the answer against the problem itself (skipped, its every problem was
        # "unparseable gold")
        if entry.get("answer") is None and type(self._scorer).score_answer is ProceduralDataset.score_answer:
            return None
        candidates = self._candidates(completion, require_think)
        if not candidates:
            return 0.0
        if self._in_process():
            scores = []
            for candidate in candidates:
                try:
                    scores.append(float(self._scorer.score_answer(candidate, entry)))
                except Exception:
                    scores.append(0.0)
        else:
            keys = [self._cache_key(problem, c) for c in candidates]
            cached = [_RG_SCORES.get(k) for k in keys]
            missing = [i for i, s in enumerate(cached) if s is None]
            if missing:  # not prescored (a caller that scores one answer at a time): a child for these
                found = _rg_score_sandboxed(
                    self.dataset, self.config, [(candidates[i], entry) for i in missing]
                )
                _remember({keys[i]: s for i, s in zip(missing, found, strict=True)})
                for i, s in zip(missing, found, strict=True):
                    cached[i] = s
            scores = [float(cast(float, s)) for s in cached]  # none is None now: the missing ones filled
        s = max(scores)
        if self.partial:
            return min(max(s, 0.0), 1.0)
        return 1.0 if s >= 1.0 - 1e-9 else 0.0


# Datasets whose own score_answer (and what it calls) was read and found to compare text or Decimal/float
# values without running the answer: scored in-process. Any other scorer is sandboxed.
_RG_STRING_SCORERS: frozenset[str] = frozenset(
    {"chain_sum", "products", "spell_backward", "word_sorting", "family_relationships", "circuit_logic",
     "number_format"}
)  # fmt: skip

# (dataset, config, problem id, answer) -> score, from prescore's batch for the verify calls after it
_RG_SCORES: collections.OrderedDict[tuple, float] = collections.OrderedDict()
_RG_SCORES_MAX = 1 << 14
_RG_SCORES_LOCK = threading.Lock()


def _remember(scores: dict[tuple, float], keep: Sequence[tuple] = ()) -> None:
    """Add ``scores`` and mark ``keep`` (cached keys) recent; the oldest others go past the cap, never
    these (a batch's verify calls come after)."""
    with _RG_SCORES_LOCK:
        for key in keep:
            if key in _RG_SCORES:
                _RG_SCORES.move_to_end(key)
        _RG_SCORES.update(scores)
        while len(_RG_SCORES) > max(_RG_SCORES_MAX, len(scores) + len(keep)):
            _RG_SCORES.popitem(last=False)


# The child: one answer per run of ``run_python(runs=)``, each a fresh fork of a process that imported
# reasoning-gym, so an answer that patches the scorer (its code, a module it calls) changes nothing for the
# others (it scored every later answer in its child 1.0). A run writes "ready" (the first one), then its
# line "<index> <score> <mac>". The answer runs in this process: it can write to fd 1 and read back what
# its run wrote so far, so a line counts only with the mac of a key the child read from its stdin before
# the answer ran, which then holds nothing (printing "3 1.0" scored an answer 1.0). The scoring keeps what
# it calls in locals: an answer can replace builtins (float) and module attributes, not these.
_RG_CHILD = """
import base64, hashlib, io, os, pickle, sys
import reasoning_gym

def main(key, write=os.write, mac=hashlib.blake2b, float=float, BaseException=BaseException):
    dataset, config, jobs, start = pickle.loads(base64.b64decode({data!r}))
    i = start + int(sys.argv[1])
    score = reasoning_gym.create_dataset(dataset, seed=0, size=1, **config).score_answer
    if i == start:
        write(1, b"ready\\n")
    sys.stdout = sys.stderr = io.StringIO()  # what an answer prints does not fill the child's stdout
    try:
        s = float(score(*jobs[i]))
    except BaseException:  # exit() as an answer is a wrong answer
        s = 0.0
    line = ("%d %r" % (i, s)).encode()
    # on a line of its own: after what the answer wrote to fd 1 without a newline
    write(1, b"\\n" + line + b" " + mac(line, key=key, digest_size=16).hexdigest().encode() + b"\\n")

main(bytes.fromhex(os.read(0, 256).decode()))  # unbuffered, and not a global: the answers cannot name it
"""


def _rg_mac(key: str, line: str) -> str:
    """The child's mac of a score line (see ``_RG_CHILD``)."""
    return hashlib.blake2b(line.encode(), key=bytes.fromhex(key), digest_size=16).hexdigest()


_RG_CHILD_TIMEOUT = 3.0  # seconds: reasoning-gym's import (then 4x on a retry)
_RG_PER_ANSWER = 2.0  # an answer's own wall clock (and CPU seconds): one that hangs costs this, no more
# answers per child: a bounded process (its stdout, its total timeout) for an eval's thousands of samples
_RG_CHUNK = 256


def _rg_score_sandboxed(
    dataset: str, config: dict[str, Any], jobs: list[tuple[str, dict]], retried: bool = False
) -> list[float]:
    """``score_answer(answer, entry)`` for each job, in ``sandbox.run_python`` (limits, an audit hook that
    refuses processes, sockets and writes, a timeout), reasoning-gym imported before its hook, each answer in
    a fork of its own (``runs``). An answer that hangs, crashes or exits its fork scores 0; the others are
    still scored. ``retried``: the second try of answers whose runs wrote no score, with 4x the clocks."""
    import base64
    import pickle

    from nanoseek.data.sandbox import run_python

    if len(jobs) > _RG_CHUNK:
        return [
            s
            for at in range(0, len(jobs), _RG_CHUNK)
            for s in _rg_score_sandboxed(dataset, config, jobs[at : at + _RG_CHUNK], retried)
        ]
    scores = [0.0] * len(jobs)
    scored: set[int] = set()
    start = 0
    while start < len(jobs):
        data = base64.b64encode(pickle.dumps((dataset, dict(config), jobs, start))).decode()
        key = secrets.token_hex(32)  # a fresh one per child: a line from an earlier child's stdout is no good
        r = run_python(
            _RG_CHILD.format(data=data),
            preload=("reasoning_gym",),
            secret=key,
            runs=len(jobs) - start,
            timeout=_RG_PER_ANSWER * (1 + 3 * retried),
            # the CPU time an answer may take stays: on a loaded machine its wall clock is what runs out
            cpu_seconds=math.ceil(_RG_PER_ANSWER),
            total_timeout=(_RG_CHILD_TIMEOUT + _RG_PER_ANSWER * (len(jobs) - start)) * (1 + 3 * retried),
            memory_mb=1024,
        )
        lines = r.stdout.splitlines()
        if lines[:1] != ["ready"]:  # not the answers' doing: the child did not get as far as the first
            # a loaded machine: reasoning-gym's import took the time, or the first run's clock ran out before
            # it wrote "ready" (the others' scores came back; a training step failed on them)
            slow = r.timed_out or "sandbox: run 0 timed out" in r.stderr
            if not slow or retried:
                raise RuntimeError(
                    f"reasoning-gym's {dataset} scorer failed in the sandbox: {r.stderr[-2000:]}"
                )
            retried = True
            continue
        nxt = start
        for line in lines[1:]:  # in order: an answer's own line comes after what it wrote
            head, _, mac = line.rpartition(" ")
            i, _, s = head.partition(" ")
            # what an answer wrote has no mac of the key (bytes: its text need not be ASCII), and a line
            # it read back is an earlier answer's: skipped
            if not (i.isascii() and i.isdigit()) or not nxt <= int(i) < len(jobs):
                continue
            if not hmac.compare_digest(mac.encode(), _rg_mac(key, head).encode()):
                continue
            try:
                scores[int(i)] = min(max(float(s), 0.0), 1.0) if math.isfinite(float(s)) else 0.0
            except ValueError:
                break
            scored.add(int(i))
            nxt = int(i) + 1  # the answers it skipped hung or crashed their runs: 0
        if nxt >= len(jobs) or (r.returncode == 0 and not r.timed_out):
            break  # every answer had its run
        start = nxt + 1  # the answer the child was on when it died or timed out scores 0
    # A run that wrote no score was killed: by its CPU limit (a hang), or by its wall clock, which on a
    # loaded machine runs out while a right answer waits for a CPU (it scored 0): those once more, in a
    # child with 4x the clocks. The CPU limit stays, so a hang costs its CPU time twice, no more.
    missed = [i for i in range(len(jobs)) if i not in scored]
    if missed and not retried:  # (not already tried with those: a slow import's retry)
        found = _rg_score_sandboxed(dataset, config, [jobs[i] for i in missed], retried=True)
        for j, score in zip(missed, found, strict=True):
            scores[j] = score
    return scores


# ----------------------------------------------------------------------------------------------------
# JSONL user tasks
# ----------------------------------------------------------------------------------------------------


# a LaTeX command (\frac, \times, \alpha) is a math symbol, not an English word in a Chinese chain of thought
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")


def script_counts(text: str) -> dict[str, int]:
    """Letters per script: latin (incl. accented), kana (hiragana, katakana), han (CJK ideographs), and
    other (any other script's: Cyrillic, Hangul, Greek, ...; a chain of thought drifting into them is not
    in the prompt's language either).

    A lone Latin (or other) letter is a symbol, not a word (the ``x`` of ``3x = 15``, the letters a
    counting trace spells out, the ``θ`` of an angle), so those count only in runs of two or more; a
    LaTeX command (``\\frac``, ``\\times``) is a symbol too.
    """
    counts = {"latin": 0, "kana": 0, "han": 0, "other": 0}
    run, run_script = 0, ""
    # NFC: a letter and its combining marks are one character (NFD's か + U+3099 is one が)
    for ch in unicodedata.normalize("NFC", _LATEX_COMMAND_RE.sub(" ", text)) + " ":
        o = ord(ch)
        # the kana blocks also hold punctuation (the middle dot ・, which Chinese writes too, and ゠ ゛ ゜):
        # symbols, not letters, or a row of ・ would lift any chain of thought's Japanese share
        if (0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F) and ch.isalpha():
            script = "kana"
        elif (
            0x4E00 <= o <= 0x9FFF
            or 0x3400 <= o <= 0x4DBF
            or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x3FFFF  # planes 2-3, all ideographs (not tags, selectors, private use)
            or o == 0x3005
        ):
            script = "han"
        elif not ch.isalpha():
            # a combining mark (Devanagari's vowel signs) goes on with the word it marks
            if run and unicodedata.category(ch).startswith("M"):
                continue
            script = ""
        else:
            script = "latin" if o < 0x80 or 0xC0 <= o <= 0x24F else "other"
        if run and script == run_script:
            run += 1
            continue
        if run >= 2:
            counts[run_script] += run
        run, run_script = (1, script) if script in ("latin", "other") else (0, "")
        if script in ("kana", "han"):
            counts[script] += 1
    return counts


def detect_language(text: str) -> str:
    """'ja' if the text has kana, 'zh' if it has Han but no kana, else 'en'."""
    c = script_counts(text)
    if c["kana"]:
        return "ja"
    return "zh" if c["han"] else "en"


class JsonlTask(Task):
    """User tasks from JSON lines: ``{"prompt", "answer", "verifier"?, "tests"?, "language"?, "split"?, "reasoning"?}``.

    verifier: "exact" (default when the answer is not a number), "numeric" (default for numbers), "math"
    (math-verify), "code" (the answer's last Python block run against ``tests``: a string of Python asserts,
    or a list of {"input", "output"} stdin/stdout cases). A line's "split" overrides the hash split.
    ``path``: a .jsonl or .jsonl.gz file, a folder of them or a glob (``resolve_files``).
    """

    def __init__(self, spec: str, path: str, partial: bool = False) -> None:
        from nanoseek.data.files import open_binary, resolve_files, skip_byte_order_mark
        from nanoseek.options import path as user_path

        # `~` as every flag that names a file reads it: no shell expands it after "jsonl:"
        path = user_path(path)
        self.name, self.path, self.partial = spec, Path(path), bool(partial)
        # ids: the path's stem as given (a folder's, a glob's) for each of its files, not which shard holds
        # a problem; a .jsonl.gz's as its .jsonl's
        self._stem = Path(self.path.name.removesuffix(".gz")).stem
        # problems published in shards are one task, as `sft --data` takes them
        if not self.path.exists() and not any(c in path for c in "*?["):
            raise FileNotFoundError(f"jsonl task file not found: {self.path}")
        self.files = resolve_files(path, kinds=("jsonl",))
        self.items: list[Problem] = []
        lines: dict[str, tuple[Path, int]] = {}  # problem id -> its file and line
        for file in self.files:
            try:
                # bytes, decoded line by line: a line that is not UTF-8 is named like any other bad line
                with open_binary(file) as f:
                    skip_byte_order_mark(f)
                    for lineno, raw in enumerate(f, 1):
                        where = f"{file}:{lineno}"
                        try:
                            line = raw.decode("utf-8")
                        except UnicodeDecodeError as e:
                            raise ValueError(
                                f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
                            ) from None
                        if line.strip():
                            p = self._parse(line, lineno, file)
                            if p.id in lines:  # problems() would never draw it, and call the split too small
                                first, n = lines[p.id]
                                seen = f"line {n}" if first == file else f"{first}:{n}"
                                raise ValueError(
                                    f"{where}: same problem id as {seen}"
                                    ' (the id is the prompt\'s unless the line gives an "id"): give each '
                                    'line its own prompt or "id"'
                                )
                            lines[p.id] = (file, lineno)
                            self.items.append(p)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a truncated or corrupt download
                raise ValueError(f"{file}: not a readable gzip file ({e})") from None
        if not self.items:
            raise ValueError(f"{self.path}: no problems")
        self.languages = tuple(sorted({p.language for p in self.items}))
        self._stamp = self._files_stamp()

    def _files_stamp(self) -> list[tuple[int, int, int]] | None:
        try:
            return [(s.st_ino, s.st_mtime_ns, s.st_size) for s in (f.stat() for f in self.files)]
        except OSError:  # gone: built again, which says so
            return None

    def changed_on_disk(self) -> bool:
        # the files it read, stat'ed (cheap: GRPO's rewards look the task up per sample); a shard added
        # to its folder since is not seen
        return self._files_stamp() != self._stamp

    def _parse(self, line: str, lineno: int, file: Path) -> Problem:
        from nanoseek.data.files import json_array_note

        where = f"{file}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e}){json_array_note(line)}") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f'{where}: each line needs a non-empty string "prompt"{json_array_note(line)}')
        verifier = row.get("verifier")
        tests = row.get("tests")
        gold = row.get("answer")
        # a list, object or boolean as the JSON the user wrote (["a", "b"], true), not Python's repr of it
        answer = (
            "" if gold is None else gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False)
        )
        if verifier is None:
            verifier = (
                "code" if tests is not None else "numeric" if parse_number(answer) is not None else "exact"
            )
        if not answer.strip() and verifier != "code":
            raise ValueError(f'{where}: missing "answer"' + (" (it is empty)" if "answer" in row else ""))
        if verifier not in VERIFIERS:
            raise ValueError(f"{where}: verifier {verifier!r} is not one of {VERIFIERS}")
        if verifier == "code" and not (isinstance(tests, str) or (isinstance(tests, list) and tests)):
            raise ValueError(
                f'{where}: verifier "code" needs "tests" (Python asserts or [{{"input", "output"}}])'
            )
        if isinstance(tests, list) and not all(isinstance(t, dict) and "output" in t for t in tests):
            raise ValueError(f'{where}: each test case needs "output" (and optionally "input")')
        if verifier == "code" and isinstance(tests, str):
            # no statement (empty, blank, comments only) passes any code that runs; a syntax error fails all
            try:
                statements = ast.parse(tests).body
            except SyntaxError as e:
                raise ValueError(f'{where}: "tests" is not valid Python: {e.msg} (line {e.lineno})') from None
            if not statements:
                raise ValueError(f'{where}: "tests" has no statements: nothing to check the code against')
        reasoning = row.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, str):  # (its repr was the worked solution)
            raise ValueError(f'{where}: "reasoning" must be text, got {type(reasoning).__name__}')
        language = row.get("language") or detect_language(row["prompt"])
        if language not in LANGUAGES:  # the language reward and `language=` know these only
            raise ValueError(f"{where}: language {language!r} is not one of {LANGUAGES}")
        split = row.get("split") or split_of(f"jsonl|{row['prompt']}")
        if split not in SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of {SPLITS}")
        key = f"jsonl|{row['prompt']}"
        return Problem(
            # as text: "id": 0 is an id (it was taken for none), and 1 and "1" are the same problem's
            id=_problem_id(self._stem, key) if row.get("id") in (None, "") else str(row["id"]),
            prompt=row["prompt"],
            answer=answer,
            language=language,
            task=self.name,
            meta={
                "verifier": verifier,
                "tests": tests,
                "split": split,
                "reasoning": reasoning,
                "line": lineno,
            },
        )

    def _pool(self, split: str, language: str | Sequence[str] | None) -> list[Problem]:
        """The file's problems of `split` (and `language`); none is an error that says why, not an empty
        draw (eval blamed "unparseable gold answers" for it, SFT a missing "reasoning")."""
        langs = None if language is None else {language} if isinstance(language, str) else set(language)
        pool = [p for p in self.items if p.meta["split"] == split and (langs is None or p.language in langs)]
        if not pool:
            raise ValueError(
                f"{self.path}: no {split} problems"
                + (f" in {sorted(langs)}" if langs else "")
                + f' among its {len(self.items)} (a line\'s "split" puts it in one; without one, a hash'
                f" of its prompt holds out 1 in {HELDOUT_EVERY} for test)"
            )
        return pool

    def iter_problems(
        self, split: str, seed: int = 0, language: str | Sequence[str] | None = None
    ) -> Iterator[Problem]:
        _check_split(split)
        pool = self._pool(split, language)
        rng = random.Random(f"{self.name}|{split}|{seed}")
        while True:
            rng.shuffle(pool)
            yield from pool

    def problems(
        self, split: str, n: int, seed: int = 0, language: str | None = None, strict: bool = True
    ) -> list[Problem]:
        _check_split(split)
        _check_language(language, self.languages)
        pool = self._pool(split, language) if n else []
        if n > len(pool) and strict:  # strict=False asks for up to n (GRPO's --train-pool): unsaid
            warnings.warn(
                f"{self.path}: asked for {n} {split} problems, only {len(pool)} exist", stacklevel=2
            )
        return super().problems(split, min(n, len(pool)), seed, language) if pool else []

    def verify(self, problem: Problem, completion: str, require_think: bool = False) -> float | None:
        answer = extract_answer(completion, require_think)
        kind = problem.meta.get("verifier", "exact")
        if kind == "code":
            return check_code(problem.meta.get("tests"), answer, partial=self.partial)
        return {"exact": check_exact, "numeric": check_numeric, "math": check_math}[kind](
            problem.answer, answer
        )

    def worked_solution(self, problem: Problem) -> str:
        reasoning = problem.meta.get("reasoning")
        if not reasoning:
            raise NotImplementedError(
                f'{self.path}: problem {problem.id} has no "reasoning" to build a worked solution'
            )
        return f"{THINK_START}\n{reasoning}\n{THINK_END}\n{problem.answer}"
