"""Flags generated from the config dataclasses: defaults, names and parsing come from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import typing

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nanoseek.cli import build_parser
from nanoseek.evaluate import EvalConfig
from nanoseek.options import check_choices, complete, describe_change, from_options, shell_quoted
from nanoseek.train.distill import DistillConfig
from nanoseek.train.grpo import GRPOConfig
from nanoseek.train.pretrain import PretrainConfig
from nanoseek.train.sft import SFTConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_no_flag_means_the_dataclass_default() -> None:
    args = parse("pretrain")
    assert args.data == ["embedded"]  # not the string, which a list flag would take apart letter by letter
    assert from_options(PretrainConfig, args, data="embedded") == PretrainConfig()
    assert from_options(SFTConfig, parse("sft", "--init", "ck")) == SFTConfig(init="ck")
    assert from_options(GRPOConfig, parse("grpo", "--init", "ck", "--task", "addition")) == GRPOConfig(
        init="ck", tasks=["addition"]
    )
    assert from_options(EvalConfig, parse("eval", "ck", "--task", "addition")) == EvalConfig(
        model="ck", task="addition"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ("pretrain", "--out=~/r", "--data", "~/a.txt", "~/b", "--tokenizer=~/t", "--preset=~/c"),
        ("sft", "--init=~/c", "--data=~/d.jsonl", "--out=~/r"),
        ("grpo", "--init=~/c", "--task", "addition", "--out=~/r"),
        ("distill", "--teacher=~/c", "--student=~/s", "--task", "addition", "--out=~/r"),
        ("eval", "~/c", "--task", "addition", "--out=~/e.json", "--run-dir=~/r"),
        ("ablate", "mla", "--out=~/r"),
        ("speedrun", "--out=~/r"),
        ("tokenizer", "train", "--out=~/t", "--data", "~/a.txt"),
        ("tokenizer", "encode", "~/t", "hi"),
        ("tokenizer", "decode", "~/t", "1"),
        ("report", "~/r"),
        ("export", "~/c", "--gguf=~/m.gguf"),
        ("inspect", "~/c"),
        ("cost", "~/c", "--tokens", "1B"),
        ("generate", "~/c", "hi"),
        ("chat", "~/c"),
        ("serve", "~/c"),
    ],
)
def test_every_path_argument_takes_tilde_as_home(argv, monkeypatch) -> None:
    """The shell expands `~` only where a word starts: `--out=~/run` and a quoted '~/run' reach
    nanoseek as typed. Only checkpoint arguments took it as the home directory: `pretrain --out=~/r`
    wrote ./~/r, `report '~/r'` found no run, `eval '~/c'` loaded ~/c but wrote its report in ./~/c."""
    monkeypatch.setenv("HOME", "/home/u")
    args = vars(complete(build_parser()).parse_args(list(argv)))
    values = [v for a in args.values() for v in (a if isinstance(a, list) else [a]) if isinstance(v, str)]
    assert not [v for v in values if v.startswith("~")]
    assert len([v for v in values if v.startswith("/home/u/")]) == sum(a.count("~") for a in argv)


def test_flags_reach_their_fields() -> None:
    args = parse(
        "pretrain", "--steps", "7", "--lr", "1e-3", "--no-document-mask", "--cut-documents",
        "--prompt-loss", "--ep", "--no-progress", "--schedule", "wsd", "--data", "a.txt", "b.txt",
    )  # fmt: skip
    cfg = from_options(PretrainConfig, args, data=args.data)
    assert (cfg.steps, cfg.lr, cfg.schedule, cfg.data) == (7, 1e-3, "wsd", ["a.txt", "b.txt"])
    assert not (cfg.document_mask or cfg.whole_documents or cfg.mask_prompts or cfg.progress)
    assert cfg.expert_parallel
    g = from_options(GRPOConfig, parse("grpo", "--init", "ck", "--task", "addition,comparison", "-G", "4"))
    assert (g.tasks, g.group_size) == (["addition", "comparison"], 4)
    e = from_options(EvalConfig, parse("eval", "http://x", "--task", "t", "--model-name", "m", "-k", "2"))
    assert (e.model, e.endpoint_model, e.k) == ("http://x", "m", 2)


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (("pretrain", "--data", "a.txt", "--data", "b.txt", "c.txt"), "data", ["a.txt", "b.txt", "c.txt"]),
        (("pretrain",), "data", ["embedded"]),
        (("sft", "--init", "ck", "--data", "a.jsonl", "--data", "b.jsonl"), "data", ["a.jsonl", "b.jsonl"]),
        (("sft", "--init", "ck"), "data", None),
        (("sft", "--init", "ck", "--task", "addition", "--task", "sorting"), "task", "addition,sorting"),
        (("tokenizer", "train", "--out", "t", "--data", "a", "--data", "b"), "data", ["a", "b"]),
        (("tokenizer", "train", "--out", "t"), "data", ["embedded"]),
        (("eval", "ck", "--task", "addition", "--task", "sorting"), "task", "addition,sorting"),
        (("grpo", "--init", "ck", "--task", "addition", "--task", "sorting"), "tasks", ["addition", "sorting"]),
        (("grpo", "--init", "ck", "--task", "a", "--reward", "accuracy:1", "--reward", "format:1"), "reward",
         "accuracy:1,format:1"),
        (("grpo", "--init", "ck", "--task", "a"), "reward", "accuracy:1,format:0.2"),
        (("distill", "--teacher", "t", "--student", "s", "--task", "a", "--task", "b"), "tasks", ["a", "b"]),
        (("speedrun", "--tasks", "addition", "--tasks", "sorting"), "tasks", "addition,sorting"),
    ],
)  # fmt: skip
def test_a_list_flag_given_twice_keeps_both(argv, field, value) -> None:
    """`sft --data a.jsonl --data b.jsonl` trained on b's examples alone, `eval --task a --task b`
    scored b alone (argparse keeps the last of a repeated flag), the first dropped without a word; the
    default gives way to the first, not kept beside."""
    assert getattr(parse(*argv), field) == value


@pytest.mark.parametrize(
    "argv",
    [
        ("ablate", "moe", "--seed", "1"),  # was --seeds 1: one seed per variant, not seed 1
        ("sft", "--init", "ck", "--min-lr", "1e-5"),  # was --min-lr-ratio 1e-5: a floor of lr x 1e-5
        ("tokenizer", "train", "--out", "t", "--vocab", "300"),
    ],
)
def test_a_flag_is_taken_only_as_spelt_out(argv, capsys) -> None:
    """argparse took any unambiguous prefix of a flag, and a flag of one command was another's there."""
    with pytest.raises(SystemExit):
        parse(*argv)
    assert f"unrecognized arguments: {argv[-2]}" in capsys.readouterr().err


def test_the_spellings_other_commands_use_are_kept() -> None:
    """`eval --no-think` (chat's) and `speedrun --task` (the stages') were taken as prefixes."""
    assert parse("eval", "ck", "--task", "addition", "--no-think").thinking is False
    assert parse("speedrun", "--task", "addition").tasks == "addition"


def test_distill_shares_run_flags_with_the_students_fine_tuning() -> None:
    args = parse(
        "distill", "--teacher", "t", "--student", "tiny-dense", "--task", "addition",
        "--out", "runs/d", "--seed", "3", "--lr", "1e-4", "--steps", "5",
    )  # fmt: skip
    sft = from_options(SFTConfig, args, init=args.student, data=None, task=None)
    cfg = from_options(DistillConfig, args, sft=sft)
    assert (cfg.out, cfg.seed, cfg.tasks) == ("runs/d", 3, ["addition"])
    assert (sft.init, sft.out, sft.seed, sft.lr, sft.steps) == ("tiny-dense", "runs/d", 3, 1e-4, 5)


TRAINING_COMMANDS = [
    ("pretrain",),
    ("sft", "--init", "ck"),
    ("grpo", "--init", "ck", "--task", "a"),
    ("distill", "--teacher", "t", "--student", "s", "--task", "a"),
    ("speedrun",),
]


@pytest.mark.parametrize("argv", TRAINING_COMMANDS)
@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_a_seed_torch_cannot_take_is_refused_as_the_flags_are_read(argv, seed, capsys) -> None:
    """torch.manual_seed refused it, as "Overflow when unpacking long long", only once a tokenizer was
    trained (pretrain, speedrun) or the checkpoint resolved (a Hub --init's download)."""
    with pytest.raises(SystemExit):
        parse(*argv, "--seed", seed)
    assert f"argument --seed: must be an integer in [-2**63, 2**64) (torch's 64-bit seeds), got {seed}" in (
        capsys.readouterr().err
    )
    assert parse(*argv, "--seed", str(2**64 - 1)).seed == 2**64 - 1  # the range's ends are taken
    assert parse(*argv, "--seed", str(-(2**63))).seed == -(2**63)


@pytest.mark.parametrize(
    ("argv", "flags"),
    [
        *(((*argv, "--threads", "2", "--tensorboard"), ("threads", "tensorboard")) for argv in TRAINING_COMMANDS[:4]),
        (("eval", "ck", "--task", "a", "--threads", "2"), ("threads",)),
        (("serve", "ck", "--threads", "2"), ("threads",)),
    ],
)  # fmt: skip
def test_the_stages_that_train_or_decode_take_pretrains_threads_and_tensorboard(argv, flags) -> None:
    """--threads and --tensorboard were pretrain's alone (--threads grpo's too): `sft --threads 2` was
    refused as unrecognized, and sft, grpo and distill wrote no TensorBoard events."""
    args = parse(*argv)
    assert [getattr(args, f) for f in flags] == [{"threads": 2, "tensorboard": True}[f] for f in flags]


@pytest.mark.parametrize(
    ("command", "said"),
    [
        # was "auto: bf16 where the CPU multiplies bf16 natively": on a GPU too, and fine-tuning follows it
        ("speedrun", "auto: bf16 where the hardware (GPU or CPU) multiplies bf16 natively, else fp32 (default "
         "auto; on a GPU, fp32 keeps SFT, GRPO and distillation in fp32 too, else bf16)"),
        # was "every sample of a task, n x k": several --task are decoded as one queue (`evaluate_many`)
        ("eval", "(default: every sample drawn, n x k of each --task, at most 256"),
    ],
)  # fmt: skip
def test_the_help_says_the_defaults_as_they_are(command, said, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(command, "--help")
    assert said in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv", [("grpo", "--init", "ck"), ("sft",), ("eval",)])
def test_required_fields_are_required_flags(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "required" in capsys.readouterr().err


def test_choices_are_checked_for_configs_built_in_python() -> None:
    with pytest.raises(SystemExit):
        parse("grpo", "--init", "ck", "--task", "t", "--loss", "ppo")
    with pytest.raises(ValueError, match="--loss 'ppo' is not one of grpo"):
        check_choices(GRPOConfig(init="ck", tasks=["t"], loss="ppo"))
    with pytest.raises(ValueError, match="--precision"):
        PretrainConfig(precision="fp16").validate()


@pytest.mark.parametrize(
    ("config", "said"),
    [
        # a bare TypeError from validate's `<` comparison
        (lambda: PretrainConfig(steps="2"), r"--steps must be of type int, got '2' \(str\)"),
        (lambda: PretrainConfig(steps=2.5), "--steps must be of type int"),  # trained on, without a word
        (lambda: SFTConfig(init="ck", lr="3e-4"), "--lr must be of type float"),
        # a string read as a list of one-letter task names ("unknown task 'a'")
        (lambda: GRPOConfig(init="ck", tasks="arithmetic"), r"--task must be of type list\[str\]"),
    ],
)
def test_field_types_are_checked_for_configs_built_in_python(config, said) -> None:
    with pytest.raises(ValueError, match=said):
        config().validate()


def test_the_types_a_flag_would_give_are_taken_for_configs_built_in_python(tmp_path) -> None:
    import numpy as np

    PretrainConfig(
        out=tmp_path, data=[tmp_path / "a.txt", "b.txt"], steps=np.int64(3), lr=1, threads=None
    ).validate()
    GRPOConfig(init=tmp_path, tasks=("arithmetic",)).validate()


def test_numpys_numbers_taken_for_a_config_are_pythons(tmp_path) -> None:
    """numpy's numbers passed the type check, and the run trained its steps, then failed saving them: the
    settings' JSON took no np.int64 (a sweep's np.arange), the optimizer's state no np.float32."""
    import json
    import os

    import numpy as np

    cfg = PretrainConfig(out=tmp_path, steps=np.int64(3), lr=np.float32(1e-3), min_lr_ratio=np.float64(0.1))
    cfg.validate()
    assert (type(cfg.steps), type(cfg.lr), type(cfg.min_lr_ratio)) == (int, float, float)
    assert json.loads(json.dumps(dataclasses.asdict(cfg), default=os.fspath))["steps"] == 3


def command_parser(command: str) -> argparse.ArgumentParser:
    """`nanoseek COMMAND`'s parser with its flags added (they are added when the command is chosen)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return complete(sub)


def test_every_field_has_a_flag_or_says_why_not() -> None:
    """A new config field gets a flag unless it opts out (cli=False): no third copy to forget."""
    parser_dests = {
        cmd: {a.dest for a in command_parser(cmd)._actions}
        for cmd in ("pretrain", "sft", "grpo", "distill", "eval")
    }
    for cmd, cls in (
        ("pretrain", PretrainConfig),
        ("sft", SFTConfig),
        ("grpo", GRPOConfig),
        ("distill", DistillConfig),
        ("eval", EvalConfig),
    ):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                assert f.name in parser_dests[cmd], f"{cls.__name__}.{f.name} has no flag on `{cmd}`"


def test_the_command_list_does_not_import_torch() -> None:
    """`nanoseek --help` stays fast: a command's generated flags (whose configs import torch) are added
    only when that command is parsed."""
    import subprocess
    import sys

    code = "import sys; from nanoseek.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("argv", "module", "entry", "cls"),
    [
        (("sft", "--init", "ck", "--steps", "3"), "nanoseek.train.sft", "sft", "SFTConfig"),
        (("grpo", "--init", "ck", "--task", "addition"), "nanoseek.train.grpo", "grpo", "GRPOConfig"),
        (("ablate", "mtp", "--seeds", "2"), "nanoseek.ablate", "ablate", "AblateConfig"),
    ],
)
def test_a_config_command_runs_its_entry_with_the_config_of_its_flags(
    monkeypatch, argv, module, entry, cls
) -> None:
    import importlib

    from nanoseek.cli import main

    mod = importlib.import_module(module)
    got = []
    monkeypatch.setattr(mod, entry, got.append)
    assert main(list(argv)) == 0
    (config,) = got
    assert type(config).__name__ == cls
    assert config == from_options(getattr(mod, cls), parse(*argv))


@pytest.mark.parametrize(
    ("command", "config", "stage"),
    [("pretrain", PretrainConfig, "pretrain"), ("sft", SFTConfig, "sft"), ("grpo", GRPOConfig, "grpo"),
     ("distill", SFTConfig, "sft")],
)  # fmt: skip
def test_a_refused_resume_names_only_flags_its_command_has(command, config, stage) -> None:
    """A resume's refusal names each changed setting by the flag that sets it (--task, not --tasks; a
    bool's --no-document-mask or --prompt-loss as given or left out), or by its bare name where the
    command has no flag for it (AdamW's betas): never a flag that `--help` does not list."""
    import importlib

    from nanoseek.train.loop import OptimConfig

    flags = {o for a in command_parser(command)._actions for o in a.option_strings}
    names = [f.name for f in dataclasses.fields(OptimConfig)] + ["bias_update_speed"]
    names += importlib.import_module(f"nanoseek.train.{stage}").RESUME_SETTINGS
    if command == "distill":  # the student's data comes from the teacher: these never change in distill
        from nanoseek.commands.distill import _SFT_DATA

        names = [n for n in names if n not in _SFT_DATA]
    for name in names:
        said = describe_change(config, name, 1, 2)
        assert not said.startswith("-") or said.split(":")[0] in flags, said
    assert describe_change(PretrainConfig, "document_mask", True, False) == (
        "--no-document-mask: left out -> given"
    )
    assert describe_change(PretrainConfig, "mask_prompts", True, False) == "--prompt-loss: left out -> given"
    assert describe_change(GRPOConfig, "tasks", ["a"], ["b"]) == "--task: ['a'] -> ['b']"
    assert (
        describe_change(SFTConfig, "betas", [0.9, 0.95], [0.9, 0.99]) == "betas: [0.9, 0.95] -> [0.9, 0.99]"
    )
    # a positional argument and a field kept off the command line have no flag to name
    assert describe_change(EvalConfig, "model", "a", "b") == "model: 'a' -> 'b'"
    assert describe_change(DistillConfig, "sft", 1, 2) == "sft: 1 -> 2"


def test_a_path_printed_for_pasting_is_one_argument_of_the_users_shell(monkeypatch):
    """`run it with llama.cpp: llama-cli -m PATH` and speedrun's `nanoseek chat PATH`: a path with a space
    pasted unquoted was two arguments."""
    import shlex
    import sys

    assert shell_quoted("/tmp/run/final") == "/tmp/run/final"  # plain paths stay as they are
    assert shlex.split(f"nanoseek chat {shell_quoted('/tmp/my run/fïnal')}") == [
        "nanoseek",
        "chat",
        "/tmp/my run/fïnal",
    ]
    monkeypatch.setattr(sys, "platform", "win32")
    assert shell_quoted(r"C:\my run\final") == r'"C:\my run\final"'


def test_a_ctrl_c_while_the_flags_are_parsed_is_no_traceback(monkeypatch, capsys) -> None:
    """Ctrl-C in the first seconds, while the parsing imports torch (generate's sampling flags): a
    traceback of the import before; now as one while the command runs, "interrupted" and 130."""
    from nanoseek.cli import main

    def importing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nanoseek.cli.build_parser", importing)
    assert main(["generate", "ck", "hi"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_cli_exit_status_and_stream_of_each_outcome(monkeypatch, capsys) -> None:
    """What scripts rely on: a KeyError's message on stderr as said (not its repr in quotes), exit 2;
    Ctrl-C exits 130 as a shell reports SIGINT; no command prints the help, exit 0; an unknown flag where
    a PROMPT may follow the flags is a usage error (2), not taken as the prompt."""
    import errno

    from nanoseek.cli import main

    def raising(exc):
        def run(args):
            raise exc

        return run

    monkeypatch.setattr("nanoseek.commands.report.run", raising(KeyError("unknown task 'nope'")))
    assert main(["report", "somewhere"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "nanoseek report: error: unknown task 'nope'\n"
    monkeypatch.setattr("nanoseek.commands.report.run", raising(KeyboardInterrupt()))
    assert main(["report", "somewhere"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    # what the file system refused, with its path: one line, exit 2; an OSError naming no file is a bug's
    denied = PermissionError(errno.EACCES, "Permission denied", "/runs/r/metrics.jsonl")
    monkeypatch.setattr("nanoseek.commands.report.run", raising(denied))
    assert main(["report", "somewhere"]) == 2
    assert capsys.readouterr().err == "nanoseek report: error: /runs/r/metrics.jsonl: Permission denied\n"
    monkeypatch.setattr("nanoseek.commands.report.run", raising(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["report", "somewhere"])
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("usage: nanoseek")
    with pytest.raises(SystemExit) as e:
        main(["generate", "ck", "--max-new-tokens", "2", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["pretrain", "--bogus"], "nanoseek pretrain: error: unrecognized arguments: --bogus\n"),
        (["tokenizer", "encode", "t", "hi", "--bogus"], "nanoseek tokenizer encode: error: unrecognized"),
    ],
)
def test_an_unknown_flag_is_said_by_its_command_with_its_usage(argv, said, capsys) -> None:
    """Said by the top parser, an unknown flag came under `usage: nanoseek [-h] [--version] <command>
    ...` as "nanoseek: error:", where every other usage error of the command shows the command's own."""
    from nanoseek.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    prog = said.partition(":")[0]
    assert e.value.code == 2 and err.startswith(f"usage: {prog} [-h]") and said in err


def test_a_failing_subcommand_is_named_as_argparse_names_it(monkeypatch, capsys) -> None:
    """`tokenizer encode`'s bad input was "nanoseek tokenizer: error:", its usage errors "nanoseek
    tokenizer encode: error:"."""
    from nanoseek.cli import main

    def run(args):
        raise ValueError("tokenizer not found: t")

    monkeypatch.setattr("nanoseek.commands.tokenizer.run_encode", run)
    assert main(["tokenizer", "encode", "t", "hi"]) == 2
    assert capsys.readouterr().err == "nanoseek tokenizer encode: error: tokenizer not found: t\n"


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["pretrian"], "did you mean 'pretrain'?"),
        (["tokenizer", "encod", "t"], "did you mean 'encode'?"),
        (["speedrun", "--preset", "GPU"], "did you mean 'gpu'?"),
        (["pretrain", "--schedule", "cosin"], "did you mean 'cosine'?"),
        # abbreviations are refused (`_no_abbreviations`): the flag they stood for is named
        (["generate", "ck", "hi", "--temp", "0.5"], "did you mean --temperature?"),
        (["ablate", "moe", "--seed", "1"], "did you mean --seeds?"),
        (["pretrain", "--lr-warmup", "10"], "did you mean --warmup-steps?"),  # a word of it, in another order
        (["--vers"], "did you mean --version?"),  # refused as the commands' are, not the version printed
        # nanoseek's own flag after a command: said before it, not the command's closest ("--precision")
        (["speedrun", "--version"], "did you mean nanoseek --version?"),
        (["sft", "--init", "x", "--version"], "did you mean nanoseek --version?"),
        (["xyzzy"], None),
        (["pretrain", "--bogus"], None),
    ],
)
def test_a_misspelt_command_choice_or_flag_names_the_one_meant(argv, meant, capsys) -> None:
    """`nanoseek pretrian` listed the fifteen commands and left the user to find the one meant; a flag
    once taken as an abbreviation (`--temp`), now refused, said nothing of the flag it stood for."""
    from nanoseek.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    if meant is None:
        assert "did you mean" not in err
    else:
        assert err.rstrip().endswith(meant)


@pytest.mark.parametrize("text", ["-", "-5", "-0.5"])
def test_a_prompt_after_the_flags_may_be_stdins_dash_or_a_negative_number(text, monkeypatch) -> None:
    """`generate DIR --chat -` (the help's "'-' reads stdin") and a prompt or text `-5` after the flags
    were refused as "unrecognized arguments", where argparse takes them before the flags."""
    from nanoseek.cli import main

    seen = []
    monkeypatch.setattr("nanoseek.commands.generate.run", lambda args: seen.append(args.text))
    monkeypatch.setattr("nanoseek.commands.tokenizer.run_encode", lambda args: seen.append(args.text))
    assert main(["generate", "ck", "--chat", text]) == 0
    assert main(["tokenizer", "encode", "t", "--bos", text]) == 0
    assert seen == [text, text]


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path) -> None:
    """SIGTERM (`kill`, `timeout`, a container's stop) mid-write ended Python where it stood: no `finally`
    ran, so the atomic writer's scratch file (`.NAME.tmp`, a whole GGUF for `export`) stayed beside
    the output, and the command said nothing. It unwinds as Ctrl-C does: one line, exit 143, the file
    before left as it was and nothing beside it."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "report.md"
    out.write_text("the good one")
    script = textwrap.dedent(f"""
        import os, signal, sys
        import nanoseek.commands.report
        from nanoseek.atomic import atomic_file
        from nanoseek.cli import main

        def run(args):  # a command killed while it writes its output
            with atomic_file({str(out)!r}) as tmp:
                tmp.write_text("half of it")
                os.kill(os.getpid(), signal.SIGTERM)
                tmp.write_text("all of it")

        nanoseek.commands.report.run = run
        sys.exit(main(["report", "somewhere"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (143, "terminated\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    assert out.read_text() == "the good one"


def test_sigterm_outside_a_training_loop_unwinds_as_ctrl_c_does() -> None:
    """The commands that train but never run under torchrun left SIGTERM as it was outside their
    training loops: one in distill's sampling of the teacher, or while a stage loads or tokenizes,
    ended the process where it stood, without a word (a Ctrl-C there says "interrupted")."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, signal, sys, time
        import nanoseek.commands.distill as command
        from nanoseek.cli import main

        def run(args):  # before the training loop (distill's sampling)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        command.run = run
        sys.exit(main(["distill", "--teacher", "ck", "--student", "ck", "--task", "arithmetic"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (143, "terminated\n")


def test_a_second_sigterm_ends_a_command_whose_unwinding_waits() -> None:
    """A command whose unwinding waits for a worker thread (an executor's exit: a Hub download runs on
    one) went on waiting after a second SIGTERM (it unwound again, and the exit joined the worker
    again), until the worker was done. The second ends the process at once, as SIGTERM did before."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, signal, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        import nanoseek.commands.report
        from nanoseek.cli import main

        unwinding = threading.Event()

        def download():  # a worker the first SIGTERM cannot stop: killed again while it is waited for
            unwinding.wait()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(120)

        def run(args):
            with ThreadPoolExecutor(1) as pool:
                pool.submit(download)
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(120)
                finally:
                    unwinding.set()

        nanoseek.commands.report.run = run
        sys.exit(main(["report", "somewhere"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr  # ended by the signal, not unwound again


def test_a_bool_is_no_number_for_a_config_built_in_python() -> None:
    """True is an int and a float to Python: `steps=True` trained one step and `lr=True` at 1.0, where
    every other value of the wrong type is refused by its flag's name."""
    with pytest.raises(ValueError, match=r"--steps must be of type int, got True \(bool\)"):
        PretrainConfig(steps=True).validate()
    with pytest.raises(ValueError, match=r"--lr must be of type float \| None, got True \(bool\)"):
        SFTConfig(init="ck", lr=True).validate()


def test_a_flag_whose_default_is_unset_shows_no_default_in_its_help() -> None:
    """`--threads` (None: torch's choice) said "(default: None)", a value no one can type; a flag with a
    value for its default says it."""
    help_text = " ".join(command_parser("pretrain").format_help().split())
    assert "(default: None)" not in help_text
    assert "--threads THREADS torch CPU threads" in help_text and "--steps STEPS (default: 300)" in help_text


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_that_names_no_file_is_one_line(code, monkeypatch, capsys) -> None:
    """A full disk or quota is the user's to fix even where the write named no file (a flush, a
    buffered write): one line, exit 2, not a traceback as a bug's OSError is."""
    import errno
    import os

    from nanoseek.cli import main

    number = getattr(errno, code)

    def run(args):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr("nanoseek.commands.report.run", run)
    assert main(["report", "somewhere"]) == 2
    assert capsys.readouterr().err == f"nanoseek report: error: {os.strerror(number)}\n"


def test_a_misspelt_word_is_matched_whatever_its_case_and_an_ambiguous_prefix_by_closeness() -> None:
    """`--TEMP` begins --temperature as `--temp` does; a prefix of two flags is an abbreviation of
    neither, and the closer spelling is named (difflib: "temp" is 8/9 of "tempo", 8/15 of
    "temperature", under the 0.6 cutoff)."""
    from nanoseek.options import close_one

    assert close_one("TEMP", ["temperature", "top-k"]) == "temperature"
    assert close_one("temp", ["temperature", "tempo"]) == "tempo"
    assert close_one("xyzzy", ["temperature", "tempo"]) is None
    # no close spelling: the one sharing the longest word, where one does and it is not a short one
    assert close_one("lr-warmup", ["lr", "warmup-steps", "min-lr-ratio"]) == "warmup-steps"
    assert close_one("lr-max", ["lr", "min-lr-ratio"]) is None
    assert close_one("steps-total", ["warmup-steps", "grpo-steps"]) is None


def test_the_resume_line_of_a_torchrun_rank_names_torchrun(monkeypatch) -> None:
    """Under torchrun (which sets TORCHELASTIC_RUN_ID) the command was `torchrun ... -m nanoseek ...`:
    a plain `nanoseek` line would resume the run in one process. A rank sees no torchrun option."""
    import argparse

    from nanoseek.cli import _resume_command

    args = argparse.Namespace(resume=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert _resume_command(["pretrain", "--out", "r"], args) == "nanoseek pretrain --out r --resume"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    assert (
        _resume_command(["pretrain", "--out", "r"], args)
        == "torchrun <its options> -m nanoseek pretrain --out r --resume"
    )


# ------------------------------------------------------------------ properties (hypothesis)
@functools.cache
def _parser(command: str) -> argparse.ArgumentParser:
    """`command_parser`, built once: a parser parses any number of command lines."""
    return command_parser(command)


# the configs each command's flags build, and the fields a command sets itself (distill's student's data)
_COMMANDS = {
    "pretrain": ((PretrainConfig, ()),),
    "sft": ((SFTConfig, ()),),
    "grpo": ((GRPOConfig, ()),),
    "eval": ((EvalConfig, ()),),
    "distill": ((DistillConfig, ()), (SFTConfig, ("init", "data", "task", "task_examples", "multi_turn"))),
}
# a word of any script, as a path, a name or a list's item: no comma (a list's separator), no leading
# "~" (the home directory, `path`) or "-" (a flag, where a value is its own word)
_WORD = st.text(st.characters(codec="utf-8", exclude_characters="\x00,~-"), min_size=1, max_size=8)


def _flag_values(cls: type, field: dataclasses.Field) -> st.SearchStrategy:
    """(the words given after a flag, once per time it is given; the field's value they make)."""
    from nanoseek.data.tasks.registry import TASKS
    from nanoseek.options import _scalar_type, torch_seed

    meta, kind = field.metadata, _scalar_type(typing.get_type_hints(cls)[field.name])
    if meta["choices"]:
        return st.sampled_from(meta["choices"]).map(lambda v: ([[v]], v))
    if getattr(meta["parse"], "__name__", None) == "split_task_list":  # `--task a,b --task c`
        tasks = st.lists(
            st.lists(st.sampled_from(sorted(TASKS)), min_size=1, max_size=3), min_size=1, max_size=3
        )
        return tasks.map(lambda given: ([[",".join(g)] for g in given], [t for g in given for t in g]))
    if meta["nargs"] == "+":  # `--data a b --data c`
        words = st.lists(st.lists(_WORD, min_size=1, max_size=3), min_size=1, max_size=3)
        return words.map(lambda given: (given, [w for g in given for w in g]))
    if meta["listed"]:  # `--task a --task b`: "a,b"
        return st.lists(_WORD, min_size=1, max_size=3).map(
            lambda given: ([[w] for w in given], ",".join(given))
        )
    if kind is int:
        ints = (
            st.integers(-(2**63), 2**64 - 1)
            if meta["parse"] is torch_seed
            else st.integers(-(10**20), 10**20)
        )
        return ints.map(lambda v: ([[str(v)]], v))
    if kind is float:
        return st.floats(allow_nan=False).map(lambda v: ([[repr(v)]], v))
    return _WORD.map(lambda v: ([[v]], v))


@st.composite
def _command_lines(draw, command: str) -> tuple[list[str], dict]:
    """A command line of `command` setting a random subset of its fields (every required one) to random
    values, and the values it sets: `--x=v` (a negative number is a flag to argparse as a word of its
    own), a list flag's words after it, a bool's flag given or not, a positional first."""
    from nanoseek.options import _long_flag, _scalar_type

    argv, positional, expected = [], [], {}
    for cls, skip in _COMMANDS[command]:
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name in expected or not f.metadata.get("cli", True):
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if not (required or draw(st.booleans())):
                continue
            kind = _scalar_type(typing.get_type_hints(cls)[f.name])
            flag = _long_flag(f.name, f.metadata, kind, f.default)
            if kind is bool:
                argv.append(flag)
                expected[f.name] = not f.default
                continue
            given, expected[f.name] = draw(_flag_values(cls, f))
            if f.metadata["positional"]:
                positional += given[0]
            elif f.metadata["nargs"] == "+":
                argv += [word for words in given for word in (flag, *words)]
            else:
                argv += [f"{flag}={words[0]}" for words in given]
    return positional + argv, expected


@pytest.mark.parametrize("command", sorted(_COMMANDS))
@settings(max_examples=30)
@given(data=st.data())
def test_any_command_line_builds_the_config_it_says(command, data) -> None:
    """Every field given its flag (ints to 2**64, floats in repr, any script, bools as `--x`/`--no-x`,
    choices, list flags given several times) reads back as given; every field left out is the
    dataclass's default, whichever the command."""
    argv, expected = data.draw(_command_lines(command))
    args = _parser(command).parse_args(argv)
    (cls, _), *student = _COMMANDS[command]
    config = from_options(cls, args)
    if student:  # distill: the student's fine-tuning, as `nanoseek distill` builds it
        config = from_options(
            DistillConfig, args, sft=from_options(SFTConfig, args, init="s", data=None, task=None)
        )
    own = {f.name: f for f in dataclasses.fields(cls)}
    for c in [config, *([config.sft] if student else [])]:
        for f in dataclasses.fields(c):
            if not f.metadata.get("cli", True) or (c is not config and f.name in _COMMANDS[command][1][1]):
                continue
            if f.name in expected:
                assert getattr(c, f.name) == expected[f.name], (f.name, argv)
            else:
                f = own.get(f.name, f)  # a flag the student shares with distill (--out, --seed) is distill's
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                default = [default] if f.metadata["nargs"] and isinstance(default, str) else default
                assert getattr(c, f.name) == default, (f.name, argv)


_REQUIRED = {
    "pretrain": [],
    "sft": ["--init", "ck"],
    "grpo": ["--init", "ck", "--task", "addition"],
    "eval": ["ck", "--task", "addition"],
    "distill": ["--teacher", "t", "--student", "s", "--task", "addition"],
}


@pytest.mark.parametrize("command", sorted(_REQUIRED))
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), text=st.text(max_size=10))
def test_a_value_a_flag_cannot_take_is_refused_naming_the_flag(command, data, text, capsys) -> None:
    """Any text a number or choice flag cannot take: a usage error (2) that names the flag, and the
    choice it names where it says "did you mean" is one of the flag's."""
    from nanoseek.cli import main

    typed = [
        a for a in _parser(command)._actions if a.option_strings and (a.choices or a.type in (int, float))
    ]
    action = data.draw(st.sampled_from(typed))
    if action.choices:
        assume(text not in action.choices)
    else:
        try:
            action.type(text)
        except ValueError:
            pass
        else:
            assume(False)  # (a number after all)
    with pytest.raises(SystemExit) as e:
        main([command, *_REQUIRED[command], f"{action.option_strings[0]}={text}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {action.option_strings[0]}" in err, err
    meant = re.search(r"did you mean '(.*)'\?", err)
    assert meant is None or meant[1] in map(str, action.choices)


@pytest.mark.parametrize("command", sorted(_REQUIRED))
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(word=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=12))
def test_an_unknown_flag_is_refused_and_the_flag_named_for_it_is_the_commands(command, word, capsys) -> None:
    from nanoseek.cli import main

    flags = {s for a in _parser(command)._actions for s in a.option_strings}
    assume(f"--{word}" not in flags | {"--version"})
    with pytest.raises(SystemExit) as e:
        main([command, *_REQUIRED[command], f"--{word}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"unrecognized arguments: --{word}" in err, err
    meant = re.search(r"did you mean (.*)\?", err)
    assert meant is None or meant[1] in flags, err
