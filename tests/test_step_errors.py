"""benchmarks/step_errors.py reads every worked-solution format the task families write."""

import json
import sys
from pathlib import Path

from nanoseek.data.tasks import get_task
from nanoseek.speedrun import FAMILIES

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_scripts import load_benchmark  # noqa: E402


def _step_errors():
    return load_benchmark("step_errors")


def _eval_file(path: Path, samples: list[str]) -> Path:
    path.write_text(json.dumps({"problems": [{"sample": s} for s in samples]}, ensure_ascii=False))
    return path


def test_worked_solutions_have_no_wrong_steps_and_every_kind_is_read(tmp_path):
    module = _step_errors()
    files = []
    for family in FAMILIES:
        task = get_task(family)
        samples = [task.worked_solution(p)[len("<think>") :] for p in task.problems("train", 40, seed=1)]
        files.append(_eval_file(tmp_path / f"{family}.json", samples))
    rows = module.step_errors(files)
    assert all(bad == 0 for bad, _ in rows.values()), rows
    kinds = {k.split(":")[0] for k in rows}
    assert {"times-table fact", "fact + carry", "partial product", "column sum", "column difference"} <= kinds
    assert {"comparison", "sorting", "counting", "division row", "division", "column"} <= kinds
    assert {"column: borrow taken", "column: - digit below", "column: digits' sum"} <= set(rows)


def test_a_wrong_step_is_counted_under_its_kind(tmp_path):
    module = _step_errors()
    sample = "\n".join(
        [
            "5 × 4 = 21, write 1 carry 2",  # wrong fact
            "0 × 4 + 2 = 0 + 2 = 2",
            "smallest of 71, 20, 74, 83: 20",
            "smallest of 71, 83: 71",  # 74 dropped instead of 20
            "両辺を 6 で割る: x = 18 ÷ 6",
            "6 × 1 = 6 < 18",
            "6 × 2 = 12 < 18",
            "6 × 3 = 18",
            "x = 2",  # not the last row's k
            "Divide both sides by 4: x = 8 ÷ 4 = 3",  # the former one-step division, wrong
            "</think>",
            "2",
        ]
    )
    rows = module.step_errors([_eval_file(tmp_path / "e.json", [sample])])
    assert rows["times-table fact"] == (1, 2)
    assert rows["sorting: list left"] == (1, 1) and rows["sorting: smallest"] == (0, 2)
    assert rows["division row"] == (0, 3) and rows["division: x = last k"] == (1, 1)
    assert rows["division in one step"] == (1, 1)


def test_sorting_steps_that_cross_out_the_wrong_slot_are_counted(tmp_path):
    module = _step_errors()
    sample = "\n".join(
        [
            "smallest of 36, 90, 45, 38: 36",
            "smallest of 36, 90, 45, _: 38",  # 38 crossed out instead of 36, and named smallest
            "36, 90, 45, _ の最小: 36",  # the line above, copied right
            "</think>",
            "36, 38, 45, 90",
        ]
    )
    rows = module.step_errors([_eval_file(tmp_path / "e.json", [sample])])
    assert rows["sorting: smallest"] == (1, 3)
    assert rows["sorting: list left"] == (1, 2)
