"""Accounting: exact counts equal the formulas, published figures come out, the CLI works."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nanoseek.accounting import (
    account,
    analytic_parameters,
    count_parameters,
    counted,
    flops_per_token,
    human,
    kv_cache_bytes_per_token,
    mha_kv_cache_bytes_per_token,
    parse_count,
    si,
    training_cost,
)
from nanoseek.cli import main
from nanoseek.config import PRESETS, ModelConfig, get_preset


@pytest.mark.parametrize("name", PRESETS)
def test_meta_count_equals_formula(name: str) -> None:
    cfg = get_preset(name)
    assert count_parameters(cfg) == analytic_parameters(cfg)


@pytest.mark.parametrize(
    "changes",
    [
        dict(q_lora_rank=None),
        dict(tie_word_embeddings=True),
        dict(n_shared_experts=None),
        dict(n_routed_experts=None, num_experts_per_tok=None),  # dense
        dict(first_k_dense_replace=0, num_nextn_predict_layers=2),
    ],
)
def test_meta_count_equals_formula_variants(changes: dict) -> None:
    cfg = get_preset("tiny").replace(**changes)
    exact = count_parameters(cfg)
    assert exact == analytic_parameters(cfg)


def test_counts_match_a_real_model() -> None:
    from nanoseek.model.transformer import DeepSeekV3

    cfg = get_preset("tiny")
    model = DeepSeekV3(cfg)
    counts = count_parameters(cfg)
    assert counts.total == model.num_parameters(include_mtp=False)
    assert counts.total + counts.mtp == model.num_parameters(include_mtp=True)


def test_tied_embedding_counted_once_and_active_as_head() -> None:
    cfg = get_preset("tiny").replace(tie_word_embeddings=True)
    untied = count_parameters(get_preset("tiny"))
    tied = count_parameters(cfg)
    emb = cfg.vocab_size * cfg.hidden_size
    assert untied.total - tied.total == emb
    assert tied.active == untied.active  # the head matmul still runs


def test_active_params_follow_top_k_not_expert_count() -> None:
    base = get_preset("tiny")
    a8 = count_parameters(base.replace(n_routed_experts=8, n_group=4, topk_group=2))
    a64 = count_parameters(base.replace(n_routed_experts=64, n_group=4, topk_group=2))
    assert a64.total > a8.total
    # Only the router grows with the expert count (one score per expert); expert compute does not.
    assert a64.active - a64.active_by_component["router"] == a8.active - a8.active_by_component["router"]
    assert a64.active_by_component["routed_experts"] == a8.active_by_component["routed_experts"]


# Published figures (V3 report Table/abstract, V2 paper abstract and §4 for V2-Lite). Active counts
# leave out the input embedding; see docs/cost.md for why V2-Lite lands at 2.45B ("2.4B").
@pytest.mark.parametrize(
    "name,total,active,tol_total,tol_active",
    [
        ("deepseek-v3", 671e9, 37e9, 0.005, 0.015),
        ("deepseek-v2", 236e9, 21e9, 0.005, 0.01),
        ("deepseek-v2-lite", 15.7e9, 2.4e9, 0.005, 0.025),
    ],
)
def test_published_figures(
    name: str, total: float, active: float, tol_total: float, tol_active: float
) -> None:
    acc = account(name)
    assert acc.total_params == pytest.approx(total, rel=tol_total)
    assert acc.active_params == pytest.approx(active, rel=tol_active)


def test_v3_mtp_and_checkpoint_total() -> None:
    acc = account("deepseek-v3")
    # V3 README: 685B on disk = 671B main + 14B MTP, the MTP layer carrying embedding + head copies.
    assert acc.mtp_params_with_shared == pytest.approx(14e9, rel=0.04)
    assert acc.total_params + acc.mtp_params_with_shared == pytest.approx(685e9, rel=0.002)
    assert acc.mtp_params == acc.mtp_params_with_shared - 2 * 129280 * 7168


def test_kv_cache_v3() -> None:
    cfg = get_preset("deepseek-v3")
    assert kv_cache_bytes_per_token(cfg) == 61 * (512 + 64) * 2
    assert mha_kv_cache_bytes_per_token(cfg) == 61 * 128 * (192 + 128) * 2
    assert account(cfg).kv_cache_ratio == pytest.approx(128 * 320 / 576)


def test_flops_per_token_formula() -> None:
    cfg = get_preset("tiny")
    counts = count_parameters(cfg)
    s = 256
    attn = (
        2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (s + 1) / 2
    )
    fwd = flops_per_token(cfg, s)
    assert fwd == pytest.approx(2 * counts.matmul_active + attn)
    assert flops_per_token(cfg, s, training=True) == pytest.approx(3 * fwd)
    assert flops_per_token(cfg, s, include_mtp=True) > fwd


def test_flops_per_token_matches_measured_matmuls() -> None:
    """Count the matmul FLOPs of a real forward with torch's FLOP counter and compare."""
    from torch.utils.flop_counter import FlopCounterMode

    from nanoseek.model.transformer import DeepSeekV3

    cfg = get_preset("tiny").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = DeepSeekV3(cfg).init_weights(0)
    b, s = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (b, s))

    def grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
        # Routed experts may run as one grouped GEMM, which the counter has no formula for:
        # a [N, K] @ b[E, K, M] over row groups is 2·N·K·M.
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]

    def sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        # The CPU flash-attention kernel has no formula either: QKᵀ and AV over all S x T pairs.
        b, h, s_, d = q_shape
        return 2 * b * h * s_ * k_shape[-2] * (d + v_shape[-1])

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops}
    if hasattr(torch.ops.aten, "_grouped_mm"):
        mapping[torch.ops.aten._grouped_mm] = grouped_mm_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc, torch.no_grad():
        model(ids)
    measured = fc.get_total_flops()
    # sdpa_flops charges all S x S pairs (no causal skipping): use S keys per token for it.
    attn_full = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * s
    counts = count_parameters(cfg)
    expected = b * s * (2 * counts.matmul_active + attn_full)
    assert measured == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    "text,value",
    [
        ("14.8T", 14.8e12),
        ("300B", 300e9),
        ("1e9", 1e9),
        ("2.788M", 2.788e6),
        ("1,000,000", 1e6),
        ("12,345.5", 12345.5),
        ("5k", 5e3),
    ],
)
def test_parse_count(text: str, value: float) -> None:
    assert parse_count(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "abc", "14.8X", "-5B", "0", "1.2.3T", "1,5T", "1,00,000"])
def test_parse_count_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_count(bad, "--tokens")


@pytest.mark.parametrize(
    "n,text",
    [(1.2345e9, "1.234B"), (999_960_000, "1B"), (999_999, "1M"), (999.96, "1K"), (36.63e9, "36.63B")],
)
def test_human_rounds_before_it_picks_the_suffix(n: float, text: str) -> None:
    assert human(n) == text


def test_counted_says_one_step_not_one_steps() -> None:
    """A run of one step ended "grpo: 1 steps in 3s"."""
    assert [counted(n, "step") for n in (0, 1, 2, 1500)] == ["0 steps", "1 step", "2 steps", "1,500 steps"]


def test_described_counts_read_in_the_units_inspect_gives_them() -> None:
    """The count `serve`, `chat` and `pretrain` print: DeepSeek-V3's read "671026.4M params" (millions
    at any size), a model of 40K parameters "0.0M params"."""
    v3 = analytic_parameters(get_preset("deepseek-v3")).described
    assert v3 == "671B params + 11.61B in the MTP module"
    small = get_preset("tiny").replace(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1
    )
    counts = analytic_parameters(small)
    assert counts.described.startswith(f"{human(counts.total)} params") and "0.0M" not in counts.described


@pytest.mark.parametrize(
    "n,text", [(8.35e10, "83.5 GFLOP"), (999.7e9, "1 TFLOP"), (999.6, "1 kFLOP"), (1.0, "1 FLOP")]
)
def test_si_rounds_before_it_picks_the_prefix(n: float, text: str) -> None:
    assert si(n, "FLOP") == text


def test_v3_worked_example() -> None:
    cfg = get_preset("deepseek-v3")
    cost = training_cost(cfg, 14.8e12, gpu_hours=2.788e6, usd_per_gpu_hour=2.0, gpus=2048)
    assert cost.usd == pytest.approx(5.576e6)
    assert cost.days == pytest.approx(2.788e6 / 2048 / 24)
    assert cost.mfu_implied
    # 14.8T x ~261 GFLOP over 2.788M H800-hours at 989 TFLOP/s BF16: ~39% implied MFU.
    assert 0.36 < cost.mfu < 0.42
    # Round trip: that MFU gives back the same GPU-hours.
    again = training_cost(cfg, 14.8e12, mfu=cost.mfu)
    assert again.gpu_hours == pytest.approx(2.788e6)
    assert not again.mfu_implied
    with pytest.raises(ValueError):
        training_cost(cfg, 14.8e12)
    with pytest.raises(ValueError):
        training_cost(cfg, 14.8e12, mfu=1.5)


def test_inspect_json_on_config_only_dir(tmp_path, capsys) -> None:
    get_preset("deepseek-v3").save(tmp_path)
    assert main(["inspect", str(tmp_path), "--json", "--context", "4096"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "total_params",
        "active_params",
        "mtp_params",
        "flops_per_token",
        "kv_cache_bytes_per_token",
        "mha_kv_cache_bytes_per_token",
    ):
        assert key in out
    assert out["kv_cache_bytes_per_token"] == 61 * 576 * 2
    assert out["total_params"] == account("deepseek-v3").total_params
    assert out["mtp_params"] > 0  # config.json alone: its MTP layer is counted


def test_inspect_and_cost_read_a_preset_beside_a_run_directory_of_its_name(tmp_path, monkeypatch, capsys):
    """`nanoseek inspect tiny` where ./tiny is a run (`pretrain --out tiny`): "no config.json at
    tiny/config.json", the preset shadowed by a directory that is no model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny" / "pretrain").mkdir(parents=True)
    assert main(["inspect", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == account("tiny").total_params
    assert main(["cost", "tiny", "--tokens", "1e6"]) == 0


def test_inspect_counts_no_mtp_module_the_weights_lack(tmp_path, capsys) -> None:
    """transformers' DeepseekV3Config asks for one MTP layer and its save_pretrained writes none:
    inspect counts the model as load_model builds it."""
    import pytest

    from nanoseek.checkpoint import build_model, save_model

    cfg = get_preset("tiny").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    save_model(build_model(cfg).init_weights(0), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.warns(UserWarning, match="holds no MTP weights"):
        assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mtp_params"] == 0


def test_inspect_reads_a_checkpoint_a_crash_left_aside(tmp_path, capsys) -> None:
    """A crash between a save's two renames leaves the last checkpoint aside until the next save; chat,
    serve and load_model read it where it lies, and inspect said "neither a directory ... nor a preset"."""
    get_preset("tiny").save(tmp_path / ".pretrain.tmp-old")  # where the swap had put it
    assert main(["inspect", str(tmp_path / "pretrain"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == account("tiny").total_params
    assert not (tmp_path / "pretrain").exists()


def test_inspect_table_and_errors(capsys) -> None:
    assert main(["inspect", "tiny"]) == 0
    assert "KV cache" in capsys.readouterr().out
    assert main(["inspect", "no-such-model"]) == 2
    assert "neither a directory" in capsys.readouterr().err


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_inspect_on_a_terminal_writes_no_ansi_where_refused(env, monkeypatch, capsys) -> None:
    """Under NO_COLOR rich dropped the colors but still wrote bold and italic escapes (`colors_refused`
    says no ANSI styling at all); on a terminal otherwise the table is styled."""
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich's terminal, whatever pytest's stdout is
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert main(["inspect", "tiny"]) == 0
    assert "\x1b[" in capsys.readouterr().out
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["inspect", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "main model" in out


def test_inspect_and_cost_name_a_gguf_or_weights_file_given_for_the_directory(tmp_path, capsys) -> None:
    """`nanoseek export`'s .gguf (or a .safetensors) given where the checkpoint directory goes said
    "is not valid JSON: 'utf-8' codec can't decode byte 0x80"."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\xb0\x00\x00\x00\x00\x00\x00\x00" + bytes(range(256)))
    for command in (["inspect", str(gguf)], ["cost", str(gguf), "--tokens", "1B"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert (
            "is a GGUF file, for llama.cpp" in err
            and "give the checkpoint directory" in err
            and "JSON" not in err
        )
    assert main(["inspect", str(weights)]) == 2
    assert "is not a config.json: give the checkpoint directory" in capsys.readouterr().err
    named = tmp_path / "v3-config"  # a config.json under another name is read as before
    named.write_text(json.dumps(get_preset("deepseek-v3").to_dict()))
    assert main(["inspect", str(named), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == account("deepseek-v3").total_params


def test_inspect_and_cost_refuse_a_json_file_that_is_no_models_config(tmp_path, capsys) -> None:
    """generation_config.json (beside config.json, one tab away), tokenizer_config.json or `{}` were read
    as DeepSeek-V3's defaults: inspect and cost counted 671B for them without a word."""
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "do_sample": True}))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    for command in (["inspect", str(gen)], ["cost", str(gen), "--tokens", "1B"], ["inspect", str(empty)]):
        assert main(command) == 2
        assert "is not a model's config.json" in capsys.readouterr().err


def test_inspect_title_shows_the_name_as_given(tmp_path, monkeypatch, capsys) -> None:
    """The name went into the table's title as rich markup: `run[lr=3e-4]` lost its bracket and
    `x[/b]` ended in a MarkupError traceback; and a path wider than the table was cut over two lines."""
    monkeypatch.chdir(tmp_path)  # names that fit the 80 columns of a pipe
    for name in ("run[lr=3e-4]", "x[/b]", "models/DeepSeek-R1-Distill-Qwen-1.5B"):
        get_preset("tiny-qwen2").save(name)
        assert main(["inspect", name]) == 0
        assert f"{name}  (qwen2)" in capsys.readouterr().out


def test_cost_cli(capsys) -> None:
    assert main(["cost", "deepseek-v3", "--tokens", "14.8T", "--gpu-hours", "2.788M", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usd"] == pytest.approx(5.576e6)
    assert 0.36 < out["mfu"] < 0.42
    assert main(["cost", "deepseek-v3", "--tokens", "14.8T", "--gpu-hours", "2.788M"]) == 0
    text = capsys.readouterr().out
    assert "implied MFU" in text and "$5.576M" in text
    assert "warning" not in capsys.readouterr().err
    # a bill below what the GPUs' peak allows: said, not printed as an MFU of 108% without a word
    assert main(["cost", "deepseek-v3", "--tokens", "14.8T", "--gpu-hours", "1M"]) == 0
    assert "above the GPU's peak" in capsys.readouterr().err
    assert main(["cost", "tiny", "--tokens", "lots"]) == 2
    assert "--tokens" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--peak-tflops", "--usd-per-gpu-hour"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cost_cli_rejects_non_finite_numbers(flag: str, value: str, capsys) -> None:
    # argparse's float() takes "nan" and "inf": a clear error, not a bill of $nan or $infT
    assert main(["cost", "tiny", "--tokens", "1B", flag, value]) == 2
    assert "finite" in capsys.readouterr().err
    with pytest.raises(ValueError, match="finite"):
        training_cost(get_preset("tiny"), 1e9, mfu=0.4, gpu_hours=None, peak_flops=float(value))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cost_cli_refuses_a_peak_that_is_not_positive_by_its_flag(value: str, capsys) -> None:
    """Said in the flag's words (`--peak-tflops`), not as the accounting's `peak_flops=0.0`."""
    assert main(["cost", "tiny", "--tokens", "1B", "--peak-tflops", value]) == 2
    assert f"--peak-tflops must be a positive finite number, got {float(value)}" in capsys.readouterr().err


def test_cost_cli_units(capsys) -> None:
    # seconds under a minute (not "0.0 minutes"); sustained FLOP/s with an SI prefix, not "1.8e+03 TFLOP/s"
    assert main(["cost", "tiny", "--tokens", "1B", "--peak-tflops", "4500", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "1.8 PFLOP/s sustained" in out and "e+03" not in out
    assert "wall clock        29 seconds on 1 GPUs" in out
    # the warning about an impossible bill comes with --json too
    assert main(["cost", "deepseek-v3", "--tokens", "14.8T", "--gpu-hours", "1M", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["mfu"] > 1
    assert "above the GPU's peak" in captured.err


def test_cost_cli_passes_each_flag_and_its_documented_default_on(capsys) -> None:
    """--no-mtp and --seq-len reach the FLOPs (--no-mtp also the "incl. MTP" label), and --help's defaults
    hold: 2048 GPUs and a bill of more than a day given in days. V3's 2.788M GPU-hours on 2048 GPUs are
    2.788e6 / 2048 / 24 = 56.7 days, as its report says (about two months)."""
    cfg = get_preset("deepseek-v3")
    assert main(["cost", "deepseek-v3", "--tokens", "1T", "--no-mtp", "--seq-len", "1024", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["flops_per_token"] == flops_per_token(cfg, 1024, training=True)
    assert got["flops_per_token"] < flops_per_token(cfg, 1024, training=True, include_mtp=True)
    assert main(["cost", "deepseek-v3", "--tokens", "1T", "--no-mtp"]) == 0
    assert "incl. MTP" not in capsys.readouterr().out
    assert main(["cost", "deepseek-v3", "--tokens", "1T"]) == 0
    assert "(training = 3 x forward incl. MTP, seq 4096)" in capsys.readouterr().out
    assert main(["cost", "deepseek-v3", "--tokens", "14.8T", "--gpu-hours", "2.788M"]) == 0
    assert "wall clock        56.7 days on 2048 GPUs" in capsys.readouterr().out
    # a day exactly is said in days (24 GPU-hours on one GPU), not as 24.0 hours
    assert main(["cost", "tiny", "--tokens", "1B", "--gpu-hours", "24", "--gpus", "1"]) == 0
    assert "wall clock        1.0 days on 1 GPUs" in capsys.readouterr().out


def test_cost_json_says_what_its_flops_assume(capsys) -> None:
    """The text says "incl. MTP, seq 4096"; --json gave the FLOPs alone, the same keys with --no-mtp or
    another --seq-len, and a model without MTP modules read the same as one whose MTP was left out."""
    for argv, seq, mtp in (
        ([], 4096, True),
        (["--no-mtp", "--seq-len", "1024"], 1024, False),
    ):
        assert main(["cost", "deepseek-v3", "--tokens", "1T", "--json", *argv]) == 0
        got = json.loads(capsys.readouterr().out)
        assert (got["seq_len"], got["includes_mtp"]) == (seq, mtp)
    assert main(["cost", "tiny-qwen2", "--tokens", "1T", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["includes_mtp"] is False


def test_inspect_context_reaches_the_attention_flops_and_is_refused_under_one(capsys) -> None:
    assert main(["inspect", "deepseek-v3", "--json", "--context", "1024"]) == 0
    got = json.loads(capsys.readouterr().out)["flops_per_token"]
    assert (
        got == flops_per_token(get_preset("deepseek-v3"), 1024) < flops_per_token(get_preset("deepseek-v3"))
    )
    assert main(["inspect", "tiny", "--context", "0"]) == 2
    assert "--context must be >= 1, got 0" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_stops_is_no_traceback(monkeypatch) -> None:
    # `nanoseek cost ... | head -1`: the reader closes the pipe; a shell's tools then exit quietly
    import os
    import sys

    from nanoseek.cli import main

    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w", buffering=1) as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        assert main(["cost", "deepseek-v3", "--tokens", "14.8T", "--gpu-hours", "2.788M"]) == 141


@pytest.mark.parametrize("argv", [["inspect", "tiny", "--json"], ["inspect", "tiny"], ["--version"]])
def test_buffered_output_into_a_closed_pipe_is_no_traceback(monkeypatch, argv) -> None:
    # a pipe's stdout is block-buffered (no PYTHONUNBUFFERED): what print left there was written at the
    # interpreter's exit, "Exception ignored ... BrokenPipeError" and exit 120; rich's table exited 1
    import os
    import sys

    from nanoseek.cli import main

    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        assert main(argv) == 141
        stream.flush()  # all of it written by main: nothing left for the exit to fail on


def test_tiny_mtp_flops_and_norms_by_hand() -> None:
    """The tiny preset's figures worked out by hand (h 256, vocab 4096, 4 heads of qk 48 / v 32,
    q_lora 128, kv_lora 64 + rope 16, 16 experts of 128 with top-4 and 1 shared; its MTP depth is a
    MoE layer). MTP per token: eh_proj 2h·h = 131,072, attention 126,976, MoE 4·98,304 + 98,304 +
    router 4,096 = 495,616, the shared head again 4096·256 = 1,048,576: 2 x 1,802,240 matmul FLOPs,
    plus one layer's attention over (255 + 1) / 2 keys, 2·4·80·128 = 81,920."""
    from nanoseek.accounting import mtp_flops_per_token

    cfg = get_preset("tiny")
    assert mtp_flops_per_token(cfg, 255) == 2 * 1_802_240 + 81_920
    plain = flops_per_token(cfg, 255)
    assert flops_per_token(cfg, 255, include_mtp=True) == plain + 3_686_400
    # norms are elementwise, left out of the matmul FLOPs: per layer q_lora 128 + kv_lora 64 + 2h, + final h
    counts = count_parameters(cfg)
    assert counts.active - counts.matmul_active == 4 * (128 + 64 + 2 * 256) + 256
    # a training bill counts the MTP module V3 trains with, and an MFU of 100% is a bound, not an error
    cost = training_cost(cfg, 1e9, mfu=1.0, seq_len=255)
    assert cost.flops_per_token == pytest.approx(3 * (plain + 3_686_400))
    assert cost.gpu_hours == pytest.approx(cost.total_flops / 989e12 / 3600)


def test_gqa_kv_cache_of_a_published_model() -> None:
    """DeepSeek-R1-Distill-Qwen-1.5B's shape (Qwen2.5-1.5B: 28 layers, 12 query heads, 2 KV heads of
    128, tied embeddings, QKV bias): 1,543,714,304 parameters as transformers counts them; its cache
    holds K and V of the 2 KV heads, 28·2·2·128·2 = 28,672 B a token in BF16; MHA would hold 12 heads'
    (172,032 B); MLA at its width, V2's d_c = 4 d_h and d_h^R = d_h / 2, 28·576·2 = 32,256 B."""
    from nanoseek.config import ModelConfig

    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    )
    acc = account(cfg)
    assert acc.total_params == 1_543_714_304
    assert acc.kv_cache_bytes_per_token == 28_672
    assert acc.mha_kv_cache_bytes_per_token == 172_032
    assert acc.mla_kv_cache_bytes_per_token == 32_256
    # QKᵀ and AV: 2 FLOPs per multiply-add, each query head over head_dim for K and again for V
    from nanoseek.accounting import attention_flops_per_token

    assert attention_flops_per_token(cfg, keys=100) == 2 * 28 * 12 * (128 + 128) * 100


def test_llama_attention_bias_counts_q_k_v_and_o_biases() -> None:
    """Llama's attention_bias puts a bias on q, k, v and o_proj (transformers' LlamaAttention): on
    tiny-qwen2's shape (3 layers, h 192, 6 heads and 2 KV heads of 32) 3 x (192 + 64 + 64 + 192)."""
    from nanoseek.config import ModelConfig

    shape = get_preset("tiny-qwen2").to_dict()
    plain = ModelConfig.from_dict({**shape, "model_type": "llama"})
    biased = ModelConfig.from_dict({**shape, "model_type": "llama", "attention_bias": True})
    assert count_parameters(biased) == analytic_parameters(biased)
    assert analytic_parameters(biased).total - analytic_parameters(plain).total == 3 * (192 + 64 + 64 + 192)


def test_every_mtp_depth_adds_its_flops_and_seq_len_under_one_is_refused() -> None:
    """Two MTP depths (both MoE layers of one shape) cost twice one: each its block, eh_proj, a pass
    through the shared head and one layer's attention."""
    from nanoseek.accounting import mtp_flops_per_token

    one = get_preset("tiny").replace(first_k_dense_replace=0, num_nextn_predict_layers=1)
    two = one.replace(num_nextn_predict_layers=2)
    assert mtp_flops_per_token(two, 255) == 2 * mtp_flops_per_token(one, 255)
    assert flops_per_token(two, 255, include_mtp=True) - flops_per_token(two, 255) == 2 * mtp_flops_per_token(
        one, 255
    )
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        flops_per_token(one, 0)


@pytest.mark.parametrize("text,value", [("1.5G", 1.5e9), ("2P", 2e15), ("1_000", 1e3)])
def test_parse_count_other_suffixes(text: str, value: float) -> None:
    assert parse_count(text) == pytest.approx(value)


def test_parse_count_rejects_an_overflow_to_infinity() -> None:
    with pytest.raises(ValueError, match="positive number"):
        parse_count("1e999", "--tokens")


def test_training_cost_price_gpus_and_bill_checks() -> None:
    cfg = get_preset("tiny")
    cost = training_cost(cfg, 1e9, mfu=0.5, usd_per_gpu_hour=3.5, gpus=4)
    assert cost.usd == pytest.approx(3.5 * cost.gpu_hours)
    assert cost.days == pytest.approx(cost.gpu_hours / 4 / 24)
    # hardware one owns: a price of $0 is a bill of $0, not an error
    assert training_cost(cfg, 1e9, mfu=0.5, usd_per_gpu_hour=0.0).usd == 0.0
    with pytest.raises(ValueError, match="GPU count must be positive"):
        training_cost(cfg, 1e9, mfu=0.5, gpus=0)
    for hours in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="gpu_hours must be positive"):
            training_cost(cfg, 1e9, gpu_hours=hours)


def test_inspect_table_figures(capsys, tmp_path) -> None:
    """The figures of docs/cost.md, as the table prints them."""
    assert main(["inspect", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "│ embedding" in out and "926.7M │              0 │" in out  # a row with nothing active is shown
    assert "MTP modules (own; 13.46B with emb/head copies) │ 11.61B" in out
    assert "active fraction        5.46%" in out
    assert "(3 x forward; MTP adds 10.2 GFLOP)" in out  # 3 x the MTP forward, a training figure
    assert "4,997,120 B  (71.1x more)" in out
    # GQA: 3 x 2 x 2 x 32 x 2 = 768 B; MHA 6 heads 2,304 B; MLA at its width 3 x 144 x 2 = 864 B
    assert main(["inspect", "tiny-qwen2"]) == 0
    out = capsys.readouterr().out
    assert "2,304 B  (3.0x more)" in out and "864 B  (GQA caches 0.89x that" in out
    # one head: MHA's cache (1 x (8 + 8) + 1 x 8 per layer) is smaller than MLA's latent, not "more"
    from nanoseek.config import get_preset

    one_head = get_preset("tiny").replace(
        num_attention_heads=1, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
    )
    directory = tmp_path / "one-head"
    one_head.save(directory)
    assert main(["inspect", str(directory)]) == 0
    assert "x as much)" in capsys.readouterr().out
    # a Llama without grouping (Llama 2 7B's 32 KV heads of 32) is MHA: it caches as much, not "more"
    get_preset("tiny-qwen2").replace(model_type="llama", num_key_value_heads=6).save(tmp_path / "mha")
    assert main(["inspect", str(tmp_path / "mha")]) == 0
    assert "2,304 B  (1.0x as much)" in capsys.readouterr().out
    assert main(["inspect", "deepseek-v3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active_fraction"] == pytest.approx(36.63 / 671.03, rel=1e-3)


def test_cost_cli_prints_total_flops_and_prices_at_the_given_rate(capsys) -> None:
    argv = ["cost", "deepseek-v3", "--tokens", "14.8T", "--gpu-hours", "2.788M", "--usd-per-gpu-hour", "1.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "total FLOPs       3.858e+24" in out  # docs/cost.md
    assert "2.788M GPU-hours x $1.5 = $4.182M" in out


@pytest.mark.parametrize(
    "gpu_hours,said",
    [
        ("23.99", "1.0 days"),  # 23.99 hours rounds to a day: not "24.0 hours"
        ("23.9", "23.9 hours"),
        ("0.9999", "1.0 hours"),  # not "60.0 minutes"
        ("0.5", "30.0 minutes"),
        ("0.016666", "1.0 minutes"),  # 59.9976 s: not "60 seconds"
        ("0.01", "36 seconds"),
    ],
)
def test_cost_cli_wall_clock_rounds_before_it_picks_the_unit(gpu_hours: str, said: str, capsys) -> None:
    assert main(["cost", "tiny", "--tokens", "1B", "--gpu-hours", gpu_hours, "--gpus", "1"]) == 0
    assert f"wall clock        {said} on 1 GPUs" in capsys.readouterr().out


# ------------------------------------------------------------------ properties (hypothesis)
@st.composite
def _model_configs(draw) -> ModelConfig:
    """A small model of any family and shape: MLA with or without a query LoRA, or GQA (Qwen2, Llama with
    biases or not); dense, or MoE with any experts, shared ones, dense first layers and layer frequency;
    MTP depths; tied embeddings."""
    family = draw(st.sampled_from(["deepseek_v3", "qwen2", "llama"]))
    heads = draw(st.integers(1, 4))
    kw = dict(
        model_type=family,
        vocab_size=draw(st.integers(8, 64)),
        hidden_size=8 * draw(st.integers(1, 6)),
        intermediate_size=draw(st.integers(1, 40)),
        moe_intermediate_size=draw(st.integers(1, 20)),
        num_hidden_layers=draw(st.integers(1, 4)),
        num_attention_heads=heads,
        q_lora_rank=draw(st.none() | st.integers(1, 16)),
        kv_lora_rank=draw(st.integers(1, 16)),
        qk_nope_head_dim=draw(st.integers(1, 8)),
        qk_rope_head_dim=2 * draw(st.integers(1, 4)),
        v_head_dim=draw(st.integers(1, 8)),
        first_k_dense_replace=draw(st.integers(0, 3)),
        num_nextn_predict_layers=draw(st.integers(0, 2)),
        tie_word_embeddings=draw(st.booleans()),
        torch_dtype="float32",
        extra={"moe_layer_freq": draw(st.integers(1, 3)), "attention_bias": draw(st.booleans())},
    )
    if family != "deepseek_v3":
        kw["num_key_value_heads"] = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
        kw["head_dim"] = 2 * draw(st.integers(1, 4))
    if draw(st.booleans()):
        experts = draw(st.integers(1, 8))
        groups = draw(st.sampled_from([g for g in range(1, experts + 1) if experts % g == 0]))
        kw.update(
            n_routed_experts=experts,
            num_experts_per_tok=draw(st.integers(1, experts)),
            n_group=groups,
            topk_group=draw(st.integers(1, groups)),
            n_shared_experts=draw(st.none() | st.integers(0, 2)),
        )
    else:
        kw.update(n_routed_experts=None, num_experts_per_tok=None, n_shared_experts=None)
    try:
        return ModelConfig(**kw)
    except ValueError:  # a shape the model refuses (validate): not one to count
        assume(False)


@settings(max_examples=30)
@given(config=_model_configs())
def test_the_counts_of_any_model_are_its_formulas_and_its_parameters_one_by_one(config: ModelConfig) -> None:
    """The count from the built model equals the closed forms, and its total (with the MTP modules
    apart) is what summing the model's own parameters, a tied matrix once, gives."""
    from nanoseek.checkpoint import build_model

    counts = count_parameters(config)
    assert counts == analytic_parameters(config)
    model = build_model(config, device="meta")
    every = {id(p): p.numel() for p in model.parameters()}
    mtp = {id(p): p.numel() for name, p in model.named_parameters() if name.startswith("model.mtp_layers.")}
    assert (counts.total, counts.mtp) == (sum(every.values()) - sum(mtp.values()), sum(mtp.values()))
    assert counts.active <= counts.total and counts.matmul_active <= counts.active


@settings(max_examples=20)
@given(config=_model_configs(), seq_len=st.integers(1, 9))
def test_the_matmul_flops_of_a_forward_are_two_per_active_parameter(
    config: ModelConfig, seq_len: int
) -> None:
    """torch's FLOP counter over a real forward of any dense model: its matmuls cost 2 FLOPs per active
    weight per token, `flops_per_token`'s 2 x `matmul_active`. Attention's QK^T and AV are counted
    apart (the CPU kernel pads MLA's V to the query's width, work no model FLOP counts), and so are
    GQA's biases, an addition each, which the count takes as weights. Not MoE: its kernels' work
    (rows padded to buckets, the top-k outputs summed by a bmm) is more than the model's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from nanoseek.model.transformer import DeepSeekV3

    # (an MLA whose V is wider than its query runs SDPA's unfused path: its bmm's are attention's)
    assume(config.attention_variant == "gqa" or config.v_head_dim <= config.qk_head_dim)
    config = config.replace(num_nextn_predict_layers=0, n_routed_experts=None, num_experts_per_tok=None)
    model = DeepSeekV3(config).init_weights(0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, seq_len)))
    flops = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in flops.items() if "scaled_dot_product" not in str(op))
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))
    assert matmuls == seq_len * 2 * (count_parameters(config).matmul_active - biases)
