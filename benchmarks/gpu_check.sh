#!/usr/bin/env bash
# The `gpu` speedrun preset on one GPU, in a few minutes, with its figures printed at the end.
#
#   bash benchmarks/gpu_check.sh [RUN_DIR]
#
# Installs the project if needed (the regular torch build, CUDA on Linux x86_64), checks that a GPU is
# visible, runs `nanoseek speedrun --preset gpu` through benchmarks/bench_speedrun.py (wall time per
# stage, held-out pass@1 per family before and after each stage, the goals of the main job), prints
# the first lines of the report (the engine's decode tokens/s among them), then FP8 training against
# bf16 on the `small` model (benchmarks/bench_fp8.py: step times, the GEMM backend, the loss gap).
# A rerun with the same RUN_DIR re-reads a finished run.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/gpu_check}"
python3 -c "import nanoseek" 2>/dev/null || python3 -m pip install -q -e .
python3 - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible to torch; this script is for a GPU machine")
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
      # natively, as `resolve_precision` asks: a T4 or V100 "supports" bf16 only by emulation
      f"bf16 {'yes' if torch.cuda.is_bf16_supported(including_emulation=False) else 'no'}")
EOF
start=$(date +%s)
status=0  # a missed goal (exit 1) still gets its report printed, then the status
python3 benchmarks/bench_speedrun.py --preset gpu --out "$run" --json "$run.json" || status=$?
echo "gpu_check: $(( $(date +%s) - start )) s in all; report: $run/report.md, figures: $run.json"
[ -f "$run/report.md" ] && sed -n '1,60p' "$run/report.md"
# FP8 on this GPU, after the speedrun so that its figures come first; its failure is reported, not
# lost, and the speedrun's status still wins
fp8=0
python3 benchmarks/bench_fp8.py --preset small --batch 8 --seq 512 --steps 20 --json "$run.fp8.json" || fp8=$?
[ "$fp8" -eq 0 ] || echo "gpu_check: bench_fp8.py exited $fp8" >&2
[ "$status" -ne 0 ] && exit "$status"
exit "$fp8"
