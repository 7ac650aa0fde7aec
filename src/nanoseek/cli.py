"""`nanoseek <command>`: a thin front door. Each module in `nanoseek.commands` registers one subcommand.

Commands import their heavy dependencies inside `run`, so `nanoseek --help` stays fast.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import importlib
import io
import os
import pkgutil
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import nanoseek.commands as _commands
from nanoseek.options import close_one
from nanoseek.train import DATA_PARALLEL, TrainingDiverged, TrainingInterrupted, one_process

# Commands that stop on SIGTERM their own way: `pretrain` saves at the next step and exits 143
# (`Trainer.stop_on_signals`; a rank under torchrun is not to unwind mid-collective), and `serve` (uvicorn)
# finishes the requests in flight, then ends by the signal (clean, to systemd). Not the other commands that
# train, which never run under torchrun: their loops save on SIGTERM all the same (`stop_on_signals` takes
# it over), but outside them (distillation's sampling, a stage's loading, the speedrun's evaluation) the
# signal ended them where they stood, without a word, and a speedrun's stage beside the stopped one was
# killed unsaved.
OWN_SIGTERM = frozenset({"pretrain", "serve"})

# How long the other ranks under torchrun wait for rank 0 to say a refusal they all made (torchrun
# stops them as soon as rank 0 has exited).
RANK_0_SAYS_S = 10.0


class Terminated(BaseException):
    """SIGTERM, raised where the command is, as Ctrl-C raises KeyboardInterrupt (see `_sigterm_unwinds`).
    A BaseException, so no `except Exception` takes it; not a KeyboardInterrupt, which `chat` takes
    as "stop this reply" and goes on."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, which names the close choice of a misspelt one (`nanoseek pretrian`, `--schedule
    cosin`), as git does and argparse's own `suggest_on_error` (Python 3.14) does. The commands' parsers
    are of this class too (argparse makes them of their parent's)."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            close = close_one(str(value), map(str, action.choices or ()))
            if close is None:
                raise
            raise argparse.ArgumentError(action, f"{e.message}; did you mean {close!r}?") from None


def build_parser() -> argparse.ArgumentParser:
    from nanoseek import __version__

    parser = _Parser(
        prog="nanoseek",
        description="DeepSeek's recipe end to end: V3 model, pretraining, R1 reasoning RL, serving.",
        allow_abbrev=False,  # as every command's (`_no_abbreviations`): `--vers` is no `--version`
    )
    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"nanoseek.commands.{info.name}")
        module.register(sub)
    _no_abbreviations(sub)
    return parser


def _no_abbreviations(sub: argparse._SubParsersAction) -> None:
    """A command's flags only as spelt out: argparse took any unambiguous prefix, and a flag of one
    command was another's there (`ablate --seed 1` ran one seed per variant as `--seeds 1`; `sft --min-lr
    1e-5` set --min-lr-ratio) without a word. Now such a flag is refused as unrecognized."""
    for command in sub.choices.values():
        command.allow_abbrev = False
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):  # `tokenizer train|encode|decode`
                _no_abbreviations(action)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # A pipe's stdout is block-buffered: what `print` left in the buffer was written only at the
            # interpreter's exit, where a reader gone (`nanoseek inspect tiny --json | head -1`, `--help |
            # head`) printed "Exception ignored ... BrokenPipeError" and exited 120. Written here instead.
            if sys.stdout is not None:  # (fd 1 closed: `>&-`)
                sys.stdout.flush()
    except BrokenPipeError:  # `nanoseek cost ... | head`: the reader has all it wanted
        # Python's recipe: point stdout at devnull so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command killed by SIGPIPE
    except KeyboardInterrupt:  # here, not around the command alone: a Ctrl-C while the parsing loads
        # torch (`generate`'s sampling flags) printed a traceback of the import
        print("interrupted", file=sys.stderr)
        return 130


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` ran: `tokenizer encode`'s, not `tokenizer`'s."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) not in sub.choices:
            return parser
        parser = sub.choices[getattr(args, sub.dest)]


def _main(argv: list[str] | None) -> int:
    from nanoseek.perf import threads_within_quota

    # before the parsing, which loads torch for some commands' flags (generate's sampling ones), and
    # torch reads OMP_NUM_THREADS once, as it loads
    threads_within_quota()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = _command_parser(parser, args)
    # argparse settles an optional positional at the first run of positionals, so a command's PROMPT
    # after its flags (`generate DIR --chat "2 + 2 = ?"`) is left over: commands name such fields
    for name in getattr(args, "late_positionals", ()):
        if not extra or getattr(args, name) not in (None, []):
            continue
        if getattr(args, name) == []:  # a list's (`decode DIR --skip-special-tokens 5 6`): what is left
            while extra and extra[0] != "--" and command._parse_optional(extra[0]) is None:
                getattr(args, name).append(extra.pop(0))
            continue
        if extra[0] == "--":  # `encode DIR --bos -- -5`: after "--", text whatever it is
            extra.pop(0)
            if not extra:  # a bare "--" only ends the options: no text (stdin is read, as `cat --` does)
                continue
        elif command._parse_optional(extra[0]) is not None:
            # a flag (refused below), as argparse tells one: not `-` (`generate DIR --chat -` reads stdin)
            # nor a negative number, which it takes as the PROMPT before the flags and refused after them
            continue
        setattr(args, name, extra.pop(0))
    if extra:
        # Said by the command's own parser, as its other usage errors are (the top one's usage showed
        # none of its flags), with the flag meant where one is misspelt or abbreviated (`--temp`, refused)
        flags = {s.lstrip("-"): s for a in command._actions for s in a.option_strings if s.startswith("--")}
        words = [w.lstrip("-").partition("=")[0] for w in extra if w.startswith("--")]
        # nanoseek's own flag after a command (`speedrun --version`) is said before it: the command's
        # closest flag was another one ("did you mean --precision?")
        own = {s.lstrip("-") for a in parser._actions for s in a.option_strings if s.startswith("--")}
        meant = []
        for w in filter(None, words):
            if w in own and w not in flags:
                meant.append(f"{parser.prog} --{w}")
            elif close := close_one(w, flags):
                meant.append(flags[close])
        hint = f"; did you mean {', '.join(meant)}?" if meant else ""
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from nanoseek.perf import tune_malloc

    tune_malloc()  # every command that trains or generates allocates multi-MB tensors per step
    # A stdout in ASCII or Latin-1 (PYTHONIOENCODING=ascii, a legacy console code page, the C locale with
    # PYTHONUTF8=0) raised on the first CJK or emoji token and the command ended as a usage error: escape
    # what it cannot encode, as Python does on stderr, and print the rest. The C locale opens it with
    # surrogateescape, which passes only undecodable bytes through: enough for UTF-8 alone (UTF-8 mode).
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper) and (
        out.errors == "strict"
        or (out.errors == "surrogateescape" and codecs.lookup(out.encoding).name != "utf-8")
    ):
        out.reconfigure(errors="backslashreplace")
    # errors named as argparse names its own: `nanoseek tokenizer encode: error:`, not `nanoseek tokenizer:`
    prog = command.prog
    if sys.stdin is None:
        # fd 0 closed (`nanoseek chat DIR <&-`, some job runners): Python leaves sys.stdin None, and
        # `chat`, `generate DIR -` and `tokenizer encode` failed on it with an AttributeError. Read it as
        # the empty input /dev/null gives; the open takes fd 0, so no file opened later lands there.
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 (the process's stdin, left open)
    try:
        if args.command not in DATA_PARALLEL:
            # `torchrun -m nanoseek eval` ran the whole evaluation in every process, each appending
            # its line to metrics.jsonl and writing the same report
            one_process(f"{args.command} runs")
        with _sigterm_unwinds(args.command):
            result = args.func(args)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except TrainingInterrupted as e:  # saved at a step boundary: say where, and how to go on from it
        if os.environ.get("RANK", "0") == "0":  # once under torchrun, not by every rank
            print(
                f"nanoseek {args.command}: {e}; resume with: {_resume_command(argv, args)}", file=sys.stderr
            )
        return e.exit_code  # 130 or 143, as a shell reports the signal: job runners read it
    except BrokenPipeError:
        raise  # to `main`, not to the OSError below
    except (ValueError, FileNotFoundError, KeyError) as e:
        if getattr(e, "every_rank", False) and os.environ.get("RANK", "0") != "0":
            # rank 0 says it (`alike_on_every_rank`); the others leave quietly, but not at once:
            # torchrun stops every rank when one exits, and a rank 0 a moment behind was stopped
            # before it said anything
            time.sleep(RANK_0_SAYS_S)
            return 2
        # Bad input: one clear line, no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # a run's outcome, not a bug: the message says what to do
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # What the file system refused (a read-only or full disk, a file where a directory is wanted,
        # a name too long): one line naming the path. Any other OSError is a bug's, with its traceback.
        if e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = "" if e.filename is None else f"{e.filename}: "
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return int(result or 0)


@contextlib.contextmanager
def _sigterm_unwinds(command: str) -> Iterator[None]:
    """Inside, SIGTERM (`kill`, `timeout`, a container's or systemd's stop) raises `Terminated`. By
    default it ends Python where it stands, no `finally` run: an export cut short left its whole
    `.NAME.gguf.tmp` beside the output, and a command ended without a word. A SIGTERM ignored before
    (or handled outside Python) stays so; the handler before comes back on leaving. A second SIGTERM
    ends the process at once, as it did before: the unwinding may wait for threads the first cannot
    stop (an executor's workers, a Hub download's), and each SIGTERM only unwound it again."""
    import threading

    if (
        command in OWN_SIGTERM
        or threading.current_thread() is not threading.main_thread()  # (handlers cannot be set there)
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_command(argv: list[str] | None, args: argparse.Namespace) -> str:
    """The command line that was run, with --resume where the command has it and it was left out (a
    speedrun resumes by running it again)."""
    from nanoseek.options import shell_quoted

    words = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "resume", None) is False:
        words.append("--resume")
    # a rank of torchrun's (which sets TORCHELASTIC_RUN_ID) does not see torchrun's own options
    launcher = "torchrun <its options> -m nanoseek" if "TORCHELASTIC_RUN_ID" in os.environ else "nanoseek"
    return " ".join([launcher, *map(shell_quoted, words)])


if __name__ == "__main__":
    sys.exit(main())
