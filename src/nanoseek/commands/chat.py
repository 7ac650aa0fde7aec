"""`nanoseek chat DIR`: an interactive terminal chat that streams, with the reasoning shown dimmed.

- The R1 template opens the assistant turn with "<think>\\n", so a reply starts inside its reasoning;
  everything up to "</think>" is printed dimmed, the answer after it in normal text.
- History is kept as chat messages; the template drops past reasoning (R1 does), and the engine's
  prefix cache reuses the latents of the unchanged history, so later turns do not re-read it.
- Commands: /reset (clear history), /system TEXT (set the system prompt and reset), /exit (or Ctrl-D).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, TextIO

from nanoseek.commands.generate import add_generation_flags, load_for_generation, sampling_params

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "commands: /reset  /system TEXT  /exit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat with a checkpoint in the terminal")
    p.add_argument("dir", help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-color", action="store_true", help="no ANSI dimming of the <think> part")
    add_generation_flags(p, max_new_tokens=1024, temperature=0.6)
    p.set_defaults(func=run)


class ThinkSplitter:
    """Routes streamed text to 'think' or 'answer', holding back a possible partial '</think>'."""

    def __init__(self, end_tag: str, in_think: bool) -> None:
        self.end_tag = end_tag
        self.in_think = in_think
        self.pending = ""
        self.think = ""
        self.answer = ""

    def push(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if not self.in_think:
            self.answer += text
            return [("answer", text)] if text else []
        buf = self.pending + text
        i = buf.find(self.end_tag)
        if i >= 0:
            self.in_think = False
            self.pending = ""
            out.append(("think", buf[:i]))
            self.think += buf[:i]
            rest = buf[i + len(self.end_tag) :].lstrip("\n")
            self.answer += rest
            out.append(("end_think", ""))
            if rest:
                out.append(("answer", rest))
            return out
        # Keep the longest tail that could still be the start of the end tag.
        keep = 0
        for k in range(min(len(self.end_tag) - 1, len(buf)), 0, -1):
            if self.end_tag.startswith(buf[-k:]):
                keep = k
                break
        emit, self.pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.think += emit
        return [("think", emit)] if emit else []

    def flush(self) -> list[tuple[str, str]]:
        rest, self.pending = self.pending, ""
        if not rest:
            return []
        if self.in_think:
            self.think += rest
            return [("think", rest)]
        self.answer += rest
        return [("answer", rest)]


def chat_turn(
    engine: Any, tok: Any, messages: list[dict], params: Any, out: TextIO, color: bool
) -> tuple[str, int]:
    """Stream one assistant reply to `out`; returns (the reply as stored in history, tokens generated)."""
    from nanoseek.tokenizer import IncrementalDecoder

    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt_text)
    splitter = ThinkSplitter(tok.think_end, in_think=prompt_text.rstrip().endswith(tok.think_start))
    decoder = IncrementalDecoder(tok, skip_special_tokens=True)
    dim, reset = (DIM, RESET) if color else ("", "")
    n = 0

    def show(parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            if kind == "think":
                out.write(f"{dim}{text}{reset}")
            elif kind == "end_think":
                out.write("\n\n")
            else:
                out.write(text)
        out.flush()

    for ev in engine.stream([ids], params):
        n += len(ev.new_token_ids)
        show(splitter.push(decoder.push(ev.new_token_ids)))
    show(splitter.push(decoder.flush()) + splitter.flush())
    out.write("\n")
    reply = f"{tok.think_start}\n{splitter.think.strip()}\n{tok.think_end}\n\n{splitter.answer.strip()}"
    return reply, n


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    params = sampling_params(args)  # bad flags fail before the model loads
    engine, tok, model = load_for_generation(args)
    stops = [tok.eos_token_id]
    user_id = tok.token_to_id("<｜User｜>")
    if user_id is not None:
        stops.append(user_id)  # a model that starts the next user turn has finished its own
    params = dataclasses.replace(params, stop_token_ids=stops)
    color = not args.no_color and out.isatty()
    system = args.system
    messages: list[dict] = []

    def reset() -> None:
        messages.clear()
        if system:
            messages.append({"role": "system", "content": system})

    reset()
    out.write(
        f"nanoseek chat: {args.dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params). {HELP}\n"
    )
    turns = tokens = 0
    seconds = 0.0
    while True:
        out.write("\n> ")
        out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            reset()
            out.write("(history cleared)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system") :].strip() or None
            reset()
            out.write(f"(system prompt {'set' if system else 'cleared'}; history cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]!r}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        t0 = time.perf_counter()
        try:
            reply, n = chat_turn(engine, tok, messages, params, out, color)
        except ValueError as e:  # prompt longer than the context: start over rather than crash
            messages.pop()
            out.write(f"(cannot continue this conversation: {e}; use /reset)\n")
            continue
        seconds += time.perf_counter() - t0
        tokens += n
        turns += 1
        messages.append({"role": "assistant", "content": reply})
    out.write(f"\nnanoseek chat: {turns} turns, {tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tok/s\n")
    return 0
