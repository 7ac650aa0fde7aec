"""Held-out probes of what a model has learned: loss by kind of token, and its own greedy answers.

What is notable:
- A mean validation loss hides the skill: template words are most of a worked solution and are learned
  first, while the few digits that carry the answer can stay at chance. The probe scores held-out
  problems rendered as R1 chat turns and splits the loss over the response's tokens by kind:
  - `copy`: digits of a multi-digit number that already appeared, whole, earlier in the document
    (the operands restated in the steps, the final answer restated after the steps). A model that
    cannot look back at its prompt stays near ln(10) ≈ 2.3 nats here.
  - `digit`: every other digit of the response (what the steps compute).
  - `text`: everything else (the template).
  - `answer`: the tokens after `</think>`, whatever their kind.
  Single digits never count as copies: a one-digit result coincides with some earlier digit too often.
- `greedy_accuracy` decodes held-out prompts with the engine (the serving path, not a second decode
  loop) and scores them with each task's own verifier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.model import DeepSeekV3
from nanoseek.model.loss import target_logprobs
from nanoseek.tokenizer import THINK_END

KINDS: tuple[str, ...] = ("copy", "digit", "text", "answer")
_DIGITS = re.compile(r"\d+")


@dataclass
class ProbeDocument:
    ids: list[int]  # BOS + the chat turn's tokens
    kinds: list[str | None]  # per token: its kind when it is a scored response token, else None
    answer: list[bool]  # per token: part of the final answer (after </think>)
    task: str


def response_char_kinds(text: str, response_start: int) -> list[str | None]:
    """Per character of `text`: None before `response_start`, else "copy", "digit" or "text"."""
    kinds: list[str | None] = [None] * response_start + ["text"] * (len(text) - response_start)
    seen: set[str] = set()
    for m in _DIGITS.finditer(text):
        number = m.group()
        if m.start() >= response_start:
            kind = "copy" if len(number) >= 2 and number in seen else "digit"
            for i in range(m.start(), m.end()):
                kinds[i] = kind
        seen.add(number)
    return kinds


def probe_documents(
    tokenizer: Any, tasks: Sequence[str], n_per_task: int, seed: int = 0, split: str = "test"
) -> list[ProbeDocument]:
    """`n_per_task` held-out problems of each task as scored chat documents (worked solution + answer)."""
    from nanoseek.data.synthetic import chat_document
    from nanoseek.data.tasks import get_task

    docs = []
    for name in tasks:
        task = get_task(name)
        if not hasattr(task, "worked_solution"):
            raise ValueError(f"task {name!r} has no worked solutions to probe a loss on")
        for p in task.problems(split, n_per_task, seed=seed):
            text = chat_document(p, task.worked_solution(p))
            start = text.index(p.prompt) + len(p.prompt)
            think_end = text.rfind(THINK_END)
            answer_start = think_end + len(THINK_END) if think_end >= 0 else len(text)
            char_kinds = response_char_kinds(text, start)
            enc = tokenizer.backend.encode(text, add_special_tokens=False)
            kinds: list[str | None] = [None]  # BOS
            answer = [False]
            for a, b in enc.offsets:
                if a < start or a >= len(text):
                    kinds.append(None)
                    answer.append(False)
                    continue
                span = char_kinds[a:b]
                kinds.append("copy" if "copy" in span else "digit" if "digit" in span else "text")
                answer.append(a >= answer_start)
            docs.append(ProbeDocument([tokenizer.bos_token_id, *enc.ids], kinds, answer, name))
    return docs


@torch.no_grad()
def probe_losses(model: DeepSeekV3, docs: Sequence[ProbeDocument], batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss (nats) over the probe's response tokens of each kind, and per task."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        for i in range(0, len(docs), batch_size):
            chunk = docs[i : i + batch_size]
            width = max(len(d.ids) for d in chunk)
            pad = model.config.pad_token_id or 0
            ids = torch.tensor([d.ids + [pad] * (width - len(d.ids)) for d in chunk], device=device)
            nll = -target_logprobs(model(ids[:, :-1]), ids[:, 1:])[0].cpu()
            for row, d in enumerate(chunk):
                for t in range(1, len(d.ids)):
                    kind = d.kinds[t]
                    if kind is None:
                        continue
                    keys = [kind, f"{d.task}/{kind}"] + (["answer"] if d.answer[t] else [])
                    for key in keys:
                        sums[key] = sums.get(key, 0.0) + float(nll[row, t - 1])
                        counts[key] = counts.get(key, 0) + 1
    finally:
        model.train(was_training)
    return {k: sums[k] / counts[k] for k in sorted(sums)}


@torch.no_grad()
def greedy_accuracy(
    model: DeepSeekV3,
    tokenizer: Any,
    tasks: Sequence[str],
    n_per_task: int,
    max_new_tokens: int = 128,
    seed: int = 0,
    max_batch_size: int = 64,
    engine: Any = None,
) -> dict[str, float]:
    """Share of `n_per_task` held-out problems per task that greedy decoding answers correctly.

    `engine`: decode with this one (e.g. a speculative engine whose stats the caller reads after)."""
    from nanoseek.data.tasks import get_task, prescore
    from nanoseek.engine import Engine
    from nanoseek.evaluate import chat_prompt_ids, engine_generate, strip_stop

    engine = engine or Engine(model, max_batch_size=max_batch_size)
    stop = list(tokenizer.stop_token_ids)
    out = {}
    for name in tasks:
        task = get_task(name)
        problems = task.problems("test", n_per_task, seed=seed)
        results = engine_generate(
            engine,
            [chat_prompt_ids(tokenizer, p.messages) for p in problems],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop_token_ids=stop,
        )
        correct = 0.0
        texts = [tokenizer.decode(strip_stop(r.token_ids, stop), skip_special_tokens=True) for r in results]
        prescore(problems, texts)  # reasoning-gym answers: one sandboxed child for them all
        for p, text in zip(problems, texts, strict=True):
            # the prompt opened the think block: an answer counts only after </think>, as in `eval`
            correct += task.score(p, text, require_think=True)
        out[name] = correct / max(1, len(problems))
    return out
