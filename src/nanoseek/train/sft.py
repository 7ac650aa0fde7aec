"""Supervised fine-tuning on chat data: R1's cold start, and the second half of distillation.

What is notable here:
- Each assistant turn becomes one example rendered exactly as the model will see it at inference:
  the chat template with `add_generation_prompt=True` up to that turn (so earlier assistant turns have
  their reasoning removed, as R1's template does), then the turn's own text + EOS. Loss is on those
  assistant tokens only: the model is never trained to produce the user's words or the template.
- A checkpoint with another family's template (ChatML, Llama 3) is trained on each assistant turn as
  that template renders it, through its end token; R1's shape is only built where it drops the turn's
  text or reasoning.
- The generation prompt of R1's template already opens "<think>\\n", so an assistant message's leading
  "<think>" is not repeated, and content with "</think>" but no "<think>" (R1's raw output after that
  prompt) is reasoning up to "</think>"; a `reasoning_content` field (or `reasoning`, as vLLM and
  OpenRouter name it) is put back inside the think block (once where the content repeats it). A reply
  that opens "<think>" and never closes it (cut off at its token limit) is refused.
- Tool use (DeepSeek-V3.1's format, the same template the server renders; V3's and R1's fenced calls where
  the checkpoint's own template writes those): a line may carry OpenAI
  `tools`, assistant messages `tool_calls` (trained on, after the message's text) and `role: "tool"`
  results (prompt only). The turn after a tool result continues the assistant's answer, so it gets no
  think block of its own unless the data gives one.
- Packing: examples are packed into fixed rows; positions restart at each example and attention is
  block-diagonal causal, so packed examples never see each other (no cross-contamination).
"""

from __future__ import annotations

import array
import functools
import gzip
import json
import math
import os
import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from nanoseek.accounting import counted, human
from nanoseek.model.attention import document_causal_mask
from nanoseek.options import check_choices, option, path, torch_seed
from nanoseek.tokenizer import (
    THINK_END,
    THINK_START,
    call_arguments_ok,
    content_text,
    openai_message,
    render_tool_calls,
    writes_fenced_tool_calls,
)

if TYPE_CHECKING:
    from nanoseek.model.transformer import DeepSeekV3

IGNORE = -100


# -------------------------------------------------------------------------------- rendering
def assistant_target_text(
    message: dict[str, Any],
    prompt_opened_think: bool,
    think_start: str = THINK_START,
    think_end: str = THINK_END,
    after_tool: bool = False,
    message_index: int = 0,
    fenced_calls: bool = False,
) -> str:
    """The text the model must produce for one assistant message (the conversation's `message_index`,
    for errors), after the generation prompt (or after a tool result, `after_tool`), tool calls included
    (in DeepSeek-V3's and R1's markup with `fenced_calls`, as their templates write history)."""
    message = _reasoning_once(message, think_start, think_end, message_index)
    content = content_text(message.get("content"))
    if not content.strip() and not message.get("tool_calls") and not message.get("reasoning_content"):
        raise ValueError(
            f"chat message {message_index} (assistant) has no content, reasoning_content or tool_calls to "
            'train on (with "weight": 0 it is history only)'
        )
    reasoning = message.get("reasoning_content")
    if not reasoning and content.lstrip().startswith(think_start) and think_end not in content:
        # a reply cut off inside its reasoning (a generation that hit its token limit) taught the model
        # to end its turn with the think block still open
        raise ValueError(
            f"chat message {message_index} (assistant) opens {think_start} and never closes it with "
            f"{think_end} (a reply cut off at its token limit?)"
        )
    if reasoning:
        body = f"{think_start}\n{str(reasoning).strip()}\n{think_end}\n{content.lstrip()}"
    elif after_tool and think_end not in content:
        body = content  # the answer goes on after the tool's result (V3.1): no think block is invented
    elif content.lstrip().startswith(think_start):
        body = content.lstrip()
    elif think_end in content:
        # R1's raw output after its prompt opened the block: "reasoning</think>answer" (as the template
        # reads history: everything before </think> is reasoning), not an answer that holds a think block;
        # after a tool's result too, where it was trained as is and served as content, "</think>" and all
        body = f"{think_start}\n{content}"
    else:
        # no reasoning given: an empty think block, the shape R1 uses for non-reasoning data
        body = f"{think_start}\n\n{think_end}\n{content}"
    if prompt_opened_think:
        body = body[len(think_start) :].lstrip(" ")
        body = body[1:] if body.startswith("\n") else body
    if message.get("tool_calls"):
        _check_call_arguments(message["tool_calls"], message_index)
        body += render_tool_calls(message["tool_calls"], message_index, fenced=fenced_calls)
    return body


def _check_call_arguments(calls: Any, message_index: int) -> None:
    """Refuse a tool call whose arguments text is not one JSON object (`"{city: Paris"`): trained on,
    the model learns to write calls that the server (`parse_tool_calls`) and OpenAI's clients read as
    plain text, never as a call."""

    for j, call in enumerate(calls if isinstance(calls, list | tuple) else ()):
        f = call.get("function") if isinstance(call, dict) else None
        args = f.get("arguments") if isinstance(f, dict) else None
        if args is None or isinstance(args, dict):  # (none: "{}"; an object: written as its JSON)
            continue
        if not (isinstance(args, str) and call_arguments_ok(args)):
            raise ValueError(
                f"chat message {message_index}: tool_calls[{j}].function.arguments is not one JSON object "
                f"({str(args)[:40]!r}): the server reads such a call as plain text"
            )


def _reasoning_once(
    message: dict[str, Any], think_start: str, think_end: str, message_index: int = 0
) -> dict[str, Any]:
    """`message` with its reasoning once: content that repeats its `reasoning_content` before a
    `</think>` (an export that wrote it back) keeps only the answer after it, without its leading
    newlines, as R1's template reads history; it trained two think blocks in a row. Reasoning there
    that differs is refused."""
    content = content_text(message.get("content"))
    reasoning = message.get("reasoning_content")
    if not reasoning or think_end not in content:
        return message
    inline, _, answer = content.rpartition(think_end)
    inline = inline.strip()
    inline = inline[len(think_start) :].strip() if inline.startswith(think_start) else inline
    if inline != str(reasoning).strip():
        raise ValueError(
            f"chat message {message_index} (assistant) has reasoning_content and other reasoning before "
            f"{think_end} in its content: give its reasoning once"
        )
    return {**message, "content": answer.lstrip("\n")}


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
) -> list[tuple[list[int], list[int]]]:
    """One (input_ids, labels) example per assistant turn; labels are IGNORE outside that turn. An
    assistant message with `"weight": 0` (OpenAI's fine-tuning format) is history only, no example."""
    if not messages:
        raise ValueError("conversation has no messages")
    read = []
    # each error names its message: a chat of dozens of messages was named by its line alone
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"chat message {i}: each message needs a 'role' (and 'content'), got {m!r}")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"chat message {i}: unknown role {m['role']!r}")
        if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
            raise ValueError(
                f"chat message {i}: an assistant message's 'weight' must be 0 or 1, got {m['weight']!r}"
            )
        try:
            read.append(openai_message(m))  # as serve reads a request's
        except ValueError as e:
            raise ValueError(f"chat message {i} ({m['role']}): {e}") from None
    messages = read
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise ValueError("conversation has no assistant message to train on")
    think_start = getattr(tokenizer, "think_start", THINK_START)
    think_end = getattr(tokenizer, "think_end", THINK_END)
    kw = {"tools": list(tools)} if tools else {}  # only then, so any apply_chat_template will do
    # history as `serve` passes it to the template: without reasoning_content (a template that renders
    # it, such as Qwen3's, would otherwise train on prompts the server never shows the model)
    history = [
        {k: v for k, v in msg.items() if k not in ("reasoning_content", "reasoning")} for msg in messages
    ]
    # calls in the markup the template shows in history (and the server parses and forces): a template that
    # writes DeepSeek-V3's (R1-Distill's) was trained on V3.1's here, one model taught two markups
    fenced = writes_fenced_tool_calls(getattr(tokenizer, "chat_template", None))
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("weight", 1):  # OpenAI's weight 0: history only
            continue
        prompt_text = tokenizer.apply_chat_template(
            history[:i], add_generation_prompt=True, tokenize=False, **kw
        )
        prompt_ids = list(
            tokenizer.apply_chat_template(history[:i], add_generation_prompt=True, tokenize=True, **kw)
        )
        opened = prompt_text.rstrip(" \n").endswith(think_start)
        after_tool = i > 0 and messages[i - 1]["role"] == "tool"
        m = _reasoning_once(m, think_start, think_end, i)  # for the template's rendering too
        r1_text = assistant_target_text(m, opened, think_start, think_end, after_tool, i, fenced)
        turn = _template_turn(tokenizer, [*history[:i], m], prompt_text, kw)
        if turn is None:
            target = tokenizer.encode(r1_text) + [tokenizer.eos_token_id]
        else:
            target = _through_first_stop(tokenizer, tokenizer.encode(turn))
        out.append((prompt_ids + target, [IGNORE] * len(prompt_ids) + target))
    return out


def _template_turn(
    tokenizer: Any, messages: Sequence[dict[str, Any]], prompt_text: str, kw: dict[str, Any]
) -> str | None:
    """The last (assistant) message as the chat template itself renders it after `prompt_text`, or None
    where that rendering cannot be the target: it does not continue the prompt (R1's generation prompt
    opens a think block its history never shows) or it drops the message's text or reasoning (R1's
    history keeps only what follows `</think>`). Then the turn is built as R1 trains it."""
    full = tokenizer.apply_chat_template(list(messages), add_generation_prompt=False, tokenize=False, **kw)
    if not full.startswith(prompt_text):
        return None
    turn = full[len(prompt_text) :]
    m = messages[-1]
    kept = (str(m.get(key) or "").strip() for key in ("content", "reasoning_content"))
    if not all(text in turn for text in kept):
        return None
    if str(m.get("reasoning_content") or "").strip():
        # rendered means the turn changes with it: reasoning found in the turn by its text alone ("4"
        # in the answer "It is 4.", in a call's arguments) was taken as rendered, and never trained
        bare = {k: v for k, v in m.items() if k != "reasoning_content"}
        rest = tokenizer.apply_chat_template(
            [*messages[:-1], bare], add_generation_prompt=False, tokenize=False, **kw
        )
        if rest == full:
            return None
    return turn


def _through_first_stop(tokenizer: Any, ids: list[int]) -> list[int]:
    """A rendered turn up to its first stop id (what the template writes after it, such as ChatML's
    newline, the model never generates), or the whole turn + EOS if it has none."""
    stops = getattr(tokenizer, "stop_token_ids", (tokenizer.eos_token_id,))
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    return ids + [tokenizer.eos_token_id] if end is None else ids[: end + 1]


def completion_example(
    prompt_ids: list[int], completion_ids: list[int], stop_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """An (input_ids, labels) example from a prompt and a sampled completion (distillation); one not
    ended by a stop id (the tokenizer's `stop_token_ids`) gets the first, EOS."""
    target = list(completion_ids)
    if not target or target[-1] not in stop_ids:
        target.append(stop_ids[0])
    return list(prompt_ids) + target, [IGNORE] * len(prompt_ids) + target


def read_chat_jsonl(
    source: str | os.PathLike | Sequence[str | os.PathLike],
) -> Iterator[tuple[list[dict[str, Any]], list[dict] | None]]:
    """(messages, tools) from JSONL files whose lines are {"messages": [...], "tools": [...]?}: a file,
    a glob, a folder (its .jsonl and .jsonl.gz files, as `resolve_files` finds them) or a list of
    these, read in that order; errors name the file and line."""
    for _, msgs, tools in _numbered_chat_lines(source):
        yield msgs, tools


def chat_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The chat files `--data` names: the corpus' files, globs and folders, JSONL only (a data set
    published in shards, train-00000-of-00004.jsonl ..., is one --data)."""
    from nanoseek.data.files import resolve_files

    return resolve_files(source, kinds=("jsonl",))


def _numbered_chat_lines(
    source: str | os.PathLike | Sequence[str | os.PathLike],
) -> Iterator[tuple[str, list[dict[str, Any]], list[dict] | None]]:
    """("file:line", messages, tools) of each chat in `source` (see `read_chat_jsonl`)."""
    from nanoseek.data.files import json_array_note, open_binary, skip_byte_order_mark

    for p in chat_files(source):
        # bytes: a line that is not UTF-8 is named like any other bad line; a .gz is read as the corpus is
        try:
            with open_binary(p) as f:
                skip_byte_order_mark(f)
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{p}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                    except json.JSONDecodeError as e:
                        raise ValueError(
                            f"{p}:{n}: not valid JSON ({e.msg}){json_array_note(line)}"
                        ) from None
                    msgs = rec.get("messages") if isinstance(rec, dict) else None
                    if not isinstance(msgs, list):
                        raise ValueError(
                            f"{p}:{n}: expected an object with a 'messages' list{json_array_note(line)}"
                        )
                    tools = rec.get("tools")
                    if tools is not None and not isinstance(tools, list):
                        raise ValueError(f"{p}:{n}: 'tools' must be a list of OpenAI function tools")
                    yield f"{p}:{n}", msgs, tools
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a truncated or corrupt download
            raise ValueError(f"{p}: not a readable gzip file ({e})") from None


# ---------------------------------------------------------------------------------- packing
@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], IGNORE where no loss
    positions: torch.Tensor  # [B, S], restart at each packed example
    doc_ids: torch.Tensor  # [B, S], which example each token belongs to (padding is its own: -1)

    def attention_mask(self) -> torch.Tensor:
        """[B, S, S] bool: causal within one example, nothing across examples."""
        return document_causal_mask(self.doc_ids)

    def token_mask(self) -> torch.Tensor:
        """[B, S] bool: the examples' tokens, False at padding (which the routers' balancing skips)."""
        return self.doc_ids >= 0

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            *(t.to(device) for t in (self.input_ids, self.labels, self.positions, self.doc_ids))
        )

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def pack_examples(
    examples: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0
) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """Greedy first-fit packing (longest first) of examples into rows of exactly `seq_len` tokens.

    An example longer than seq_len is cut to seq_len (keeping the prompt and the start of the answer).
    Returns rows of (ids, labels, positions, doc_ids); padding's doc id is -1.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    exs = [(ids[:seq_len], labels[:seq_len]) for ids, labels in examples if len(ids) >= 2]
    exs.sort(key=lambda e: -len(e[0]))
    rows: list[list[tuple[list[int], list[int]]]] = []
    for ex, r in zip(exs, _first_fit([len(ids) for ids, _ in exs], seq_len), strict=True):
        if r == len(rows):
            rows.append([])
        rows[r].append(ex)
    out = []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        docs: list[int] = []
        for d, (i, lab) in enumerate(row):
            ids += i
            # an example's first token would be predicted from another example's last: never a target
            # (as TRL's DataCollatorWithFlattening), so no loss crosses from one example to the next
            labels += [IGNORE, *lab[1:]]
            pos += list(range(len(i)))
            docs += [d] * len(i)
        pad = seq_len - len(ids)
        ids += [pad_id] * pad
        labels += [IGNORE] * pad
        pos += list(range(pad))
        docs += [-1] * pad
        out.append((ids, labels, pos, docs))
    return out


def _first_fit(sizes: Sequence[int], capacity: int) -> list[int]:
    """The row each size goes to under first fit (the first row with room, else a new one), in
    O(n log n): a binary tree over the rows holds the most room under each node, so the first row with
    room is one walk down (a scan of every row per example took hours on a million examples). Rows not
    yet opened hold `capacity`, so the walk opens the next one when no open row has room."""
    leaves = 1
    while leaves < len(sizes):
        leaves *= 2
    room = [capacity] * (2 * leaves)
    out = []
    for size in sizes:
        node = 1
        while node < leaves:  # down to the leftmost leaf with room
            node = 2 * node if room[2 * node] >= size else 2 * node + 1
        out.append(node - leaves)
        room[node] -= size
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return out


def packed_batch_at(
    rows: Sequence[tuple[list[int], list[int], list[int], list[int]]], batch_size: int, seed: int, step: int
) -> PackedBatch:
    """Step `step`'s batch: epochs of the rows, each shuffled by seed and epoch. A pure function of
    the step, so resuming needs nothing but the step count."""
    per_epoch = math.ceil(len(rows) / batch_size)
    epoch, i = divmod(step, per_epoch)
    order = _epoch_order(len(rows), seed, epoch)
    chunk = [rows[j] for j in order[i * batch_size : (i + 1) * batch_size]]
    return PackedBatch(*(torch.tensor([r[k] for r in chunk], dtype=torch.long) for k in range(4)))


@functools.lru_cache(maxsize=2)  # the SFT loop's rows, and GRPO's --sft-mix rows beside its own
def _epoch_order(n: int, seed: int, epoch: int) -> array.array:
    """The order of `n` rows in `epoch`: shuffled once per epoch, not at every step (a shuffle of every
    row, which for a large dataset costs more than a small model's step). Kept as machine ints."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return array.array("q", order)


def sft_loss(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over assistant tokens, with per-example positions and masking."""
    # labels[:, i] is token i's own label; the loss at position i predicts labels[:, i + 1]
    batch = batch.to(next(model.parameters()).device)
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE)
    return model(
        batch.input_ids,
        positions=batch.positions,
        mask=batch.attention_mask(),
        labels=targets,
        ignore_index=IGNORE,
        token_mask=batch.token_mask(),
    )


# ----------------------------------------------------------------------------------- driver

# Fine-tuning's peak lr by model size. A few million parameters fine-tune at pretraining's end-of-schedule
# rate (the speedrun's 3e-4); a pretrained 1.5B+ base at that rate loses what it knew within steps, and
# open-r1's distillation recipes (Qwen2.5 1.5B-7B) run at 4e-5-5e-5
SMALL_MODEL_LR, LARGE_MODEL_LR = 3e-4, 5e-5


def default_lr(parameters: int) -> float:
    return SMALL_MODEL_LR if parameters < 100_000_000 else LARGE_MODEL_LR


@dataclass
class SFTConfig:
    init: str = option(
        help="checkpoint directory (with tokenizer files) or Hub name (owner/name)", parse=path
    )
    data: str | list[str] | None = option(
        None,
        "chat JSONL files (.jsonl or .jsonl.gz), globs ('shards/*.jsonl') or folders: one {'messages': "
        "[...]} per line (optionally with 'tools': [...])",
        nargs="+",
        parse=path,
    )
    # a list from Python, as `task_conversations` and grpo's and distill's --task take it
    task: str | list[str] | None = option(
        None, "build cold-start data from task(s)' worked solutions (comma-separated)", listed=True
    )
    task_examples: int = option(
        2000, "examples drawn from --task, at most (a task with fewer training problems gives all it has)"
    )
    out: str = option("runs/sft", "run directory", parse=path)
    steps: int | None = option(None, "optimizer steps (default: --epochs passes over the packed rows)")
    epochs: int = option(2)
    batch_size: int = option(8, "packed rows per step")
    seq_len: int = option(512, "packed row length")
    lr: float | None = option(
        None,
        f"peak learning rate (default: {SMALL_MODEL_LR:g} for a model under 100M parameters, as the speedrun's, "
        f"{LARGE_MODEL_LR:g} from there: open-r1's rate for distilling into 1.5B-7B bases)",
    )
    optimizer: str = option(
        "adamw",
        "adamw, or muon (train/muon.py): a model pretrained with Muon keeps its update geometry",
        choices=("adamw", "muon"),
    )
    weight_decay: float = option(0.0)
    warmup_steps: int = option(10)
    min_lr_ratio: float = option(0.1)
    precision: str = option(
        "auto",
        "auto: bf16 on a GPU that multiplies it natively, fp32 on a CPU (where the recipe was tuned)",
        choices=("auto", "fp32", "bf16"),
    )
    checkpoint_every: int = option(0, "steps between checkpoints (0 = only at the end)")
    # shared with `nanoseek distill`, whose student trains as the stage `distill`
    resume: bool = option(False, "continue from RUN/sft/ (distill: RUN/distill/) if it holds a checkpoint")
    seed: int = option(0, parse=torch_seed)
    language: str | None = option(None, "only --task problems in this language (en, ja, zh)")
    multi_turn: float = option(
        0.0,
        "share of --task chats that ask 2-3 problems in a row (history: earlier answers, as clients send)",
    )
    progress: bool = option(True)
    # as pretrain's (`StepLog`): each stage's curves in RUN/tensorboard/<stage>/ (distill: "distill")
    tensorboard: bool = option(False, "also write TensorBoard events to RUN/tensorboard/")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    # a time-matched control run: stop and save once this budget from the start of sft() is spent
    max_seconds: float | None = option(
        None,
        "wall-clock budget, data building included: a run planned for 5 steps or more is refitted to "
        "fill it at the measured pace (more or fewer steps than --steps/--epochs; the schedule anneals "
        "by it); stops and saves once spent. --resume goes on with what its checkpoint had left of it",
    )

    def validate(self) -> None:
        """Clear errors, by flag, for settings out of range (configs built in Python skip argparse)."""
        check_choices(self)
        if isinstance(self.task, list):  # the flag's spelling: the run's settings and the resume check's
            self.task = ",".join(self.task)
        for name in ("epochs", "batch_size", "task_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1 (or left out for --epochs passes), got {self.steps}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2 (a token and the next one), got {self.seq_len}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "warmup_steps", "checkpoint_every"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "multi_turn"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.max_seconds is not None and not 0 < self.max_seconds < math.inf:
            raise ValueError(
                f"--max-seconds must be a finite number > 0 (or left out for no budget), got {self.max_seconds}"
            )
        if self.threads is not None and self.threads < 1:  # as pretrain's: 0 ignored, -1 torch's traceback
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.tensorboard:  # its package said now, not once the model and data are read
            from nanoseek.train.loop import require_tensorboard

            require_tensorboard()


def task_conversations(
    task_names: str | list[str], n: int, seed: int = 0, language: str | None = None, multi_turn: float = 0.0
) -> list[list[dict]]:
    """Cold-start chats from built-in tasks' worked solutions (R1 §2.3.1: a few thousand long-CoT samples).

    `multi_turn` is the share of chats that ask two or three problems of one language in a row, as a
    chat client sends the history back: a model taught only one-question chats looks back at the first
    question of a chat, not the last (asked second in a chat, run W0's final model fell from 94.7% to
    8.3%). Each problem is still one assistant turn, trained once; the template drops the reasoning of
    earlier turns, so the history holds their answers."""
    from nanoseek.data.tasks import get_task, refuse_unseen_wordings, split_task_list
    from nanoseek.data.tasks.base import worked_solution_of

    if not 0.0 <= multi_turn <= 1.0:
        raise ValueError(f"multi_turn must be in [0, 1], got {multi_turn}")
    turns: list[tuple[str, list[dict]]] = []
    # options hold commas ("arithmetic?ops=add,sub"): split as eval/grpo/distill do
    names = split_task_list(task_names)
    refuse_unseen_wordings(names)
    for j, name in enumerate(names):
        task = get_task(name)
        made = 0
        share = max(1, n // len(names) + (j < n % len(names)))  # n in all, the remainder to the first
        # up to `share`, as GRPO's --train-pool: a task with fewer (a small JSONL file under the default
        # --task-examples) gives all it has, without a warning about a count the user never asked for
        for p in task.problems("train", share, seed=seed, language=language, strict=False):
            solution = worked_solution_of(task, p)
            if solution is None:  # nothing to imitate (a JSONL line without "reasoning")
                continue
            turns.append(
                (
                    p.language,
                    [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": solution}],
                )
            )
            made += 1
        if not made:
            raise ValueError(
                f'task {name!r} has no worked solutions to build SFT data from (JSONL: add "reasoning")'
            )
    if not multi_turn:
        return [turn for _, turn in turns]
    rng = random.Random(f"multi-turn|{seed}")
    rng.shuffle(turns)  # chats mix the families
    by_language: dict[str, list[list[dict]]] = {}
    for lang, turn in turns:
        by_language.setdefault(lang, []).append(turn)
    convs = []
    for same in by_language.values():
        i = 0
        while i < len(same):
            k = rng.choice((2, 3)) if rng.random() < multi_turn else 1
            convs.append([m for turn in same[i : i + k] for m in turn])
            i += k
    return convs


# Settings a --resume must find unchanged beside the optimizer's (the Trainer checks those): what
# builds and orders the batches, and the warmup as given (the trainer's is cut to fit the steps).
RESUME_SETTINGS = (
    "data",
    "task",
    "task_examples",
    "language",
    "multi_turn",
    "seq_len",
    "batch_size",
    "seed",
    "warmup_steps",
    "precision",
)


def _check_targets_fit(examples: list[tuple[list[int], list[int]]], seq_len: int) -> int:
    """The assistant tokens left to train on once each example is cut to `seq_len`; raises when none
    is (every step's loss would be NaN, skipped, and the run would save its start as trained)."""
    trained = sum(sum(lab != IGNORE for lab in labels[1:seq_len]) for _, labels in examples)
    if not trained:
        firsts = [next((i for i, lab in enumerate(labels) if lab != IGNORE), None) for _, labels in examples]
        prompt = min((i for i in firsts if i is not None), default=None)
        why = "" if prompt is None else f" (the shortest prompt alone takes {prompt} tokens)"
        raise ValueError(
            f"no example has an assistant token within --seq-len {seq_len}{why}: raise --seq-len"
        )
    return trained


def check_seq_len(seq_len: int, config: Any) -> None:
    """--seq-len within the model's context, as pretrain refuses it: positions past it are never served."""
    context = config.max_position_embeddings
    if seq_len > context:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({context}): "
            f"use --seq-len {context} or less"
        )


def train_on_examples(
    model: DeepSeekV3,
    tokenizer: Any,
    examples: list[tuple[list[int], list[int]]],
    run_dir: str | os.PathLike,
    stage: str,
    cfg: SFTConfig,
    config_extra: dict[str, Any] | None = None,
    started: float | None = None,
    deadline_fn: Callable[[], float | None] | None = None,
    start_record: dict[str, Any] | None = None,
    data_files: Sequence[str | os.PathLike] | None = None,
) -> Path:
    """The SFT loop on (input_ids, labels) examples through the shared Trainer; returns RUN/<stage>/.
    `start_record`: fields for the run's start record in metrics.jsonl (a resumed run logs them apart).
    `data_files`: the files the examples were read from, which a --resume must find the same (sizes too).

    `cfg.max_seconds` counts from `started` (perf_counter; default: now). With a budget, `cfg.steps`
    is only the first estimate: every few steps the step count is refitted to the time left at the
    measured pace (the cosine schedule follows it), and the deadline stops the run in any case.
    `deadline_fn`, when given, is asked before every step for the deadline (perf_counter; None: not
    known yet), for a budget that is only known as it goes (the speedrun's control beside GRPO)."""
    import time

    from nanoseek.train.loop import OptimConfig, StepLog, Trainer
    from nanoseek.train.pretrain import resolve_precision

    cfg.validate()
    if not examples:
        raise ValueError("no training examples")
    vocab = model.config.vocab_size
    top = max(max(ids, default=0) for ids, _ in examples)
    if top >= vocab:  # an IndexError in the first step's embedding otherwise (the engine refuses them too)
        raise ValueError(
            f"the examples hold token id {top}, outside the model's vocabulary [0, {vocab}): its tokenizer "
            f"({getattr(tokenizer, 'vocab_size', '?')} tokens) is not the one its vocab_size was made for"
        )
    check_seq_len(cfg.seq_len, model.config)
    n_target = sum(sum(lab != IGNORE for lab in labels) for _, labels in examples)
    trained = _check_targets_fit(examples, cfg.seq_len)
    # An example whose prompt alone fills --seq-len has nothing left to train on: packed, it is a row of
    # labels that are all IGNORE, whose batch can have a NaN loss (a skipped step) or dilutes the rest.
    n_all = len(examples)
    examples = [e for e in examples if any(lab != IGNORE for lab in e[1][1 : cfg.seq_len])]
    dropped = n_all - len(examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = pack_examples(examples, cfg.seq_len, pad)
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = cfg.steps or max(1, cfg.epochs * per_epoch)
    cut = f", {n_target - trained} cut off by --seq-len" if trained < n_target else ""
    if dropped:
        cut += (
            f"; {counted(dropped, 'example')} dropped: "
            f"{'their prompts' if dropped != 1 else 'its prompt'} alone fill{'s' * (dropped == 1)} --seq-len"
        )
    plan, desc = f"{counted(total, 'step')} of {counted(cfg.batch_size, 'row')}", stage
    if cfg.max_seconds or deadline_fn is not None:
        # the step count is a first estimate the deadline refits (`Trainer`): given as the run's length,
        # a 15 s budget read "50 steps" and its bar an ETA of minutes, to end at 6 steps
        budget = f"{cfg.max_seconds:.0f}s budget" if cfg.max_seconds else "deadline"
        plan = f"a {budget}: {plan} at first, refitted to the pace measured"
        desc = f"{stage} ({budget})"
    print(
        f"{stage}: {len(examples)} examples ({n_target} assistant tokens{cut}) packed into {len(rows)} rows "
        f"of {cfg.seq_len}; {plan}"
    )
    if hasattr(model, "set_balance_alpha"):  # the sequence-wise balance loss α (V3 §4.2) kept through
        model.set_balance_alpha(model.config.aux_loss_alpha)  # fine-tuning: the one its config records
    size = sum(p.numel() for p in model.parameters())
    lr = cfg.lr if cfg.lr is not None else default_lr(size)
    if cfg.lr is None and lr != SMALL_MODEL_LR:  # said: a model this size would diverge at the small one's
        print(f"{stage}: lr {lr:g}, the default for a model of {human(size)} parameters (--lr to set it)")
    precision = resolve_precision(cfg.precision, next(model.parameters()).device, bf16_on_cpu=False)
    t0 = time.perf_counter()
    trainer = Trainer(
        model,
        run_dir,
        stage,
        OptimConfig(
            lr=lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=min(cfg.warmup_steps, total // 2),
            schedule="cosine",
            min_lr_ratio=cfg.min_lr_ratio,
            optimizer=cfg.optimizer,
        ),
        total_steps=total,
        precision=precision,
        checkpoint_every=cfg.checkpoint_every,
        tokenizer=tokenizer,
        deadline=(started or t0) + cfg.max_seconds if cfg.max_seconds else None,
        deadline_later=deadline_fn is not None,
        config_extra=config_extra or {},
        resume_settings={
            **{name: getattr(cfg, name) for name in RESUME_SETTINGS},
            "precision": precision,  # as resolved: an auto run resumes one that named it, and the other way round
            # the files a glob or folder found, not only its text, and their sizes: a shard added since, or
            # lines added to a file, is another data set (other rows, another order of batches)
            **(
                {"data_files": [f"{f} ({Path(f).stat().st_size} bytes)" for f in data_files]}
                if data_files
                else {}
            ),
        },
        flags_from=type(cfg),
    )
    # Seconds of the budget spent: a --resume goes on with what its checkpoint had left of it (its
    # refitted step count with it), as one run that was never stopped, not with a fresh budget.
    spent = float((trainer.resume() or {}).get("seconds_spent", 0.0)) if cfg.resume else 0.0
    # sft_loss is the main head's alone: the MTP modules do not run, so their FLOPs are not the step's
    log = StepLog.for_trainer(
        trainer,
        seq_len=cfg.seq_len,
        include_mtp=False,
        progress=cfg.progress,
        desc=desc,
        tensorboard=cfg.tensorboard,
    )
    # finished (every step ran, or its budget is spent: the deadline stopped it): its checkpoint stays as written
    out_of_time = cfg.max_seconds is not None and spent >= cfg.max_seconds  # (validated: > 0)
    if cfg.resume and (trainer.global_step >= trainer.total_steps or out_of_time):
        log.log(None, event="end", wall_time_s=0.0, skipped=trainer.skipped_steps)
        log.close()
        print(f"{stage}: nothing to train; checkpoint {trainer.checkpoint_dir}")
        return trainer.checkpoint_dir
    if trainer.deadline is not None:
        trainer.deadline -= spent

    def budget_state() -> dict[str, Any]:
        return {"seconds_spent": spent + time.perf_counter() - (started or t0)}

    first_step = trainer.global_step  # where this process starts: its summary's steps are its own
    if trainer.global_step == 0:  # a new run: the report reads it apart from any before it in RUN
        trainer.note_replacing()
        # the precision, as pretraining's records it: the report sets it beside the stage's speed and MFU
        log.log(0, event="start", precision=trainer.precision, **(start_record or {}))
        log.log_model(model.config)
    elif start_record:
        log.log(None, **start_record)

    last: dict[str, Any] = {}
    kept_loss: float | None = None  # the last step's that was not skipped: a skipped one's is NaN or a spike
    try:
        with trainer.stop_on_signals():
            while True:
                if deadline_fn is not None:
                    trainer.deadline = deadline_fn() or trainer.deadline
                if trainer.done:
                    break
                batch = packed_batch_at(rows, cfg.batch_size, cfg.seed, trainer.global_step)

                def loss_fn(batch: PackedBatch = batch) -> tuple[torch.Tensor, dict[str, Any]]:
                    loss = sft_loss(trainer.model, batch)
                    metrics: dict[str, Any] = {"sft_loss": loss.detach(), "tokens": batch.input_ids.numel()}
                    balance = model.balance_loss() if hasattr(model, "balance_loss") else None
                    if balance is not None:
                        loss = loss + balance
                    return loss, metrics

                last = trainer.step(loss_fn)
                log.step(last, total_steps=trainer.total_steps)
                if "skipped" not in last:
                    kept_loss = last["loss"]
                if trainer.stop_requested():  # a signal: save this step and stop
                    break
                if trainer.checkpoint_due():
                    trainer.save(budget_state())
            if trainer.global_step < trainer.total_steps and not trainer.stop_signal:
                budget = f"of {cfg.max_seconds:.0f}s " if cfg.max_seconds else ""
                # through the bar (still open): printed, it ran on from the end of the bar's line
                log.write(
                    f"{stage}: time budget {budget}spent at step {trainer.global_step}/{trainer.total_steps}"
                )
            path = trainer.save(budget_state())
            trainer.stop_requested()  # one that came during the last step's save: stop all the same
    except BaseException as e:
        log.ended_by(e)
        # as pretrain: a bar left open by a notebook's interrupted cell (its traceback keeps it alive)
        # pushed every later bar down a line, which a notebook draws as a new line per redraw
        log.close()
        raise
    if trainer.stop_signal:  # no end record: the run goes on at its --resume, as after a kill
        log.close()
        raise trainer.interrupted(path)
    log.log(None, event="end", wall_time_s=time.perf_counter() - t0, skipped=trainer.skipped_steps)
    log.close()
    if last:
        # the skipped steps said, as pretrain's summary and the report say them
        n = trainer.skipped_steps
        skipped = f", {counted(n, 'step')} skipped" if n else ""
        final = "no step kept" if kept_loss is None else f"final loss {kept_loss:.4f}"
        print(
            f"{stage}: {counted(trainer.global_step - first_step, 'step')} in {time.perf_counter() - t0:.0f}s, {final}{skipped}; "
            f"checkpoint {path}"
        )
    return path


def sft(cfg: SFTConfig, deadline_fn: Callable[[], float | None] | None = None) -> Path:
    """SFT a checkpoint on chat JSONL and/or a task's worked solutions; returns RUN/sft/
    (`deadline_fn`: see `train_on_examples`)."""
    import time

    from nanoseek.atomic import check_out
    from nanoseek.checkpoint import load_model, resolve_checkpoint
    from nanoseek.perf import default_device, torch_threads
    from nanoseek.tokenizer import checkpoint_tokenizer
    from nanoseek.train.loop import hold_stage

    started = time.perf_counter()  # a time budget covers data building too, as the control pays it

    cfg.validate()
    # (here, not in `validate`: distill shares --language with its student's SFTConfig, which has no --task)
    if not cfg.task and (cfg.language or cfg.multi_turn):
        flag = "--language" if cfg.language else "--multi-turn"
        raise ValueError(f"{flag} shapes the chats built from --task; a --data file is trained on as it is")
    if not cfg.data and not cfg.task:  # before a Hub --init's resolve: its whole download
        raise ValueError("give --data chat.jsonl and/or --task NAME")
    # an --out it cannot write (a read-only disk, a file): said now, not once the model and data are read
    check_out(cfg.out, resume=cfg.resume)
    init = resolve_checkpoint(cfg.init, flag="--init")
    torch.manual_seed(cfg.seed)
    tok = checkpoint_tokenizer(init)  # one from another model: said before the weights load
    # (where, messages, tools): errors name the data file's line, or the task conversation. Read and
    # tokenized before the weights load: a bad line was found only once a large model had loaded (minutes)
    convs: list[tuple[str, list[dict[str, Any]], list[dict] | None]] = []
    files = chat_files(cfg.data) if cfg.data else None
    if files:
        convs.extend(_numbered_chat_lines(files))
        if not convs:  # an empty file (or blank lines): "no training examples" named no file
            named = ", ".join(map(str, files[:3])) + (", ..." if len(files) > 3 else "")
            raise ValueError(f"no chats in {named}: expected one {{'messages': [...]}} per line")
    if cfg.task:
        from nanoseek.data.tasks import get_task, split_task_list

        made = task_conversations(cfg.task, cfg.task_examples, cfg.seed, cfg.language, cfg.multi_turn)
        convs.extend((f"{cfg.task} conversation {k}", c, None) for k, c in enumerate(made, 1))
        # a jsonl: task's files too, as --data's: lines added or edited since made other examples, which
        # a --resume trained on without a word
        files = [
            *(files or []),
            *(f for name in split_task_list(cfg.task) for f in getattr(get_task(name), "files", ())),
        ]
    examples = []
    for where, conv, tools in convs:
        try:
            examples.extend(tokenize_conversation(tok, conv, tools))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    model = load_model(init, device=default_device())
    with torch_threads(cfg.threads), hold_stage(cfg.out, "sft"):
        return train_on_examples(
            model,
            tok,
            examples,
            cfg.out,
            "sft",
            cfg,
            {"sft": vars(cfg)},
            started,
            deadline_fn=deadline_fn,
            data_files=files,
        )
