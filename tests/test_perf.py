"""nanoseek.perf: what the machine can do, as benchmarks report it."""

from __future__ import annotations


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
