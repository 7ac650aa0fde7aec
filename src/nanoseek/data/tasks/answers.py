"""Answer extraction and the verifiers shared by tasks and rewards: the text after the last ``</think>``,
scored strictly (exact, numeric, math-verify, code run against tests)."""

from __future__ import annotations

import functools
import json
import os
import re
import textwrap
import threading
import unicodedata
from fractions import Fraction
from typing import Any

from nanoseek.tokenizer import EOS as EOS_TEXT
from nanoseek.tokenizer import THINK_END, THINK_START


def strip_eos(completion: str) -> str:
    """The completion without trailing whitespace and the end-of-sentence token a sampler may keep."""
    text = completion.rstrip()
    return text[: -len(EOS_TEXT)] if text.endswith(EOS_TEXT) else text


def split_completion(completion: str, prompt_opened_think: bool = True) -> tuple[str, str | None]:
    """(thinking, answer): answer is None when the think block never closed. The answer is what follows
    the last ``</think>``, as accuracy reads it: reasoning after an earlier ``</think>`` is thinking."""
    text = strip_eos(completion).lstrip()
    if text.startswith(THINK_START):
        text = text[len(THINK_START) :]
    elif not prompt_opened_think and THINK_END not in text:
        return "", text  # a plain answer, no thinking
    if THINK_END not in text:
        return text, None
    thinking, _, answer = text.rpartition(THINK_END)
    return thinking, answer


def extract_answer(completion: str, require_think: bool = False) -> str | None:
    """The text after the last ``</think>``; without one, the whole completion unless ``require_think``."""
    text = completion.replace(EOS_TEXT, "")
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1].strip()
    return None if require_think else text.strip()


def unbox(text: str) -> str:
    r"""The content of the one ``\boxed{...}`` (brace-matched), else the text itself.

    Two or more boxes are left as they are (and then fail to parse): boxing many candidates is a hack.
    """
    start = text.rfind("\\boxed{")
    if start < 0 or text.count("\\boxed{") > 1:
        return text
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text


# LaTeX's inline and display math around a whole answer: \(42\), \[42\]
_MATH_MODE_RE = re.compile(r"\\\((.*)\\\)|\\\[(.*)\\\]", re.DOTALL)
# what closes an answer, in either order: the ``$`` of ``$42$`` and a full stop (``$42$.``, ``$42.$``).
# Matched at the start of the reversed text: a search for ``[...]+$`` retries from every position of a
# long run of dots or spaces (a degenerate completion's), quadratic in its length.
_CLOSING_RE = re.compile(r"[\s$。.]*")


def _strip_closing(s: str) -> str:
    closing = _CLOSING_RE.match(s[::-1])
    assert closing is not None  # `[...]*` matches at the start of every string, if only the empty one
    return s[: len(s) - closing.end()]


def unwrap_answer(text: str) -> str:
    r"""An answer without its markup: the one ``\boxed{...}``, the ``$...$``, ``\(...\)`` or ``\[...\]``
    around it, and a closing full stop (``42.``, ``42。``)."""
    s = _strip_closing(unbox(text.strip()).strip().lstrip("$")).strip()
    m = _MATH_MODE_RE.fullmatch(s)
    return s if m is None else (m.group(1) if m.group(1) is not None else m.group(2)).strip()


# Digits and signs as a CJK input method types them (full-width forms) and the typeset minus (U+2212):
# the same answer as in ASCII. The full-width digits alone were read (`\d` is Unicode), so "１７" scored
# and "－１７" or a countdown "（３＋６）＊６" did not; nor "３．５" or "１，０００" (its point and separator).
_ASCII_MATH = str.maketrans("０１２３４５６７８９－\u2212＋＊／（）＝．，", "0123456789--+*/()=.,")


def ascii_math(text: str) -> str:
    """`text` with full-width digits, signs, parentheses, ``=``, decimal point and comma, and the typeset
    minus, in ASCII."""
    return text.translate(_ASCII_MATH)


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_FRACTION_RE = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
# the numerator may carry the sign: LaTeX typesets \frac{-7}{2} as -7/2, and math-verify reads it so
_LATEX_FRACTION_RE = re.compile(r"([+-]?)\s*\\[dt]?frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
# thousands separators: a first group of one to three digits (not a 0), then groups of three; a comma
# read anywhere before three digits took "0,500" (a European 0.5) for 500, "0.123,456" for 0.123456
_THOUSANDS_RE = re.compile(r"(?<![\w.,])(?!0)\d{1,3}(?:,\d{3})+(?![\w,])")
_MAX_EXPONENT = 400  # past any answer a verifier compares, and cheap to build exactly
# the longest number read: 64 characters left the golds of `arithmetic?digits=33&ops=mul` (65 digits)
# unparseable, every such problem skipped; this many digits are still cheap to read exactly
_MAX_NUMBER_CHARS = 1000


def parse_number(text: str | None) -> Fraction | None:
    """One number and nothing else (``42``, ``-3.5``, ``7/2``, ``\\frac{7}{2}``, ``1,234``, ``$42$``,
    ``\\(42\\)``, ``\\boxed{42}``)."""
    if text is None:
        return None
    s = ascii_math(unwrap_answer(text).rstrip("。.").strip())
    s = _THOUSANDS_RE.sub(lambda m: m.group().replace(",", ""), s)
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if _NUMBER_RE.fullmatch(s):
        # Fraction("1e999999999") builds 10**999999999: a 12-character answer must not hang the reward
        exp = re.search(r"[eE]([+-]?\d+)$", s)
        if exp and abs(int(exp.group(1))) > _MAX_EXPONENT:
            return None
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    m = _FRACTION_RE.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _LATEX_FRACTION_RE.fullmatch(s)  # \frac{7}{2}, -\dfrac{1}{2}, \frac{-1}{2}
    if m and int(m.group(3)) != 0:
        return (-1 if m.group(1) == "-" else 1) * Fraction(int(m.group(2)), int(m.group(3)))
    return None


def numbers_equal(gold: Fraction, pred: Fraction, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """An integer gold is matched exactly (``42.00001`` is not 42); a non-integer one within
    ``rel_tol``/``abs_tol`` as math.isclose would, in exact arithmetic (no float overflow)."""
    if gold.denominator == 1:
        return gold == pred
    tol = max(Fraction(rel_tol) * max(abs(gold), abs(pred)), Fraction(abs_tol))
    return abs(gold - pred) <= tol


def check_numeric(gold: str, answer: str | None) -> float | None:
    g = parse_number(gold)
    if g is None:
        return None  # unparseable gold: skip, never reward
    p = parse_number(answer)
    return float(p is not None and numbers_equal(g, p))


def _normalize_exact(s: str) -> str:
    # NFC: canonically equivalent text is one answer (Unicode C6), whether typed (NFC) or copied from a
    # macOS file name (NFD: が as か + U+3099)
    return unicodedata.normalize("NFC", " ".join(unwrap_answer(s).split())).rstrip("。.").strip()


def answer_key(answer: str | None) -> Fraction | tuple[int, ...] | str | None:
    r"""What an answer says, as the verifiers compare it (for majority votes): a number by its value
    (``42``, ``42.``, ``$\boxed{42}$``, ``x = 42`` alike: linear equations' answers), a list of
    numbers by its numbers (``1, 2`` and ``[1, 2]``: sorting's), else its unboxed, space-normalized
    text; None for no answer. Wrong answers written two ways were two votes, and a right one given
    once could win against them."""
    if answer is None:
        return None
    number = parse_number(answer)
    if number is None:
        number = parse_number(without_variable(answer))
    if number is not None:
        return number
    numbers = parse_int_list(answer)
    if numbers is not None and len(numbers) > 1:
        return tuple(numbers)
    return _normalize_exact(answer) or None


def without_variable(answer: str) -> str:
    """``x = 5`` (``ｘ＝５`` too) as ``5``: a linear equation's answer, the variable named."""
    return _VARIABLE_RE.sub("", ascii_math(unwrap_answer(answer)))


_VARIABLE_RE = re.compile(r"^\s*[xｘ]\s*=\s*")
# the longest list `parse_int_list` reads
_MAX_LIST_CHARS = 500


def parse_int_list(text: str | None) -> list[int] | None:
    """``1, 2, 3`` / ``[1, 2, 3]`` / ``1 2 3`` / ``1、2、3`` -> [1, 2, 3]; anything else -> None."""
    if text is None:
        return None
    s = unwrap_answer(text)
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    if len(s) > _MAX_LIST_CHARS or not re.fullmatch(r"\s*-?\d+(?:\s*[,、，\s]\s*-?\d+)*\s*", s):
        return None
    return [int(x) for x in re.findall(r"-?\d+", s)]


def check_exact(gold: str, answer: str | None) -> float | None:
    if not gold.strip():
        return None
    return float(answer is not None and _normalize_exact(answer) == _normalize_exact(gold))


# an answer that already sits in math mode; anything else is read as ``$...$``
_MATH_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")


def _in_math_mode(text: str) -> str:
    # wrapped again, ``\[ \frac{3}{4} \]`` (display math, R1's habit) was ``$\[...\]$``: no answer
    return text if any(d in text for d in _MATH_DELIMITERS) else f"${text}$"


def check_math(gold: str, answer: str | None) -> float | None:
    """math-verify equivalence (LaTeX, \\boxed, fractions, sets, ...).

    math-verify times its parsing with SIGALRM, which only works in the main thread; elsewhere (reward
    worker threads, a server) we run it with its timeouts disabled and bound the input size instead.
    Without SIGALRM (Windows) its timeouts run each call in a spawned process, which cannot pickle the
    local function it sends: every call failed, every answer unscored; disabled there too.
    """
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main and os.name == "posix" else None  # (math-verify's own test for SIGALRM)
    if not main or timeout is None:
        _quiet_math_verify_timeout_warning()
    try:
        g = parse(_in_math_mode(gold), parsing_timeout=timeout)
    except Exception:
        g = []
    if not g:
        return None
    if answer is None or len(answer) > 2000:
        return 0.0
    try:
        p = parse(_in_math_mode(answer), parsing_timeout=timeout)
        return float(bool(p) and verify(g, p, timeout_seconds=timeout))
    except Exception:
        return 0.0


@functools.cache
def _quiet_math_verify_timeout_warning() -> None:
    # math-verify warns on every call made with its timeout disabled; once is enough (documented above)
    import logging

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(lambda r: "Timeout is disabled" not in r.getMessage())


# every fenced block with its language: a ```bash block's closing fence must not open the next block
_CODE_BLOCK_RE = re.compile(r"```[ \t]*([^\s`]*)[^\n`]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3", "py3")


def extract_code(answer: str) -> str:
    """The answer's last ```python block (``py``, ``python3`` alike), else its last untagged block (an
    example's output after the code is one), dedented; else the whole answer."""
    blocks = _CODE_BLOCK_RE.findall(answer)
    python = [code for tag, code in blocks if tag.lower() in _PYTHON_TAGS]
    chosen = python or [code for tag, code in blocks if not tag]
    return textwrap.dedent(chosen[-1]) if chosen else answer


def run_code_tests(code: str, tests: str | list[dict[str, str]], timeout: float = 2.0) -> tuple[int, int]:
    """(passed, total) for ``code`` against ``tests`` in the sandbox (see sandbox.run_tests)."""
    from nanoseek.data.sandbox import SandboxConfig, run_tests

    return run_tests(code, tests, SandboxConfig(timeout=timeout))[:2]


def check_code(tests: Any, answer: str | None, partial: bool = False) -> float | None:
    if not tests:
        return None
    if answer is None or not answer.strip():
        return 0.0
    passed, total = _cached_code_run(extract_code(answer), json.dumps(tests, sort_keys=True))
    return passed / total if partial else float(passed == total)


@functools.lru_cache(maxsize=256)
def _cached_code_run(code: str, tests_json: str) -> tuple[int, int]:
    # accuracy and code rewards both run the same program: run it once
    return run_code_tests(code, json.loads(tests_json))
