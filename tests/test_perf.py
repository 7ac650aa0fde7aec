"""nanoseek.perf: what the machine can do, as benchmarks report it."""

from __future__ import annotations

import pytest


def test_cpu_info_names_the_cpu_and_its_matmul_flags(tmp_path, monkeypatch):
    """What every benchmark prints beside its figures (nanoseek.perf.cpu_info)."""
    import nanoseek.perf as perf

    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    )
    monkeypatch.setattr(perf, "Path", lambda _: fake)
    assert perf.cpu_info() == {"cpu": "Test CPU 9000", "flags": "avx2 avx512f avx512_bf16"}
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse\n")
    assert perf.cpu_info()["flags"].startswith("none of avx2")


def test_cpu_description_adds_native_bf16(tmp_path, monkeypatch):
    """The line the benchmarks print beside their figures (nanoseek.perf.cpu_description)."""
    import nanoseek.perf as perf

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2\n")
    monkeypatch.setattr(perf, "Path", lambda _: fake)
    assert perf.cpu_description() == "Test CPU 9000; flags: avx2; native bf16: no (fp32 is the fast path)"


def test_cpu_has_bf16_needs_the_flag_and_kernels_not_held_to_avx2(tmp_path, monkeypatch):
    import torch

    import nanoseek.perf as perf

    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(perf, "Path", lambda _: fake)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    capability = {"value": "AVX512"}
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability["value"])
    for flags, expected in (("avx2 avx512f", False), ("avx2 avx512_bf16", True), ("avx2 amx_bf16", True)):
        fake.write_text(f"flags\t\t: fpu {flags}\n")
        assert perf.cpu_has_bf16() is expected, flags
    capability["value"] = "AVX2"  # ATEN_CPU_CAPABILITY=avx2
    assert not perf.cpu_has_bf16()
    capability["value"] = "AVX512"
    for isa, expected in (("avx512_core", False), ("AVX2", False), ("AVX512_CORE_BF16", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert perf.cpu_has_bf16() is expected, isa


# oneDNN's ISA cap values in its own order (dnnl_cpu_isa_t, oneDNN 3.x docs): bf16 dot products
# (vdpbf16ps) first come with AVX512_CORE_BF16; every cap before it holds the kernels below them.
ONEDNN_ISAS_IN_ORDER = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
)


@pytest.mark.parametrize("isa", ONEDNN_ISAS_IN_ORDER)
def test_every_onednn_isa_cap_below_avx512_core_bf16_counts_as_without_bf16(tmp_path, monkeypatch, isa):
    """A cap of AVX512_CORE_VNNI (a Cascade Lake reproduced on a newer CPU) holds oneDNN below bf16
    dot products as AVX2 does; each cap from AVX512_CORE_BF16 on leaves them."""
    import torch

    import nanoseek.perf as perf

    fake = tmp_path / "cpuinfo"
    fake.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    monkeypatch.setattr(perf, "Path", lambda _: fake)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa.lower())
    native = ONEDNN_ISAS_IN_ORDER.index(isa) >= ONEDNN_ISAS_IN_ORDER.index("AVX512_CORE_BF16")
    assert perf.cpu_has_bf16() is native


def test_cpu_has_bf16_reads_onednns_older_name_for_its_isa_cap_too(tmp_path, monkeypatch):
    """oneDNN takes its ISA cap from DNNL_MAX_CPU_ISA where ONEDNN_MAX_CPU_ISA is unset (or empty): a
    process held to AVX2 by the older name counted as bf16-native, and `auto` trained in bf16 there."""
    import torch

    import nanoseek.perf as perf

    fake = tmp_path / "cpuinfo"
    fake.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(perf, "Path", lambda _: fake)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert not perf.cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    assert not perf.cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # the newer name wins, as in oneDNN
    assert perf.cpu_has_bf16()
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_BF16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not perf.cpu_has_bf16()


def test_compute_dtype_follows_autocast_and_cast_converts_only_when_needed():
    import torch

    from nanoseek.perf import cast, compute_dtype

    x = torch.ones(2, 2)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
    assert cast(x, torch.float32) is x and cast(x, torch.bfloat16).dtype == torch.bfloat16


def test_matmul_peak_is_2n3_flops_over_the_fastest_repeat(monkeypatch):
    """An n x n product is 2 n^3 FLOPs; the peak is over the best of the repeats, not the last."""
    import types

    import nanoseek.perf as perf

    # the clock: the deadline, five timed repeats of 3, 1, 2, 2 and 2 s, then past the deadline
    ticks = iter([0.0, 10.0, 13.0, 20.0, 21.0, 30.0, 32.0, 40.0, 42.0, 50.0, 52.0, 100.0])
    monkeypatch.setattr(perf, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert perf._measured_peak_flops.__wrapped__(None, "cpu", 8, 0.0, 1) == 2 * 8**3 / 1.0


def test_matmul_peak_is_cached_per_cpu_thread_count(monkeypatch):
    """A CPU's peak is its threads': a stage on one thread after one on two in the same process (a
    notebook's, the speedrun's teacher beside its student) read the two threads' cached peak."""
    import time
    import types

    import torch

    import nanoseek.perf as perf

    clock = []  # one entry per clock reading: a measurement reads it, a cached peak does not
    monkeypatch.setattr(
        perf, "time", types.SimpleNamespace(perf_counter=lambda: clock.append(1) or time.perf_counter())
    )
    perf.matmul_peak_flops.cache_clear()
    with perf.torch_threads(1):
        perf.matmul_peak_flops(torch.float64, "cpu", n=8, seconds=0.0)
        once = len(clock)
        perf.matmul_peak_flops(torch.float64, "cpu", n=8, seconds=0.0)
        assert once > 0 and len(clock) == once  # same threads: the cached peak
    with perf.torch_threads(2):
        perf.matmul_peak_flops(torch.float64, "cpu", n=8, seconds=0.0)
    assert len(clock) > once  # measured again on two threads
    perf.matmul_peak_flops.cache_clear()


TIMING_BENCHMARKS = (
    "bench_model",
    "bench_engine",
    "bench_ceiling",
    "bench_fp8",
    "bench_grpo",
    "bench_serve",
    "bench_pretrain",
    "bench_speedrun",
    "bench_learning",
)


def test_every_timing_benchmark_prints_the_cpu_line():
    """Figures measured on an AVX2 CPU and on one with native bf16 differ several-fold: every benchmark
    that times something says which CPU it ran on (flags included)."""
    from tests.benchmark_scripts import BENCHMARKS

    for name in TIMING_BENCHMARKS:
        assert "cpu_description()" in (BENCHMARKS / f"{name}.py").read_text(), name


def _bench_ceiling(monkeypatch):
    from tests.benchmark_scripts import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports bench_model and bench_engine
    return load_benchmark("bench_ceiling")


def test_bench_ceiling_shapes_only_writes_its_json(tmp_path, monkeypatch):
    import json
    import sys

    bench = _bench_ceiling(monkeypatch)
    shapes = {"float32": {"same_rows_gflop_s": 2.0, "new_rows_gflop_s": 1.0, "new_rows_split_gflop_s": 2.0}}
    monkeypatch.setattr(bench, "shape_change_cost", lambda: shapes)
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["bench_ceiling.py", "--shapes-only", "--json", str(out)])
    bench.main()
    written = json.loads(out.read_text())
    assert written["shape_changes"] == shapes and "flags: " in written["cpu"]


def test_bench_ceiling_decode_floor_is_cpu_time_as_the_steps_beside_it(monkeypatch):
    """The decode rows compare CPU-time steps (`decode_speed`'s tok/CPU-s) with the weight matmuls'
    floor: the floor is CPU time too, not wall time."""
    import argparse

    import torch

    bench = _bench_ceiling(monkeypatch)

    class FakeHF:
        def eval(self):
            return self

    monkeypatch.setattr(bench, "load_transformers", lambda directory, experts: FakeHF())
    speeds = {"nanoseek_tok_per_cpu_s": 100.0, "transformers_tok_per_cpu_s": 50.0}
    monkeypatch.setattr(bench, "decode_speed", lambda *a: speeds)
    monkeypatch.setattr(bench, "best_of", lambda fn, repeats: (1.0, 0.25))  # (wall, CPU) seconds
    threads = torch.get_num_threads()
    try:
        d = bench.decode_ceiling(argparse.Namespace(new_tokens=4))
    finally:
        torch.set_num_threads(threads)  # it sets one thread, as it measures
    assert d["batch_1"]["weight_ops_floor_ms"] == 250.0
    assert d["batch_1"]["nanoseek_step_ms"] == 10.0


def test_timing_benchmarks_refuse_zero_steps_or_repeats_before_running(monkeypatch, capsys):
    """`--steps 0` ran bench_model's whole comparison to a StatisticsError traceback (no median of no
    steps); the same for bench_ceiling's and bench_engine's counts. A usage error, before any work."""
    import sys

    import pytest
    from tests.benchmark_scripts import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # bench_ceiling imports bench_model and bench_engine
    for name, argv in (
        ("bench_model", ["--steps", "0"]),
        ("bench_ceiling", ["--repeats", "0"]),
        ("bench_engine", ["--repeats", "0"]),
    ):
        bench = load_benchmark(name)
        monkeypatch.setattr(
            bench, "tune_malloc", lambda: pytest.fail("ran past its arguments"), raising=False
        )
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
        with pytest.raises(SystemExit) as e:
            bench.main()
        assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err, name


def test_bench_ceiling_measures_the_peak_again_each_round(monkeypatch):
    """The floor and the matmul peak are measured in alternating rounds, the best of each kept; the
    peak is `matmul_peak_flops`, cached: every round read the first round's, however disturbed."""
    import types

    import nanoseek.perf as perf

    bench = _bench_ceiling(monkeypatch)
    clock = types.SimpleNamespace(now=0.0, tick=2.0)  # each timed matmul takes `tick` seconds

    def perf_counter():
        clock.now += clock.tick
        return clock.now

    ticks = iter([1.0, 4.0, 4.0])  # the matmul's time in the rounds after this one

    def floor(gemms, repeats):
        clock.tick = next(ticks)
        return 1.0, 1.0, []

    monkeypatch.setattr(perf, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(bench, "gemm_floor", floor)
    perf.matmul_peak_flops.cache_clear()
    try:
        peak = bench.floor_and_peak([], rounds=3, repeats=1)[3]
    finally:
        perf.matmul_peak_flops.cache_clear()  # no made-up peak for the tests after this one
    assert peak == 2 * 1024**3 / 1.0  # round two's, the fastest


def test_benchmarks_say_transformers_is_missing_before_any_work(monkeypatch):
    """bench_model, bench_engine and bench_ceiling measure against transformers, an optional
    dependency: without it they ended in a ModuleNotFoundError traceback, bench_ceiling's after minutes
    of GEMM timings. One line naming what to install, before any work."""
    import sys

    import pytest
    from tests.benchmark_scripts import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails as if absent
    for name in ("bench_model", "bench_engine", "bench_ceiling"):
        bench = load_benchmark(name)
        monkeypatch.setattr(bench, "tune_malloc", lambda: pytest.fail("ran past its arguments"))
        monkeypatch.setattr(sys, "argv", [f"{name}.py"])
        with pytest.raises(SystemExit) as e:
            bench.main()
        assert "transformers is not installed" in str(e.value.code) and "pip install" in str(e.value.code)


def test_bench_engine_one_new_token_decodes_one_at_batch_16_too(monkeypatch):
    """Batch 16 decodes half of --new-tokens: `--new-tokens 1`, which the argument check lets through,
    asked it for none, an invalid SamplingParams traceback after the batch-1 figures."""
    import sys

    import pytest
    import torch
    import transformers
    from tests.benchmark_scripts import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports bench_model
    bench = load_benchmark("bench_engine")

    class Loaded:
        def eval(self):
            return self

    class Stop(Exception):
        pass

    asked = []

    def speed(model, hf, batch, prompt_len, new, repeats):
        asked.append((batch, new))
        if batch == 16:
            raise Stop
        figures = ("nanoseek_tok_s", "transformers_tok_s", "speedup_wall", "speedup")
        per_cpu = {"nanoseek_tok_per_cpu_s": 1.0, "transformers_tok_per_cpu_s": 1.0}
        return {**dict.fromkeys(figures, 1.0), **per_cpu, "identical_sequences": "1/1"}

    monkeypatch.setattr(bench, "tune_malloc", lambda: None)
    monkeypatch.setattr(bench, "save_model", lambda model, d: None)
    monkeypatch.setattr(bench, "decode_speed", speed)
    auto = type("Auto", (), {"from_pretrained": staticmethod(lambda d, dtype: Loaded())})
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", auto)
    monkeypatch.setattr(sys, "argv", ["bench_engine.py", "--new-tokens", "1"])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            bench.main()
    finally:
        torch.set_num_threads(threads)  # it sets --threads for the process, as it measures
    assert asked == [(1, 1), (16, 1)]


def test_bench_grpo_times_nanoseeks_whole_step_as_trls(tmp_path, monkeypatch):
    """TRL's figure is its whole step; nanoseek's was rollout_time_s + update_time_s, which leave out
    scoring the rollouts and batching them: a step is the time between two steps' records."""
    import argparse

    from tests.benchmark_scripts import load_benchmark

    import nanoseek.train.grpo as grpo
    from nanoseek.metrics import MetricsLog

    bench = load_benchmark("bench_grpo")

    def run(cfg):  # 4 steps of 3 s each: 1 s sampling, 1 s scoring, 1 s updating
        log = MetricsLog(cfg.out, "grpo")
        for step in range(1, 5):
            log.log(step, rollout_time_s=1.0, update_time_s=1.0, response_length=8, wall_time_s=3.0 * step)

    monkeypatch.setattr(grpo, "grpo", run)
    args = argparse.Namespace(group=2, prompts=2, steps=4, max_new_tokens=8)
    r = bench.bench_nanoseek("init", args, tmp_path / "run")
    assert r["step_s"] == 3.0 and r["rollout_s"] == 1.0 and r["update_s"] == 1.0


def test_bench_pretrain_names_no_directory_it_deletes(tmp_path, monkeypatch, capsys):
    """Without --out the runs go to a temporary directory deleted at exit: the summary named it as where
    the runs were."""
    import sys

    from tests.benchmark_scripts import load_benchmark

    import nanoseek.data.corpus as corpus
    import nanoseek.tokenizer as tokenizer

    bench = load_benchmark("bench_pretrain")
    deleted = []
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "temporary"))
    monkeypatch.setattr(bench.atexit, "register", lambda fn, path, **kw: deleted.append(path))
    monkeypatch.setattr(corpus, "iter_documents", lambda source, seed: iter(["a document"]))

    class Trained:
        def save(self, directory):
            directory.mkdir(parents=True)
            (directory / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda docs, vocab_size: Trained())
    figures = dict(tokens=1, steps=1, wall_s=1.0, tok_per_s=1.0, mfu=0.1, train_loss=1.0, val_loss=None)
    imbalance = dict(imbalance_worst_layer=1.0, imbalance_mean_layer=1.0, imbalance_by_layer={"1": 1.0})
    monkeypatch.setattr(bench, "run_one", lambda args, g, tok, out: {"gamma": g, **figures, **imbalance})
    for argv, kept in (([], False), (["--out", str(tmp_path / "kept")], True)):
        monkeypatch.setattr(sys, "argv", ["bench_pretrain.py", "--gammas", "0", *argv])
        bench.main()
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert (str(tmp_path) in last) == kept, last
    assert deleted == [tmp_path / "temporary"]


def test_benchmark_seeds_are_torch_seeds(monkeypatch, capsys):
    """A seed torch's generators cannot take ended in "Overflow when unpacking long long" once a model
    was built; the benchmarks' --seed takes what the training commands' does (`options.torch_seed`)."""
    import os
    import sys

    import pytest
    from tests.benchmark_scripts import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # bench_fp8 sets it
    for name, flag in (
        ("bench_model", "--seed"),
        ("bench_fp8", "--seed"),
        ("bench_pretrain", "--seed"),
        ("bench_llamacpp", "--seed"),
        ("bench_speedrun", "--seed"),
        ("bench_learning", "--seeds"),
    ):
        bench = load_benchmark(name)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", flag, str(2**64)])
        with pytest.raises(SystemExit) as e:
            bench.main()
        assert e.value.code == 2 and "2**64" in capsys.readouterr().err, name


def test_benchmark_threads_are_refused_below_one(monkeypatch, capsys):
    """`--threads 0` reached `torch.set_num_threads` once the benchmark had built its model, and ended in
    torch's traceback; it is refused as the command line's error instead (`options.thread_count`)."""
    import os
    import sys

    import pytest
    from tests.benchmark_scripts import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # bench_fp8 sets it
    names = ("bench_engine", "bench_fp8", "bench_grpo", "bench_learning", "bench_llamacpp", "bench_model")
    for name in (*names, "bench_pretrain", "bench_serve"):
        bench = load_benchmark(name)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", "--threads", "0"])
        with pytest.raises(SystemExit) as e:
            bench.main()
        assert e.value.code == 2 and "at least 1, got 0" in capsys.readouterr().err, name


def test_bench_learning_whole_documents_leave_the_padding_out_of_the_balancing(tmp_path, monkeypatch):
    """As in `nanoseek pretrain` and `nanoseek ablate`: a variant trained on whole documents (padded
    windows) passes the routers the mask of its documents' tokens, so padding moves no expert bias."""
    import dataclasses
    import json
    from itertools import islice

    from tests.benchmark_scripts import load_benchmark
    from tests.model_configs import small_config

    import nanoseek.train.loop as loop
    from nanoseek.data.corpus import window_tokens
    from nanoseek.data.synthetic import iter_documents
    from nanoseek.tokenizer import train_tokenizer

    bench = load_benchmark("bench_learning")
    docs = list(islice(iter_documents(seed=0, tasks=["comparison"]), 200))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer(docs, vocab_size=300)
    tok.save(tmp_path / "tok")
    monkeypatch.setattr(bench, "_corpus", lambda v, seed, cache: (tmp_path / "docs.jsonl", tmp_path / "tok"))
    small_config(num_nextn_predict_layers=1).save(tmp_path / "model")
    seen = []
    real = loop.language_model_loss

    def recording(model, x, y, **kw):
        seen.append((x, kw.get("token_mask")))
        return real(model, x, y, **kw)

    monkeypatch.setattr(loop, "language_model_loss", recording)
    v = dataclasses.replace(
        bench.VARIANTS["lean2"], preset=str(tmp_path / "model"), tasks=("comparison",), steps=2, seq_len=96
    )
    bench.run_variant(v, 0, 100, 2, 0, tmp_path, 8, progress=False)
    assert len(seen) == 2
    for x, mask in seen:
        assert mask is not None and mask.equal(window_tokens(x, tok.pad_token_id)) and not mask.all()


def _cgroups(tmp_path, monkeypatch, membership: str, files: dict[str, str], affinity: int = 8):
    """A fake /proc/self/cgroup (`membership`) and cgroup mount (`files`, relative to it), and an
    affinity mask of `affinity` CPUs."""
    import os

    import nanoseek.perf as perf

    root = tmp_path / "cgroup"
    root.mkdir(parents=True, exist_ok=True)
    (tmp_path / "membership").write_text(membership)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(perf, "_PROC_CGROUP", tmp_path / "membership")
    monkeypatch.setattr(perf, "_CGROUP_ROOT", root)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)


def test_usable_cpus_are_the_affinity_mask_within_the_cgroup_cpu_quota(tmp_path, monkeypatch):
    """`docker --cpus 2` on an 8-core host: the affinity mask shows 8, the quota allows 2."""
    import nanoseek.perf as perf

    cases = [
        ("0::/\n", {"cpu.max": "max 100000\n"}, 8),  # v2, no quota
        ("0::/\n", {"cpu.max": "200000 100000\n"}, 2),  # v2, a container's own cgroup at the root
        ("0::/docker/abc\n", {"docker/abc/cpu.max": "150000 100000\n"}, 1),  # host's view; 1.5 rounds down
        ("0::/kube/pod/c\n", {"kube/cpu.max": "300000 100000\n", "kube/pod/c/cpu.max": "max 100000\n"}, 3),
        ("0::/\n", {"cpu.max": "20000 100000\n"}, 1),  # a fifth of a CPU: still one thread
        (
            "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n",  # v1: the container's cgroup at the mount
            {"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"},
            4,
        ),
        ("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),
        ("0::/\n", {}, 8),  # no cpu controller here
        ("not a cgroup line\n0::/\n", {"cpu.max": "200000 100000\n"}, 2),
    ]
    for i, (membership, files, expected) in enumerate(cases):
        _cgroups(tmp_path / str(i), monkeypatch, membership, files)
        assert perf.usable_cpus() == expected, (membership, files)
    _cgroups(tmp_path / "taskset", monkeypatch, "0::/\n", {"cpu.max": "400000 100000\n"}, affinity=1)
    assert perf.usable_cpus() == 1  # `taskset -c 0` under a quota of 4


def test_a_cpu_quota_sets_omp_num_threads_unless_the_user_chose_a_count(tmp_path, monkeypatch):
    """torch counts the affinity mask alone, a thread per host core under a quota of 2; the CLI sets
    OMP_NUM_THREADS before torch loads, where the user set neither it nor MKL_NUM_THREADS."""
    import os

    import nanoseek.perf as perf

    _cgroups(tmp_path, monkeypatch, "0::/\n", {"cpu.max": "200000 100000\n"})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert perf.threads_within_quota() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv(name, "5")
        assert perf.threads_within_quota() is None
        assert os.environ[name] == "5"
        monkeypatch.delenv(name)
    (tmp_path / "cgroup" / "cpu.max").write_text("max 100000\n")  # no quota: torch's own count stands
    assert perf.threads_within_quota() is None
    assert "OMP_NUM_THREADS" not in os.environ


def test_the_cli_holds_torch_to_the_cpu_quota(tmp_path):
    """`nanoseek generate` under a quota of 1 CPU on a host of 8: torch loads while the flags are parsed
    (the sampling ones), so the count is set before, and torch takes 1 thread, not one per core."""
    import os
    import subprocess
    import sys

    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cpu.max").write_text("100000 100000\n")
    (tmp_path / "membership").write_text("0::/\n")
    script = f"""
import os, pathlib, sys
import nanoseek.perf as perf
os.sched_getaffinity = lambda pid: set(range(8))
perf._PROC_CGROUP, perf._CGROUP_ROOT = pathlib.Path({str(tmp_path / "membership")!r}), pathlib.Path({str(tmp_path / "cgroup")!r})
from nanoseek.cli import main
assert main(["generate", {str(tmp_path / "missing")!r}, "x"]) == 2
import torch
print(torch.get_num_threads())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1"]


def test_threads_above_the_usable_cpus_are_said(monkeypatch, capsys):
    """`--threads 8` on 2 CPUs (torch makes them all; OMP_NUM_THREADS=8 torch caps at 2)."""
    import torch

    import nanoseek.perf as perf

    monkeypatch.setattr(perf, "usable_cpus", lambda: 2)
    with perf.torch_threads(8):
        assert torch.get_num_threads() == 8
    assert "--threads 8 is more than the 2 CPUs this process may use" in capsys.readouterr().err
    with perf.torch_threads(2):
        pass
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("threads", [0, -1])
def test_threads_below_one_are_refused_not_ignored(threads):
    """eval's and serve's --threads go through `torch_threads` alone: 0 left torch's count as it was
    without a word, -1 was torch's traceback."""
    import nanoseek.perf as perf

    with (
        pytest.raises(ValueError, match=f"--threads must be >= 1, got {threads}"),
        perf.torch_threads(threads),
    ):
        pass


def test_bench_fp8_refuses_a_device_the_machine_lacks(monkeypatch, capsys):
    """`bench_fp8.py --device cuda` on a machine without CUDA ended in torch's traceback ("Torch not
    compiled with CUDA enabled") once the model was being built; now a usage error says so first."""
    import os
    import sys

    import pytest
    import torch
    from tests.benchmark_scripts import BENCHMARKS, load_benchmark

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # bench_fp8 sets it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench = load_benchmark("bench_fp8")
    monkeypatch.setattr(bench.DeepSeekV3, "build", lambda *a, **k: pytest.fail("built the model"))
    monkeypatch.setattr(sys, "argv", ["bench_fp8.py", "--device", "cuda", "--steps", "10"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    assert "device 'cuda' is not available (this machine has 0 CUDA devices)" in capsys.readouterr().err
