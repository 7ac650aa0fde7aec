"""Decode cost in CPU instructions, this tree against a base commit: a figure a noisy machine cannot move.

The speed goal of issue #19 (decode within 5% of a1259f0, whose engine ran its own flattened forward)
is a ratio of a few percent, and on a shared 2-core VM wall-clock pairs of the same two commits
spread from 0.56x to 0.94x. Instructions retired do not depend on the neighbours: each tree runs the
same greedy generations of the speedrun's `tiny` model (random weights, fp32, one thread) under
valgrind's callgrind, with the counters zeroed after a warm-up and dumped after the timed
generations, so imports, model building and the first call's one-off work are left out. The ratio
base / this tree is the share of this tree's instructions the base needed; it tracks wall-clock time
where a decode step is bound by Python and dispatch (the `tiny` model at batch 1), not where it
streams weights (large models). A wall-clock figure, alternating the two trees, is printed beside it.

    python benchmarks/bench_decode_instructions.py [--base a1259f0] [--batch 1] [--runs 3]
        [--new-tokens 64] [--timing-rounds 4]

Needs valgrind (`apt-get install valgrind`); under it each tree takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside each tree's own interpreter (PYTHONPATH = that tree's src/): only API both trees share.
WORKLOAD = r"""
import os, subprocess, sys, time
import torch
torch.set_num_threads(1)
from nanoseek.config import get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.transformer import DeepSeekV3

batch, runs, new_tokens, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = get_preset("tiny").replace(eos_token_id=None)
torch.manual_seed(0)
model = DeepSeekV3(cfg).init_weights(seed=0).eval()
engine = Engine(model, max_batch_size=batch)
gen = torch.Generator().manual_seed(1)
prompts = [torch.randint(5, 4000, (16,), generator=gen).tolist() for _ in range(batch)]
params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
first = engine.generate(prompts, params)
engine.reset_prefix_cache()
engine.generate(prompts, params)
if mode == "callgrind":
    subprocess.run(["callgrind_control", "-z", str(os.getpid())], check=True, capture_output=True)
seconds = []
for _ in range(runs):
    engine.reset_prefix_cache()
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    seconds.append(time.perf_counter() - t0)
if mode == "callgrind":
    subprocess.run(["callgrind_control", "-d", str(os.getpid())], check=True, capture_output=True)
print("TOKENS", first)
print("SECONDS", min(seconds))
"""


def checkout_src(rev: str, where: Path) -> Path:
    """`rev`'s src/ (a commit of this repository) extracted under `where`: a plain copy, not a git
    worktree, so a run that is killed (`timeout`'s SIGTERM skips `finally`) leaves nothing registered
    in the repository."""
    where.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "src"], capture_output=True
    )
    if archive.returncode != 0:
        raise SystemExit(f"--base {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where / "src"


def run_tree(
    tag: str, src: Path, args: argparse.Namespace, mode: str, out_dir: Path
) -> tuple[int | None, float, str]:
    """(instructions of the timed generations or None, their best wall seconds, the greedy tokens)."""
    script = out_dir / "workload.py"
    script.write_text(WORKLOAD)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(args.batch), str(args.runs), str(args.new_tokens), mode]
    dump = out_dir / f"callgrind.{tag}"
    if mode == "callgrind":
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} ({src}): the workload failed:\n{proc.stderr[-3000:]}")
    tokens = re.search(r"^TOKENS (.*)$", proc.stdout, re.M)
    seconds = re.search(r"^SECONDS (.*)$", proc.stdout, re.M)
    assert tokens and seconds, proc.stdout
    instructions = None
    if mode == "callgrind":
        # the dump the workload asked for (callgrind_control -d) is numbered; the file at exit is not
        dumps = sorted(out_dir.glob(f"callgrind.{tag}.*"))
        if not dumps:
            raise SystemExit(f"{src}: callgrind wrote no dump after the timed generations")
        totals = re.search(r"^totals:\s*(\d+)", dumps[-1].read_text(errors="replace"), re.M)
        assert totals, dumps[-1]
        instructions = int(totals.group(1))
    return instructions, float(seconds.group(1)), tokens.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="a1259f0", help="commit to compare against (default: a1259f0)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per tree")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--timing-rounds", type=int, default=4, help="wall-clock rounds, trees alternating (0: none)"
    )
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    from nanoseek.perf import cpu_info

    info = cpu_info()
    print(
        f"cpu: {info['cpu']}; flags: {info['flags']}; fp32, 1 thread; tiny, batch {args.batch}, {args.new_tokens} new tokens"
    )
    with tempfile.TemporaryDirectory(prefix="bench_decode_instructions_") as tmp:
        tmp_dir = Path(tmp)
        base_src = checkout_src(args.base, tmp_dir / "base")
        trees = {f"base {args.base}": ("base", base_src), "this tree": ("this", REPO / "src")}
        results = {}
        for name, (tag, src) in trees.items():
            print(f"  {name}: under callgrind ...", flush=True)
            results[name] = run_tree(tag, src, args, "callgrind", tmp_dir)
        (base_i, _, base_tokens), (this_i, _, this_tokens) = results.values()
        if base_tokens != this_tokens:
            print("  WARNING: the two trees' greedy tokens differ")
        tokens = args.runs * args.batch * args.new_tokens
        assert base_i is not None and this_i is not None
        print(f"  base {args.base}: {base_i / tokens / 1e6:.2f} M instructions per generated token")
        print(f"  this tree: {this_i / tokens / 1e6:.2f} M instructions per generated token")
        print(f"  ratio base / this tree: {base_i / this_i:.3f} (1.0: as lean as the base)")
        if args.timing_rounds:
            walls: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.timing_rounds):
                for name, (tag, src) in trees.items():
                    walls[name].append(run_tree(tag, src, args, "time", tmp_dir)[1])
            base_s, this_s = (statistics.median(w) for w in walls.values())
            print(
                f"  wall clock, {args.timing_rounds} alternating rounds (median of best-of-{args.runs}): "
                f"base {tokens / args.runs / base_s:.0f} tok/s, this tree {tokens / args.runs / this_s:.0f}"
                f" tok/s, ratio this / base {base_s / this_s:.3f}"
            )


if __name__ == "__main__":
    main()
