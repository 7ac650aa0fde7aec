"""Which steps of the worked solutions a model gets wrong: line-level error rates of its sampled answers.

    python benchmarks/step_errors.py RUN/eval/grpo_multiplication.json RUN/eval/grpo_sorting.json ...
    python benchmarks/step_errors.py RUN/eval/*.json --by-file

Reads the evaluation files `nanoseek eval --out` and the speedrun write (one sampled answer per problem
under "sample") and checks every line of the thinking that has a recognisable step against its own
numbers: a times-table fact, a fact with its carry added, a partial product, a column's sum or
difference, a comparison's relation, a division's walk up the times table, sorting's smallest and the
list left after it, counting's running marks. A line is judged on what it says, not on the problem (a
step that copies a wrong number from the line above but computes right is right here; the copy counts
under its own kind where one exists). Pass@1 says which families fail; this says which step fails,
which is what the worked-solution formats in docs/tasks.md were changed by: one fact or one small sum
per step, where the one-step version was wrong 8-57% of the time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# "ones:", "一の位:", "个位:" ... : the place name is one word before the colon in every language
PLACE = r"^\S+: "
END = r"(?:$|[,，、])"  # a step may go on with what it writes and carries ("= 20, write 0 carry 2")


def _sort_line(line: str) -> tuple[list[int | None], int] | None:
    """A sorting step's list (None for a slot crossed out with "_") and the smallest it names."""
    m = re.match(r"^(?:smallest of )?((?:\d+|_)(?:, (?:\d+|_))*)(?: の最小| 中最小)?: (\d+)$", line)
    if not m:
        return None
    return [None if x == "_" else int(x) for x in m.group(1).split(", ")], int(m.group(2))


def _list_left(nums: list[int | None], smallest: int, crossed: bool) -> list[int | None]:
    """The next step's list: `smallest` crossed out in its slot, or (the former traces) removed."""
    left = list(nums)
    if smallest in left:
        i = left.index(smallest)
        if crossed:
            left[i] = None
        else:
            del left[i]
    return left


def line_checks(thinking: str) -> Iterator[tuple[str, bool]]:
    """(kind of step, whether it is right) for each checkable step of one answer's thinking."""
    lines = thinking.strip().splitlines()
    previous: tuple[list[int | None], int] | None = None  # sorting: the last list and the smallest taken
    row: tuple[int, int] | None = None  # division: the last table row (a, k)
    for line in lines:
        if m := re.match(r"^(\d) × (\d) \+ (\d) = (\d+) \+ (\d) = (\d+)" + END, line):
            x, y, c, p, c2, v = map(int, m.groups())
            yield "times-table fact", x * y == p
            yield "fact + carry", p + c2 == v and c == c2
            continue
        if m := re.match(r"^(\d+) × (\d+) = (\d+)(?: < (\d+))?" + END, line):
            a, b, p = map(int, m.groups()[:3])
            kind = "times-table fact" if a < 10 and b < 10 else "partial product"
            if m.group(4) is not None or (row and row[0] == a and b == row[1] + 1):
                kind = "division row"
                yield "division row: next k", row is None or (row[0] == a and b == row[1] + 1) or b == 1
                if m.group(4) is not None:
                    yield "division row: < constant", p < int(m.group(4))
                row = (a, b)
            yield kind, a * b == p
            continue
        if m := re.search(r"x = (-?\d+) ÷ (\d+) = (-?\d+)$", line):  # before the times-table walk
            n, a, q = map(int, m.groups())
            yield "division in one step", a * q == n
            continue
        if (m := re.match(r"^x = (\d+)$", line)) and row:
            yield "division: x = last k", int(m.group(1)) == row[1]
            row = None
            continue
        if m := re.match(PLACE + r"(\d) \+ (\d) \+ (\d) = (\d+) \+ (\d) = (\d+)", line):
            x, y, c, s, c2, t = map(int, m.groups())
            yield "column: digits' sum", x + y == s
            yield "column: + carry", s + c2 == t and c == c2
            continue
        if m := re.match(PLACE + r"(\d+(?: \+ \d+)*) = (\d+)", line):
            yield "column sum", sum(int(t) for t in m.group(1).split(" + ")) == int(m.group(2))
            continue
        if m := re.match(PLACE + r"(\d+) - 1 - (\d) = (\d+) - (\d) = (\d+)", line):
            top, sub, less, sub2, d = map(int, m.groups())
            yield "column: borrow taken", less == top - 1
            yield "column: - digit below", less - sub2 == d and sub == sub2
            continue
        if m := re.match(PLACE + r"(\d+)( - 1)? - (\d+) = (\d+)", line):
            top, borrow, sub, d = int(m.group(1)), bool(m.group(2)), int(m.group(3)), int(m.group(4))
            yield "column difference", top - borrow - sub == d
            continue
        if m := re.search(r": (\d) (?:and|と|和) (\d): (\d) ([<>=]) (\d)$", line):
            a, b, x, rel, y = m.groups()
            yield "comparison: digits restated", (x, y) == (a, b)
            yield "comparison: relation", {"<": x < y, ">": x > y, "=": x == y}[rel]
            continue
        if shown := _sort_line(line):
            nums, smallest = shown
            yield "sorting: smallest", smallest == min((v for v in nums if v is not None), default=None)
            if previous is not None:
                crossed = None in nums or None in previous[0]
                yield "sorting: list left", nums == _list_left(*previous, crossed)
            previous = shown
            continue
        if m := re.match(r"^(\w): ((?:\w(?:\(\d+\))? ?)+)$", line):
            letter, scan = m.group(1), m.group(2).split()
            count, ok = 0, True
            for tok in scan:
                mark = re.match(r"^(\w)\((\d+)\)$", tok)
                if mark:
                    count += 1
                    ok &= mark.group(1) == letter and int(mark.group(2)) == count
                else:
                    ok &= tok != letter
            yield "counting: marks", ok


def step_errors(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """kind -> (wrong, total) over every sampled answer in the given evaluation files."""
    wrong: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for path in paths:
        for problem in json.loads(path.read_text()).get("problems", []):
            sample = problem.get("sample") or ""
            for kind, ok in line_checks(sample.split("</think>")[0]):
                total[kind] += 1
                wrong[kind] += not ok
    return {k: (wrong[k], total[k]) for k in sorted(total)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "files", nargs="+", type=Path, help="evaluation JSON files (RUN/eval/<stage>_<task>.json)"
    )
    ap.add_argument("--by-file", action="store_true", help="one table per file instead of one for all")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        ap.error(f"no such evaluation file: {', '.join(missing)}")
    groups = [[p] for p in args.files] if args.by_file else [args.files]
    for group in groups:
        if args.by_file:
            print(group[0])
        rows = step_errors(group)
        if not rows:
            print("  no checkable steps (answers without worked lines, or another task's format)")
        for kind, (bad, n) in rows.items():
            print(f"  {kind:30s} {bad:5d} / {n:5d} wrong = {bad / n:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
