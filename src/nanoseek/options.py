"""Command-line flags generated from the stages' config dataclasses.

A field's default, choices and help are written once, on the field (`option(...)`); `add_options`
turns the fields into argparse flags and `from_options` builds the config back from the parsed
namespace. Our own few dozen lines instead of tyro or simple-parsing: argparse's help layout and
flag names stay as users know them, bool fields keep their `--no-x` spelling, and no dependency
is pulled into `nanoseek --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import numbers
import os
import re
import shlex
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a config dataclass, whose fields are the flags


def close_one(word: str, known: Iterable[str]) -> str | None:
    """The one of `known` the misspelt `word` stands for (`GPU` is `gpu`; the one it begins, as a flag's
    abbreviation, `temp` of `temperature`; else the closest; else the one sharing its longest word of four
    letters or more, `lr-warmup` of `warmup-steps`, where one does), or None where none is close."""
    by_case = {k.lower(): k for k in known}
    begun = [k for k in by_case if k.startswith(word.lower())]
    close = begun if len(begun) == 1 else difflib.get_close_matches(word.lower(), by_case, n=1)
    if close:
        return by_case[close[0]]
    # words in another order or with another neighbour are far apart by spelling (`--lr-warmup` is 0.57 of
    # `--warmup-steps`, under difflib's cutoff)
    words = set(re.split(r"[-_]", word.lower()))
    shared = {k: max((len(w) for w in words & set(re.split(r"[-_]", k))), default=0) for k in by_case}
    best = max(shared.values(), default=0)
    winners = [k for k, n in shared.items() if n == best]
    return by_case[winners[0]] if best >= 4 and len(winners) == 1 else None


def path(text: str) -> str:
    """The `type` (argparse) or `parse` (`option`) of every flag that names a file or directory: a
    leading `~` is the home directory, as the shell would make it. The shell leaves `--out=~/run` and
    a quoted '~/run' as typed, and Python's file functions then take `~` for a directory of that name."""
    return os.path.expanduser(text)


def torch_seed(text: str) -> int:
    """The `type` (argparse) or `parse` (`option`) of a training command's --seed: an integer torch's
    generators take (one 64-bit word; a negative one as its two's complement, as torch reads it). A seed
    outside it was refused only by `torch.manual_seed`, as "Overflow when unpacking long long", once a
    tokenizer was trained or a checkpoint downloaded."""
    try:
        value = int(text)
    except ValueError:  # as argparse says it for `type=int` (not "invalid torch_seed value")
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [-2**63, 2**64) (torch's 64-bit seeds), got {text}"
        )
    return value


def thread_count(text: str) -> int:
    """The `type` (argparse) of a benchmark's --threads: torch refuses 0 and below only when the
    benchmark sets them, with a traceback after its model is built."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def shell_quoted(value: str | os.PathLike) -> str:
    """`value` as one argument of a command printed for the user to paste: a path with spaces or quotes
    quoted for their shell (POSIX sh; cmd.exe's rules on Windows), a plain one as it is."""
    return subprocess.list2cmdline([str(value)]) if sys.platform == "win32" else shlex.quote(str(value))


class Extend(argparse.Action):
    """The action of a flag that takes a list (several values, `nargs="+"`, or a comma-separated list):
    the flag given again adds to what it gave before, and the default gives way to the first. argparse's
    "store" kept only the last: `--data a.jsonl --data b.jsonl` trained on b's data alone and `--task a
    --task b` ran b alone, the first dropped without a word."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        given = getattr(namespace, self.dest, None)
        if given is None or given is self.default:
            setattr(namespace, self.dest, values)
        elif isinstance(given, str):  # a comma-separated list, as one flag would have given it
            setattr(namespace, self.dest, f"{given},{values}")
        else:
            setattr(namespace, self.dest, [*given, *values])


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    choices: Iterable[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    nargs: str | None = None,
    group: str | None = None,
    positional: bool = False,
    factory: Callable[[], Any] | None = None,
    cli: bool = True,
    listed: bool = False,
) -> Any:
    """A dataclass field that knows its flag.

    flag: the long flag when it differs from the field name (bool fields default to `--name` when
    False, `--no-name` when True; the flag always flips the default). parse: converts the flag's
    string (e.g. a comma-separated task list). cli=False keeps the field out of the command line.
    listed: a text field that is a comma-separated list (a list-typed field is one already): the flag
    given again adds to it (`Extend`).
    """
    meta = {
        "help": help,
        "flag": flag,
        "short": short,
        "choices": tuple(choices) if choices is not None else None,
        "parse": parse,
        "nargs": nargs,
        "group": group,
        "positional": positional,
        "cli": cli,
        "listed": listed,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _scalar_type(annotation: Any) -> Any:
    """int | None -> int; str | list[str] | None -> str; list[str] -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0]
    return annotation


def _takes_list(annotation: Any) -> bool:
    """list[str], str | list[str] | None: a field several values may be given for."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_takes_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is list


def _long_flag(name: str, meta: Any, kind: Any, default: Any) -> str:
    """The flag `add_options` gives a field: its own, else its name (a bool's flips its default)."""
    if meta.get("flag"):
        return meta["flag"]
    if kind is bool:
        return ("--no-" if default else "--") + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def describe_change(cls: type | None, name: str, old: Any, new: Any) -> str:
    """A changed setting of the config `cls` in the words of its command line: the field's flag and
    its values (a bool's flag as given or left out), or the field's bare name where it has no flag."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
    if field is None or not field.metadata.get("cli", True) or field.metadata.get("positional"):
        return f"{name}: {old!r} -> {new!r}"
    kind = _scalar_type(typing.get_type_hints(cls)[name])
    flag = _long_flag(name, field.metadata, kind, field.default)
    if kind is bool:
        given = {True: "given", False: "left out"}
        return f"{flag}: {given[old != field.default]} -> {given[new != field.default]}"
    return f"{flag}: {old!r} -> {new!r}"


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field of the dataclass `cls` (those with cli=True and not in `skip`), on `parser` or
    one of its argument groups.

    A field whose name already has a flag on `parser` (added for an earlier config) shares it.
    `defaults` overrides a field's default for this command only.
    """
    hints = typing.get_type_hints(cls)
    skip = set(skip)
    defaults = defaults or {}
    taken = {a.dest for a in parser._actions}
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or f.name in taken or not meta.get("cli", True):
            continue
        if not f.init:
            continue
        target = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in defaults:
            default, required = defaults[f.name], False
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None if required else f.default
        kind = _scalar_type(hints[f.name])
        help_text = meta.get("help") or ""
        if kind is not bool and default is not None and "%(default)" not in help_text:
            help_text = f"{help_text} (default: %(default)s)".strip()
        kwargs: dict[str, Any] = {"help": help_text or None}
        flag = _long_flag(f.name, meta, kind, default)
        if kind is bool:
            kwargs.update(action="store_false" if default else "store_true", default=bool(default))
        else:
            kwargs.update(default=default, type=meta.get("parse") or kind)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
                if isinstance(default, str):  # a list flag's default is a list, as its parsed values are
                    kwargs["default"] = [default]
            if (meta.get("listed") or _takes_list(hints[f.name])) and not meta.get("positional"):
                kwargs["action"] = Extend
        if meta.get("positional"):
            target.add_argument(f.name, **{k: v for k, v in kwargs.items() if k != "default"})
            continue
        names = [flag] + ([meta["short"]] if meta.get("short") else [])
        if required:
            kwargs["required"] = True
        target.add_argument(*names, dest=f.name, **kwargs)


def from_options(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """The config `cls` from the parsed flags; `given` wins over them (derived or shared values)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.init and f.name not in given and hasattr(args, f.name)
    }
    return cls(**values, **given)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether `value` is of the field type `annotation` as a flag would have parsed it: an int for
    int (numpy's too), a number for float, a str or a path for str, a list or tuple for list[...]."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) in (list, tuple):
        (kind, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list | tuple) and all(_fits(v, kind) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return hasattr(value, "__index__") and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str | os.PathLike)
    return True  # dicts, nested configs, Any: the stage's own checks


def check_choices(config: Any) -> None:
    """Raise a clear error for a field of the wrong type or set outside its choices (configs built in
    Python skip argparse: steps="2" failed a comparison with a bare TypeError, steps=2.5 or a tasks
    string read as a list of one-letter names ran on)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.init and not _fits(value, hints[f.name]):
            flag = _long_flag(f.name, f.metadata, None, None)
            kind = getattr(hints[f.name], "__name__", None) if isinstance(hints[f.name], type) else None
            kind = kind or str(hints[f.name]).replace("typing.", "")
            raise ValueError(f"{flag} must be of type {kind}, got {value!r:.80} ({type(value).__name__})")
        number = hasattr(value, "__index__") or isinstance(value, numbers.Real)
        if f.init and number and type(value) not in (bool, int, float):
            # numpy's numbers (a sweep's np.arange, np.float32) as Python's: let through as they were, the run
            # trained its steps and failed saving them (its settings' JSON, the optimizer's state take no other)
            setattr(config, f.name, int(value) if hasattr(value, "__index__") else float(value))
    for f in dataclasses.fields(config):
        allowed = f.metadata.get("choices")
        value = getattr(config, f.name)
        if allowed and value not in allowed:
            flag = _long_flag(f.name, f.metadata, None, None)
            raise ValueError(f"{flag} {value!r} is not one of {', '.join(map(str, allowed))}")


def defer(parser: argparse.ArgumentParser, fill: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add a command's generated flags only when that command is parsed: its config's module, and
    torch with it, then load only for it, so `nanoseek --help` stays fast. The parser completes itself
    on its first parse (argparse parses a subcommand with its own `parse_known_args`)."""
    pending = parser.__dict__.setdefault("_deferred_options", [])
    pending.append(fill)
    if len(pending) > 1:
        return
    parse = parser.parse_known_args

    def parse_known_args(*args: Any, **kwargs: Any) -> Any:
        complete(parser)
        return parse(*args, **kwargs)

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def complete(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Run the fills `defer` recorded for this parser (once)."""
    for fill in parser.__dict__.pop("_deferred_options", []):
        fill(parser)
    return parser


def _load(spec: str) -> Any:
    """ "package.module:name" -> that object (imported now, not when the CLI is built)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def config_command(
    sub: argparse._SubParsersAction,
    name: str,
    config: str,
    run: str | Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of `config` ("module:Class", imported only when the
    command is parsed, see `defer`). `run`: "module:function", called with the config built from the
    flags, or a function of the parsed namespace that returns the exit code."""
    p = sub.add_parser(name, help=help, description=description)
    defer(p, lambda parser: add_options(parser, _load(config)))
    if isinstance(run, str):
        entry = run

        def run(args: argparse.Namespace) -> int:
            _load(entry)(from_options(_load(config), args))
            return 0

    p.set_defaults(func=run)
    return p
