"""`nanoseek chat DIR`: an interactive terminal chat that streams, with the reasoning shown dimmed.

- The R1 template opens the assistant turn with "<think>\\n", so a reply starts inside its reasoning;
  everything up to "</think>" is printed dimmed, the answer after it in normal text. `--no-think` is
  DeepSeek-V3.1's non-thinking mode: the prompt closes the think block and the reply is all answer.
- History is kept as chat messages; the template drops past reasoning (R1 does), and the engine's
  prefix cache reuses the latents of the unchanged history, so later turns do not re-read it.
- A conversation that outgrows the context goes on, as ollama's and llama.cpp's chats do: the oldest
  whole user/assistant exchanges are dropped from what the model sees (never the system prompt, never
  the new message), and a dim line says how many (that turn re-reads the rest: its prefix changed).
  Room is kept for the answer: --max-new-tokens of it, at most half the context (a cap the context
  cannot hold would leave no room for any history).
- Commands: /reset (clear history), /system TEXT (set the system prompt and reset), /help, /exit (or Ctrl-D).
- One line is one message, or the lines between triple quotes (ollama's multi-line input: their text
  is never a command, "// ..." code included). On a terminal lines are read with readline (editing,
  history, no cap at the terminal's 4095 characters); bytes that are not UTF-8 are read as U+FFFD.
- Ctrl-C while a reply streams stops that reply after the current token and keeps the session (the partial
  reply stays in history); a second Ctrl-C, or one at the prompt, ends the program as before.
- With stdout redirected (`nanoseek chat CK < questions > answers`) it gets the replies alone; the banner,
  prompts, notes and summary go to stderr (as `generate` and `ollama run` keep stdout for the text).
- A tokenizer without a chat template (another family's base model) is refused: `generate` continues text.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from nanoseek.accounting import counted
from nanoseek.commands.generate import (
    add_generation_flags,
    colors_refused,
    load_for_generation,
    sampling_params,
    without_bom,
)

if TYPE_CHECKING:
    from nanoseek.engine.sampling import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "commands: /reset  /system TEXT  /help  /exit"


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import path

    p = sub.add_parser(
        "chat",
        help="interactive chat with a checkpoint in the terminal",
        description="Chat with a checkpoint in the terminal, the reasoning dimmed. In the chat: "
        "/reset, /system TEXT, /help, /exit (or Ctrl-D); lines between triple quotes are one message. A conversation "
        "past the model's context drops its oldest exchanges and goes on. Ctrl-C stops a reply; a second "
        "one, or one at the prompt, ends the chat.",
    )
    p.add_argument(
        "dir",
        type=path,
        help="checkpoint directory (config.json, model.safetensors, tokenizer.json) or Hub name (owner/name)",
    )
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--no-color",
        action="store_true",
        help="no ANSI dimming of the <think> part (also NO_COLOR=1, TERM=dumb)",
    )
    p.add_argument(
        "--no-think",
        dest="think",
        action="store_false",
        help="non-thinking mode (DeepSeek-V3.1): the prompt ends with </think>, the reply is only the answer",
    )
    add_generation_flags(p, max_new_tokens=1024, temperature=0.6)
    p.set_defaults(func=run)


class ContextFull(ValueError):
    """The new message (with the system prompt) leaves no room in the model's context, even with
    the rest of the history dropped."""


def fit_context(
    tok: Any, messages: list[dict], max_seq_len: int, max_new_tokens: int, thinking: bool = True
) -> tuple[str, list[int], int]:
    """(prompt text, its ids, exchanges dropped) for `messages`, the history ending with the new user
    message, in a context of `max_seq_len` tokens. Where the prompt and room for the answer (max_new_tokens,
    at most half the context) would not fit, the oldest whole user/assistant exchanges are deleted from
    `messages` until they do, or until only the system prompt and the new message are left. ContextFull,
    with nothing deleted, where even those leave no room for one token."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    room = min(max_new_tokens, max_seq_len // 2)

    def render(start: int) -> tuple[str, list[int]]:
        text = tok.apply_chat_template(
            messages[:first] + messages[start:], add_generation_prompt=True, tokenize=False, thinking=thinking
        )
        return text, tok.encode(text)

    start = first
    text, ids = render(start)
    while len(ids) + room > max_seq_len and start + 2 < len(messages):  # keep the new message
        start += 2  # an exchange: a user message and the reply to it
        text, ids = render(start)
    if len(ids) >= max_seq_len:  # the engine needs room for one token
        alone = "the message" + (" and the system prompt" if first else "")
        raise ContextFull(
            f"{alone} {'are' if first else 'is'} {len(ids)} tokens; the context holds {max_seq_len}"
        )
    del messages[first:start]
    return text, ids, (start - first) // 2


def chat_turn(
    engine: Any,
    tok: Any,
    messages: list[dict],
    params: SamplingParams,
    out: TextIO,
    color: bool,
    thinking: bool = True,
    stop: Callable[[], bool] | None = None,
    notes: TextIO | None = None,
) -> tuple[str, int]:
    """Stream one assistant reply to `out`; returns (the reply as stored in history, tokens generated).
    `messages` loses its oldest exchanges where the context needs the room (`fit_context`, said on `notes`,
    by default `out`). `stop()` is asked after each step: true ends the reply there (the engine request is
    aborted)."""
    from nanoseek.serve.textstream import ReasoningSplitter
    from nanoseek.tokenizer import IncrementalDecoder

    dim, reset = (DIM, RESET) if color else ("", "")
    prompt_text, ids, dropped = fit_context(
        tok, messages, engine.max_seq_len, params.max_new_tokens, thinking
    )
    if dropped:
        (notes or out).write(
            f"{dim}(context full: {counted(dropped, 'earlier turn')} dropped from the model's view){reset}\n"
        )
    opened = thinking and prompt_text.rstrip().endswith(tok.think_start)
    # Non-thinking: no split at all, so a stray "<think>" is shown as the answer it is (as the server does).
    splitter = ReasoningSplitter(started_in_think=opened) if thinking else None
    decoder = IncrementalDecoder(tok, skip_special_tokens=True)
    think: list[str] = []
    answer: list[str] = []
    n = 0

    # Without colour (piped, --no-color) the reasoning is marked by the template's own tags instead.
    opening, closing = ("", "") if color else (f"{tok.think_start}\n", f"\n{tok.think_end}")

    def show(reasoning: str, content: str) -> None:
        if reasoning:
            out.write(f"{dim}{'' if think else opening}{reasoning}{reset}")
            think.append(reasoning)
        if content:
            if think and not answer:
                out.write(f"{closing}\n\n")  # the think block has closed: set the answer apart
            out.write(content)
            answer.append(content)
        out.flush()

    def split(text: str) -> tuple[str, str]:
        return splitter.push(text) if splitter is not None else ("", text)

    # A stop token ends the reply but is not part of it: `<｜User｜>` is not special, so the decoder
    # would show it and history would keep it.
    stop_ids = set(params.stop_token_ids)
    events = engine.stream(
        [ids], params, should_stop=stop
    )  # (also asked between the steps of a long prefill)
    try:
        for ev in events:
            n += len(ev.new_token_ids)
            show(*split(decoder.push([t for t in ev.new_token_ids if t not in stop_ids])))
            if stop is not None and stop():
                break
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # the engine's generator aborts what is still running
    # a reply cut inside a character (max tokens, Ctrl-C) ends before it, as the server's and vLLM's:
    # no U+FFFD printed, nor kept in the history the next turn is rendered from
    show(*split(decoder.flush(drop_partial=True)))
    if splitter is not None:
        show(*splitter.flush())
    if think and not answer:
        out.write(closing)  # the reply ended in its reasoning (length, Ctrl-C): still close the block
    out.write("\n")
    out.flush()  # before the notes and the next prompt, which may go to another stream (stderr)
    reply = "".join(answer).strip()
    if think or opened:  # a template without think blocks (ChatML) must not get an empty one in history
        reply = f"{tok.think_start}\n{''.join(think).strip()}\n{tok.think_end}\n\n{reply}"
    return reply, n


@contextlib.contextmanager
def _ctrl_c_stops_reply() -> Iterator[Callable[[], bool]]:
    """While a reply streams, the first Ctrl-C only asks it to stop (checked between engine steps, so no
    step is cut in half); a second one raises KeyboardInterrupt as usual. Off the main thread (where
    signal handlers cannot be set) nothing changes."""
    hit: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        if hit:
            raise KeyboardInterrupt
        hit.append(True)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_line(stdin: TextIO, out: TextIO, terminal: bool, prompt: str = "\n> ") -> str | None:
    """The next line the user typed (without its newline), or None at the end of input (Ctrl-D, the
    pipe's end)."""
    if terminal:
        out.write(prompt[:-2])
        try:
            return input(prompt[-2:])  # through readline where it is imported (see `run`)
        except EOFError:
            return None
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    # each line's: files piped in one after another (`cat a.txt b.txt |`) carry a mark each
    return without_bom(line).removesuffix("\n") if line else None


def _read_message(stdin: TextIO, out: TextIO, terminal: bool) -> tuple[str, bool] | None:
    """The next message: a line, or the lines from one opening with triple quotes to one closing with
    them (ollama's multi-line input: pasted code, a table); the end of input closes an open block. With
    it, whether it was such a block: its text is all message, never a command (as ollama sends it)."""
    line = _read_line(stdin, out, terminal)
    if line is None or not line.lstrip().startswith('"""'):
        return None if line is None else (line, False)
    lines = [line.lstrip()[3:]]
    while not lines[-1].rstrip().endswith('"""'):
        more = _read_line(stdin, out, terminal, prompt=". ")
        if more is None:
            break
        lines.append(more)
    return "\n".join(lines).rstrip().removesuffix('"""'), True


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from nanoseek.perf import torch_threads

    with torch_threads(args.threads):  # as `generate` (and every other command) sets --threads
        return _chat(args, stdin, stdout)


def _chat(args: argparse.Namespace, stdin: TextIO | None, stdout: TextIO | None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    if isinstance(stdin, io.TextIOWrapper):
        # A byte that is not UTF-8 (a Latin-1 terminal, a binary file) ended the session with an error:
        # read it as U+FFFD, as ollama's client does (Go's JSON encoding replaces it).
        stdin.reconfigure(errors="replace")
    # On a terminal, readline reads the line (as ollama and llama-cli read it in raw mode): the terminal's
    # own line editing drops what is typed or pasted past 4095 characters, and types arrow keys as text.
    terminal = stdin is sys.stdin and out is sys.stdout and stdin.isatty() and out.isatty()
    if terminal:
        with contextlib.suppress(ImportError):  # no readline (Windows): input() reads the plain line
            import readline  # noqa: F401  (once imported, input() edits lines with it)
    from nanoseek.accounting import count_parameters
    from nanoseek.tokenizer import USER

    sampling_params(args)  # bad flags fail before the model loads
    engine, tok, model = load_for_generation(args, chat=True)  # (a template it can chat in, or refused)
    params = sampling_params(args, tok.generation_config)  # with the checkpoint's sampling defaults
    stops = list(tok.stop_token_ids)
    user_id = tok.token_to_id(USER)
    if user_id is not None:
        stops.append(user_id)  # a model that starts the next user turn has finished its own
    params = dataclasses.replace(params, stop_token_ids=stops)
    color = not args.no_color and out.isatty() and not colors_refused()
    # stdout redirected (`nanoseek chat CK < questions > answers`): it gets the replies alone, as `ollama run`
    # and `generate` write them, and the banner, prompts, notes and summary go to stderr. A caller that
    # passes its own `stdout` gets the whole transcript there.
    ui = out if stdout is not None or out.isatty() else sys.stderr
    system = args.system
    messages: list[dict] = []

    def reset() -> None:
        messages.clear()
        if system:
            messages.append({"role": "system", "content": system})

    reset()
    ui.write(
        f"nanoseek chat: {args.dir} ({count_parameters(model.config).described}, "
        f"{str(model.dtype).removeprefix('torch.')}). {HELP}\n"
    )
    turns = tokens = 0
    seconds = 0.0
    while True:
        read = _read_message(stdin, ui, terminal)
        if read is None:
            break
        line, quoted = read
        line = line.strip()
        if not line:
            continue
        # pasted code between triple quotes may open with "//" or a path: a message, not a command
        if line.startswith("/") and not quoted:
            command, *rest = line.split(maxsplit=1)
            # the word, as ollama reads it: "/exit now" said "unknown command '/exit'"
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                reset()
                ui.write("(history cleared)\n")
                continue
            if command == "/system":  # the word itself: "/systemd ..." is not a new system prompt
                system = rest[0] if rest else None
                reset()
                ui.write(f"(system prompt {'set' if system else 'cleared'}; history cleared)\n")
                continue
            if command in ("/help", "/?"):  # ollama's two
                ui.write(f"{HELP}\n")
                continue
            ui.write(f"unknown command {command!r}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        t0 = time.perf_counter()
        with _ctrl_c_stops_reply() as stopped:
            try:
                reply, n = chat_turn(
                    engine, tok, messages, params, out, color, thinking=args.think, stop=stopped, notes=ui
                )
            except ContextFull as e:  # the message is not kept (the history is): the session goes on
                messages.pop()
                # without the history it still does not fit: /reset would not help
                ui.write(f"({e}: try a shorter message)\n")
                continue
        if stopped():
            ui.write("(stopped)\n")
        seconds += time.perf_counter() - t0
        tokens += n
        turns += 1
        messages.append({"role": "assistant", "content": reply})
    ui.write(
        f"\nnanoseek chat: {counted(turns, 'turn')}, {counted(tokens, 'token')}, "
        f"{tokens / max(seconds, 1e-9):.1f} tok/s\n"
    )
    return 0
