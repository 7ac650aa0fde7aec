"""Loading benchmark: peak memory of `nanoseek.load_model` on a multi-GB checkpoint, against the
bytes of the weights it loads.

    python benchmarks/bench_loading.py                   # bf16 and int8, 3 layers (~3.3 GB on disk)
    python benchmarks/bench_loading.py --layers 4 --formats bf16 --json

Writes a synthetic checkpoint at DeepSeek-V2-Lite's width (hidden 2048, vocab 102400, 64 routed
experts of 1408 + 2 shared, kv_lora_rank 512, first layer dense) with `--layers` layers, in bf16,
sharded (1 GiB shards + index) as published checkpoints are, shard by shard so writing it never
holds the whole model. Then, for each format, loads it in a fresh Python process and reads that
process's peak RSS (`ru_maxrss`, and the kernel's VmHWM beside it): the loaded weights (parameters
and buffers, quantized storage for int8) against the peak. The goal: peak <= 1.2 x weights + 1 GB.
The checkpoint is written by a child process too: Linux carries the parent's RSS at fork into the
child's ru_maxrss, so the parent must stay small. The checkpoint it wrote is deleted afterwards
(`--keep` keeps it); one loaded with `--reuse` was there before and stays.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1024**3
SHARD_BYTES = GB

# The child: load, then report peak RSS and what the weights hold. It quantizes through
# `load_model(quantize=...)` where that exists, else as the engine did before (load, then quantize).
CHILD = """
import inspect, json, resource, sys, time
import torch
from nanoseek.checkpoint import load_model
from nanoseek.engine.quantize import quantize_model, weight_bytes
path, fmt = sys.argv[1], sys.argv[2]
if sys.argv[3] == "cli":  # as the `nanoseek` command runs: large freed blocks kept for reuse
    from nanoseek.perf import tune_malloc
    tune_malloc()
start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
q = None if fmt == "bf16" else fmt
if q is None or "quantize" in inspect.signature(load_model).parameters:
    model = load_model(path, dtype=torch.bfloat16, quantize=q) if q else load_model(path, dtype=torch.bfloat16)
else:
    model = quantize_model(load_model(path, dtype=torch.bfloat16), q)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"format": fmt, "weight_bytes": weight_bytes(model), "peak_rss": peak, "vm_hwm": hwm,
                  "start_rss": start_rss, "seconds": seconds}))
"""


def write_checkpoint(directory: Path, layers: int) -> int:
    """A random bf16 checkpoint in HF layout, written shard by shard; returns its bytes on disk."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from nanoseek.checkpoint import build_model, to_hf_state_dict
    from nanoseek.config import get_preset

    config = get_preset("deepseek-v2-lite").replace(num_hidden_layers=layers, torch_dtype="bfloat16")
    skeleton = to_hf_state_dict(build_model(config, device="meta"))  # names and shapes, no memory
    config.save(directory)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, meta in skeleton.items():
        nbytes = meta.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tuple(meta.shape)
        size += nbytes
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in tqdm(list(zip(names, shards, strict=True)), desc="writing shards", unit="shard"):
        tensors = {}
        for key, shape in shard.items():
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[key] = name
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def measure(directory: Path, fmt: str, malloc: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), fmt, malloc],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"loading {fmt} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3, help="layers (first dense); 3 is ~3.3 GB in bf16")
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8", "fp8"])
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument(
        "--reuse", action="store_true", help="load the checkpoint already in --dir (it is kept afterwards)"
    )
    ap.add_argument(
        "--malloc",
        choices=["default", "cli"],
        default="default",
        help="glibc's default thresholds, or those the nanoseek command sets (nanoseek.perf.tune_malloc)",
    )
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)  # the writing child
    args = ap.parse_args(argv)
    if args.write_only:
        print(write_checkpoint(Path(args.dir), args.layers))
        return
    if args.reuse and not (args.dir and (Path(args.dir) / "config.json").exists()):
        ap.error(f"--reuse loads the checkpoint in --dir, and {args.dir or 'no --dir'} holds none")
    if not args.reuse and args.dir and Path(args.dir).is_dir() and any(Path(args.dir).iterdir()):
        # the checkpoint is written there and the directory deleted afterwards: never over other files
        ap.error(
            f"--dir {args.dir} is not empty: --reuse to load the checkpoint in it, or an empty directory"
        )
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_loading_"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--write-only", "--dir", str(root), "--layers", str(args.layers)]
        if args.reuse:
            disk = sum(p.stat().st_size for p in root.glob("*.safetensors"))
            args.layers = json.loads((root / "config.json").read_text())["num_hidden_layers"]  # not --layers
        else:
            disk = int(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.split()[-1])
        print(f"checkpoint: {disk / GB:.2f} GB in {time.perf_counter() - t:.0f} s at {root}", file=sys.stderr)
        for fmt in args.formats:
            r = measure(root, fmt, args.malloc)
            r["goal"] = 1.2 * r["weight_bytes"] + GB
            r["ratio"] = r["peak_rss"] / r["weight_bytes"]
            results.append(r)
            print(
                f"{fmt}: weights {r['weight_bytes'] / GB:.2f} GB, peak RSS {r['peak_rss'] / GB:.2f} GB "
                f"({r['ratio']:.2f}x; goal <= {r['goal'] / GB:.2f} GB: "
                f"{'met' if r['peak_rss'] <= r['goal'] else 'MISSED'}), process before loading "
                f"{r['start_rss'] / GB:.2f} GB, VmHWM {r['vm_hwm'] / GB:.2f} GB, {r['seconds']:.0f} s",
                file=sys.stderr,
            )
    finally:
        if not args.keep and not args.reuse:  # only a checkpoint this run wrote
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"checkpoint_bytes": disk, "layers": args.layers, "results": results}))
    summary = ", ".join(
        f"{r['format']} peak {r['peak_rss'] / GB:.2f} GB / {r['weight_bytes'] / GB:.2f} GB" for r in results
    )
    print(  # beside --json's object, stdout stays that one object
        f"bench_loading: {args.layers}-layer V2-Lite-width checkpoint ({disk / GB:.2f} GB): {summary}",
        file=sys.stderr if args.json else sys.stdout,
    )


if __name__ == "__main__":
    main()
