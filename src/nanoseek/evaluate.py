"""Evaluation the way R1 reports it, for a nanoseek checkpoint or any OpenAI-compatible endpoint.

What is notable here:
- pass@1 is the mean correctness over k samples per problem at temperature 0.6 (R1 §3, "pass@1
  estimated from k samples"), not one greedy sample: greedy decoding of reasoning models repeats itself
  and has high variance across problems.
- cons@k is the majority vote over the *extracted answers* of the k samples (self-consistency), by
  what they say ("42", "42.", "\\boxed{42}" are one vote); samples with no parseable answer do not vote.
  A tie goes to the answer of the earliest sample among the tied (sample order is seed order, the same
  for a checkpoint and an endpoint), as `Counter.most_common` keeps first-counted first.
- Format rate and language consistency come from the same reward functions GRPO trains with
  (`nanoseek.data.rewards`), so a model is scored by the rules it was trained on.
- An endpoint is scored identically: its `reasoning_content` + `content` are put back together as
  "reasoning</think>content" (the completion the prompt's opened think block began) before scoring.
- Samples go through the batched Engine all at once (P·k requests in one queue), never one by one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

from nanoseek.atomic import atomic_write, check_writable, cut_name, directory_to_read
from nanoseek.options import option, path
from nanoseek.perf import AUTO_DTYPE_HELP, DEVICE_HELP, DTYPE_CHOICES, QUANTIZE_FORMATS, QUANTIZE_HELP
from nanoseek.tokenizer import THINK_END, THINK_START

EVAL_PARTS = "accuracy:1,format:1,language:1"


@dataclass
class Sample:
    """One sampled answer: the text scored (reasoning included) and its length in tokens."""

    text: str
    # an endpoint's: its response's mean over the n choices (usage counts them together); None where it
    # sent no usage (some servers and proxies), so the report says unknown rather than 0 tokens
    num_tokens: float | None
    finish_reason: str | None = None


# Widest default decode batch; the engine admits only what its cache holds, so this bounds time per
# step, not memory.
DEFAULT_MAX_BATCH = 256
# requests an endpoint evaluation keeps in flight (`--concurrency`)
DEFAULT_CONCURRENCY = 8
# seconds one request to an endpoint may go unanswered (`--timeout`): lm-evaluation-harness's, half the
# OpenAI client's 600, which with its retries let a hung server hold an evaluation for an hour and a half
DEFAULT_TIMEOUT = 300.0
# retries of one sampling request (429, 5xx, timeouts, a dropped connection) before the evaluation
# ends (`--retries`): the client's backoff doubles up to 8 s (about 40 s in all), or waits what
# Retry-After says
SAMPLE_RETRIES = 8


@dataclass
class EvalConfig:
    model: str = option(
        help="checkpoint directory, Hub name (owner/name), or http(s) URL of an OpenAI-compatible server",
        parse=path,
        positional=True,
    )
    task: str = option(help="task name(s), comma-separated: each is scored separately", listed=True)
    k: int = option(4, "samples per problem", flag="-k")
    n: int = option(64, "problems")
    temperature: float = option(0.6)
    top_p: float = option(0.95)
    # room for the speedrun's longest worked solutions (a 3-digit x 2-digit product takes up to ~300)
    max_new_tokens: int = option(320)
    thinking: bool = option(
        True,
        "prompt with the think block opened (R1); --no-thinking: DeepSeek-V3.1's non-thinking mode, the answer "
        "is scored without a think block (format_rate then counts think blocks the model wrote anyway)",
        short="--no-think",  # chat's spelling, taken as a prefix before abbreviations were refused
    )
    split: str = option("test", choices=("test", "train"))
    seed: int = option(0)
    language: str | None = option(None, "only problems in this language (en, ja, zh)")
    out: str | None = option(
        None,
        "JSON report path (default: in the checkpoint directory; for a URL or Hub name ./eval_<task>.json)",
        parse=path,
    )
    run_dir: str | None = option(
        None,
        "run directory for metrics.jsonl (default: the checkpoint directory's parent; none for a URL or Hub name)",
        parse=path,
    )
    endpoint_model: str | None = option(
        None, "model name on the endpoint (default: the first it lists)", flag="--model-name"
    )
    api_key: str | None = option(None, "endpoint API key (default: $OPENAI_API_KEY)")
    concurrency: int | None = option(
        None,
        f"endpoint: requests in flight at once (default {DEFAULT_CONCURRENCY}; lm-evaluation-harness's "
        "num_concurrent): fewer for a rate-limited API, more for a server that batches",
    )
    timeout: float | None = option(
        None,
        f"endpoint: seconds a request may wait for its answer before it is tried again (default "
        f"{DEFAULT_TIMEOUT:g}, lm-evaluation-harness's): more for answers longer to generate; a server that "
        "stops answering ends the evaluation after --timeout x (--retries + 1)",
    )
    retries: int | None = option(
        None,
        "endpoint: times a request is tried again after a failure (no answer within --timeout, a dropped "
        f"connection, 429 or 5xx) before the evaluation ends (default {SAMPLE_RETRIES})",
    )
    max_batch_size: int | None = option(
        None,
        # (with several --task, every task's samples are one queue: `evaluate_many`)
        "engine: sequences decoded together (default: every sample drawn, n x k of each --task, at most "
        f"{DEFAULT_MAX_BATCH}: a second, part-empty wave of the longest answers costs more than a wider batch)",
    )
    dtype: str = option("auto", AUTO_DTYPE_HELP, choices=DTYPE_CHOICES)
    # as serve, generate and chat take them: a model scored on the device and weights it is served with
    device: str | None = option(None, DEVICE_HELP)
    quantize: str | None = option(None, QUANTIZE_HELP, choices=QUANTIZE_FORMATS)
    threads: int | None = option(None, "engine: torch CPU threads (default: torch's choice)")
    progress: bool = option(True)
    extra: dict[str, Any] = option(factory=dict, cli=False)


# ------------------------------------------------------------------------------------ scoring
# the vote of every sample the verifier scores as right (cons@k); no answer's key equals it (a list is ints)
CORRECT = ("correct",)


def score_samples(
    task: Any,
    reward: Callable[[Any, str], tuple[float, dict[str, float]]],
    problems: Sequence[Any],
    samples: Sequence[Sequence[Sample]],
    require_think: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregate metrics and per-problem records from k samples per problem.

    Correctness is the reward's "accuracy" part (the task's strict verifier on the text after
    </think>). A problem whose gold answer cannot be parsed (the reward says `skipped`) is reported
    and left out of every mean rather than counted as wrong or right. Where the task reads a trace's
    conclusion (`conclusion_agrees`: comparison, largest), `pass@1_concluded` counts only the passes
    whose reasoning concludes the answer they give: right answers after a trace that says otherwise
    are a pass@1 the reasoning did not earn.
    """
    if len(problems) != len(samples):
        raise ValueError(f"{len(problems)} problems but {len(samples)} sample lists")
    from nanoseek.data.tasks import extract_answer, prescore
    from nanoseek.data.tasks.answers import answer_key

    # reasoning-gym answers: all scored in one sandboxed child, not one per reward call below
    prescore(
        [p for p, outs in zip(problems, samples, strict=True) for _ in outs],
        [s.text for outs in samples for s in outs],
    )

    extract = getattr(task, "extract_answer", None) or (
        lambda t: extract_answer(t, require_think=require_think)
    )
    # where the task reads a trace's conclusion: the passes whose reasoning also concludes their answer
    concludes = getattr(task, "conclusion_agrees", None)
    per_problem = []
    tot: defaultdict[str, float] = defaultdict(float)  # sums over the problems
    n_samples = n = skipped = uncounted = 0
    for prob, outs in zip(problems, samples, strict=True):
        if not outs:
            raise ValueError(f"problem {prob.id} has no samples")
        scores, fmt, lang = [], [], []
        answers: list[str | None] = []
        results = [reward(prob, s.text) for s in outs]
        if any(getattr(r, "skipped", False) for r in results):
            skipped += 1
            per_problem.append({"id": prob.id, "answer": prob.answer, "skipped": "gold answer unparseable"})
            continue
        for s, (_, parts) in zip(outs, results, strict=True):
            scores.append(float(parts.get("accuracy", 0.0)))
            fmt.append(float(parts.get("format", 0.0)))
            lang.append(float(parts.get("language", 0.0)))
            a = extract(s.text)
            answers.append(None if a is None else re.sub(r"\s+", " ", str(a).strip()) or None)
        # a vote per meaning, not per spelling: the correct samples all give the gold answer ("42",
        # "\\boxed{42}", "42."), and the others are compared as the verifiers compare answers
        keys = [CORRECT if sc >= 0.5 else answer_key(a) for sc, a in zip(scores, answers, strict=True)]
        votes = Counter(key for key in keys if key is not None)
        if votes:  # a tie: the earliest sample's answer (most_common keeps first-counted first)
            winner = votes.most_common(1)[0][0]
            top, cons = answers[keys.index(winner)], winner == CORRECT
        else:
            top, cons = None, False
        k = len(outs)
        lengths = [s.num_tokens for s in outs if s.num_tokens is not None]
        rec = {
            "id": prob.id,
            "language": getattr(prob, "language", None),
            "answer": prob.answer,
            "pass@1": sum(scores) / k,
            "cons": bool(cons),
            "majority_answer": top,
            "format": sum(fmt) / k,
            "language_consistency": sum(lang) / k,
            "mean_tokens": sum(lengths) / k if len(lengths) == k else None,
            "truncated": sum(s.finish_reason == "length" for s in outs) / k,
            "sample": outs[0].text[:500],
        }
        agrees = [concludes(prob, s.text) for s in outs] if concludes else []
        if agrees and None not in agrees:
            rec["pass@1_concluded"] = (
                sum(sc >= 0.5 and bool(a) for sc, a in zip(scores, agrees, strict=True)) / k
            )
        per_problem.append(rec)
        for key in ("pass@1", "format", "language_consistency", "mean_tokens", "truncated"):
            tot[key] += rec[key] or 0
        uncounted += rec["mean_tokens"] is None
        tot["cons"] += float(cons)
        n_samples += k
        n += 1
    if n == 0:
        raise ValueError(f"all {len(problems)} problems have unparseable gold answers: nothing to score")
    k_used = n_samples // n
    scored = [rec["pass@1"] for rec in per_problem if "pass@1" in rec]
    metrics: dict[str, Any] = {
        "pass@1": tot["pass@1"] / n,
        "pass@1_stderr": standard_error(scored),
        f"cons@{k_used}": tot["cons"] / n,
        "format_rate": tot["format"] / n,
        "language_consistency": tot["language_consistency"] / n,
        "mean_response_tokens": None if uncounted else tot["mean_tokens"] / n,
        "truncated_rate": tot["truncated"] / n,
        "problems": n,
        "skipped_problems": skipped,
        "k": k_used,
    }
    concluded = [rec["pass@1_concluded"] for rec in per_problem if "pass@1_concluded" in rec]
    if concluded and len(concluded) == n:
        metrics["pass@1_concluded"] = sum(concluded) / n
    by_language: dict[str, list[float]] = {}
    for rec in per_problem:
        if "pass@1" in rec and rec.get("language"):
            by_language.setdefault(rec["language"], []).append(rec["pass@1"])
    if len(by_language) > 1:
        metrics["pass@1_by_language"] = {k: sum(v) / len(v) for k, v in sorted(by_language.items())}
    return metrics, per_problem


Z_95 = 1.96  # standard errors each side of a two-sided 95% interval (normal approximation)


@functools.lru_cache
def t_95(n: int) -> float:
    """Standard errors each side of a two-sided 95% interval on the mean of n values: Student's t with
    n - 1 degrees of freedom. `Z_95` holds for many values only: a "95%" interval of 1.96 standard
    errors over 5 problems covered 88% (t is 2.78 there, 2.01 at the speedrun's 48). 0 for n < 2, where
    there is no spread to measure (`standard_error`). The quantile: Newton's method on the t density,
    integrated by Simpson's rule (from below the root, where the concave CDF keeps every step short)."""
    if n < 2:
        return 0.0
    df = n - 1
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(x: float) -> float:
        return scale * (1 + x * x / df) ** (-(df + 1) / 2)

    def half_cdf(t: float, steps: int = 2000) -> float:  # P(0 < T < t)
        h = t / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return h / 3 * (density(0.0) + inner + density(t))

    t = Z_95
    for _ in range(100):
        step = (half_cdf(t) - 0.475) / density(t)
        t -= step
        if abs(step) < 1e-9:
            break
    return t


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of per-problem scores (sample standard deviation / sqrt(n)).

    With ~50 problems a family's pass@1 moves by several points from one draw of problems to another;
    this says by about how much (lm-evaluation-harness prints the same figure beside every score)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def problems_digest(ids: Sequence[str]) -> str:
    """A short fingerprint of which problems were scored, in order: two evaluations whose digests
    match scored the same problems, so their per-problem scores can be compared pair by pair."""
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- sample sources
def chat_prompt_ids(
    tokenizer: Any, prompt: str | Sequence[dict[str, str]], thinking: bool = True
) -> list[int]:
    """The token ids the model sees for a question, or a chat ending in one (`Problem.messages`), with
    the think block opened (or closed: V3.1)."""
    kw = {} if thinking else {"thinking": False}  # only then, so any apply_chat_template will do
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw))


def check_prompts_fit(prompts: Iterable[tuple[Any, Sequence[int]]], context: int) -> None:
    """Refuse the problems of (problem, prompt ids) `prompts` that leave no room to answer in `context`
    tokens, naming them: one ended the whole evaluation (a GRPO run at the step that drew it, unsaved)
    with the engine's error, which named no problem. Said before any sample is drawn, with the sizes."""
    over = [f"{p.id} {p.prompt[:30]!r} ({len(ids)} tokens)" for p, ids in prompts if len(ids) >= context]
    if over:
        raise ValueError(
            f"{len(over)} problem{'s leave' if len(over) != 1 else ' leaves'} no room to answer in the "
            f"model's context of {context} tokens: {', '.join(over[:5])}{', ...' * (len(over) > 5)}; "
            "shorten them or leave them out of the task"
        )


def prompt_opens_think(tokenizer: Any, thinking: bool = True) -> bool:
    """Whether the chat template's generation prompt opens the think block, so that a completion begins
    inside it (R1's, R1-Distill's). Another family's (Qwen2.5's ChatML, Llama 3's) does not: a completion
    is then an answer unless the model opens a think block itself, as `chat` and `serve` read it. With
    thinking=False, whether it opens the block all the same (R1-Distill's has no non-thinking mode)."""
    kw = {} if thinking else {"thinking": False}  # as `chat_prompt_ids` renders the prompts
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}], add_generation_prompt=True, tokenize=False, **kw
    )
    return text.rstrip().endswith(getattr(tokenizer, "think_start", THINK_START))


def engine_generate(
    engine: Any,
    prompt_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    progress: bool | str = False,
    seeds: Sequence[int] | None = None,
    sampling: dict[str, float] | None = None,
) -> list[Any]:
    """All prompts in one engine queue (continuous batching); returns Completions in prompt order.

    With a seed, request i samples with seed + i (the engine's rule), so repeated prompts (k samples of
    one problem, G of one GRPO group) draw different samples, reproducibly; `seeds` gives each prompt
    its own instead (several evaluations in one queue, each numbered as it would be alone).
    `sampling`: further SamplingParams fields (top_k, min_p, repetition_penalty).
    """
    import dataclasses

    from nanoseek.engine import SamplingParams

    params: Any = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=list(stop_token_ids),
        seed=seed,
        **(sampling or {}),  # type: ignore[arg-type]  # (as in engine.sampling.SamplerState)
    )
    if seeds is not None:
        params = [dataclasses.replace(params, seed=s) for s in seeds]
    prompts = [list(p) for p in prompt_ids]
    if not progress:
        return engine.generate_detailed(prompts, params)
    from nanoseek.metrics import progress_bar

    desc = progress if isinstance(progress, str) else "sampling"
    with progress_bar(total=len(prompts), desc=desc, leave=False) as bar:
        return engine.generate_detailed(prompts, params, on_finish=lambda _: bar.update(1))


def strip_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


class CheckpointSampler:
    """k samples per problem from a checkpoint through the engine. Called with one problem list (one
    evaluation), or `many` with several (several tasks of one checkpoint in one engine queue)."""

    def __init__(self, cfg: EvalConfig, samples: int | None = None) -> None:
        from nanoseek.checkpoint import load_model, resolve_checkpoint
        from nanoseek.engine import Engine
        from nanoseek.engine.sampling import generation_defaults
        from nanoseek.perf import default_device
        from nanoseek.tokenizer import checkpoint_tokenizer

        self.cfg = cfg
        self.path = resolve_checkpoint(cfg.model)
        self.tok = checkpoint_tokenizer(self.path)  # one from another model: said before the weights load
        self.opens_think = prompt_opens_think(self.tok, cfg.thinking)
        if not cfg.thinking and self.opens_think:
            # R1-Distill's template opens the think block whatever the flag: the model reasoned anyway and its
            # reasoning was scored as the answer. Refused, as `chat --no-think` and the server refuse it.
            raise ValueError(
                f"--no-think: {cfg.model}'s chat template has no non-thinking mode (its prompt opens "
                f"{getattr(self.tok, 'think_start', THINK_START)} either way); evaluate it without the flag"
            )
        # the checkpoint's generation_config.json settings that eval has no flag for (a Qwen fine-tune's
        # top_k 20, repetition_penalty 1.05): `nanoseek serve` (and vLLM) sample with them, so the same
        # model scored through its server and here drew differently (temperature, top_p and the answer's
        # length are eval's own: the benchmark's settings, as lm-evaluation-harness keeps its max_gen_toks)
        own = ("temperature", "top_p", "max_new_tokens")
        given = {k: v for k, v in self.tok.generation_config.items() if k not in own}
        self.sampling = generation_defaults(given, self.path / "generation_config.json")
        self.sampling.pop("temperature", None)  # do_sample false: greedy, where eval's --temperature rules
        model = load_model(
            self.path, dtype=cfg.dtype, device=cfg.device or default_device(), quantize=cfg.quantize
        ).eval()
        self.dtype = str(model.dtype).removeprefix("torch.")  # what "auto" picked, for the report
        batch = cfg.max_batch_size or min(DEFAULT_MAX_BATCH, samples or cfg.n * cfg.k)
        self.engine = Engine(model, max_batch_size=batch, pack_weights=True)
        self.stop = list(self.tok.stop_token_ids)

    def __call__(self, problems: Sequence[Any]) -> list[list[Sample]]:
        return self.many([problems])[0]

    def many(self, problem_sets: Sequence[Sequence[Any]]) -> list[list[list[Sample]]]:
        """Every set's samples in one engine queue, each set's request i sampling with seed + i as it
        would alone: the samples are the ones separate calls draw, for about the time of the longest
        answer of all on a GPU (a decode step there costs about the same for one sequence or hundreds)."""
        cfg, tok, k = self.cfg, self.tok, self.cfg.k
        each = [(p, chat_prompt_ids(tok, p.messages, cfg.thinking)) for s in problem_sets for p in s]
        ctx = self.engine.max_seq_len
        check_prompts_fit(each, ctx)
        short = sum(len(ids) + cfg.max_new_tokens > ctx for _, ids in each)
        if short:  # else only the truncation warning speaks, and it blames --max-new-tokens
            warnings.warn(
                f"{short} of {len(each)} problems leave fewer than --max-new-tokens {cfg.max_new_tokens} "
                f"tokens to answer in the model's context of {ctx}: their answers stop at the context, "
                "however high --max-new-tokens is",
                stacklevel=2,
            )
        prompts = [ids for _, ids in each for _ in range(k)]
        seeds = [cfg.seed + i for s in problem_sets for i in range(len(s) * k)]
        outs = engine_generate(
            self.engine,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_token_ids=self.stop,
            seeds=seeds,
            progress="eval samples" if cfg.progress else False,
            sampling=self.sampling,
        )
        flat = [
            Sample(
                text=tok.decode(strip_stop(o.token_ids, self.stop), skip_special_tokens=True),
                num_tokens=len(o.token_ids),
                finish_reason=o.finish_reason,
            )
            for o in outs
        ]
        out, at = [], 0
        for s in problem_sets:
            out.append([flat[at + i * k : at + (i + 1) * k] for i in range(len(s))])
            at += len(s) * k
        return out


def checkpoint_sampler(cfg: EvalConfig) -> tuple[Callable[[Sequence[Any]], list[list[Sample]]], str]:
    sampler = CheckpointSampler(cfg)
    return sampler, str(sampler.path)


def _not_json(base: str, body: str) -> ValueError:
    # a web page where the API was looked for (a chat UI's port, a path short of /v1 on a proxy)
    return ValueError(
        f"{base} answered with a body that is not JSON ({body.strip()[:80]!r}): is {base} the API's base "
        "URL (most end in /v1)?"
    )


@contextlib.contextmanager
def _endpoint_errors(base: str, retries: int = 0, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """The endpoint's failures as one clear line (the CLI's ValueError), not the client's traceback.
    `retries`: the client's, said with the failures it retries (timeouts, 408, 409, 429, 5xx);
    `timeout`: its seconds per try."""
    import openai

    tries = f", {retries + 1} times" if retries else ""
    try:
        yield
    except json.JSONDecodeError as e:
        raise _not_json(base, e.doc) from None
    except openai.APITimeoutError:
        # a subclass of the connection error, whose "is the server running?" misled: it was, and slow
        raise ValueError(
            f"{base} did not answer within {timeout:g} s{tries}: a server slower than that (long answers, "
            "a long queue) is given more with --timeout, or asked for fewer samples at once with a lower "
            "--concurrency"
        ) from None
    except openai.APIConnectionError as e:
        raise ValueError(f"cannot reach {base} ({e}): is the server running, and is the URL right?") from None
    except openai.AuthenticationError:
        raise ValueError(f"{base} refused the API key (401): pass --api-key or set OPENAI_API_KEY") from None
    except openai.APIStatusError as e:
        retried = e.status_code in (408, 409, 429) or e.status_code >= 500
        raise ValueError(f"{base} answered {e.status_code}{tries * retried}: {e.message}") from None


def completion_text(message: Any, thinking: bool = True, finish_reason: str | None = None) -> str:
    """A chat message's text as the model wrote it, to be scored as a checkpoint's completion is.

    A server that splits the reasoning off sends `reasoning_content` (DeepSeek's API, nanoseek serve,
    vLLM's reasoning parsers); with the think block opened by the prompt, its content is what came
    after the model's `</think>`, also when the reasoning before it was empty (null). The opening
    `<think>` is the prompt's, not the model's: a `<think>` the model wrote anyway stays where it was.
    vLLM >= 0.10, OpenRouter and Ollama name the field `reasoning`: read as `reasoning_content` is."""
    extra = message.model_extra or {}
    fields = [f for f in ("reasoning_content", "reasoning") if f in extra]
    reasoning = next((extra[f] for f in fields if extra[f]), None)
    content = message.content or ""
    if thinking and fields:
        # a server that left the reasoning in the content: closed, or opened by the model and never
        # closed (vLLM's qwen3 parser, a truncated answer): a </think> put before that was the think
        # text read as the answer, its language 0 and its numbers a cons@k vote. Cut by max_tokens with
        # no reasoning given, it is the think block the prompt opened (vLLM without a reasoning parser
        # still sends `reasoning_content: null`; with one, the cut thinking is the reasoning)
        cut = finish_reason == "length"
        if not reasoning and (THINK_END in content or content.lstrip().startswith(THINK_START) or cut):
            return content
        return f"{reasoning or ''}{THINK_END}{content}"
    return f"{THINK_START}{reasoning}{THINK_END}{content}" if reasoning else content


# The model list: a route every live server answers at once, its generation queue full or not (vLLM's
# API process, nanoseek serve's event loop): a server that leaves it unanswered this long is hung (or
# still loading), said in seconds, not after --timeout x its retries
LISTING_TIMEOUT = 10.0
LISTING_RETRIES = 2


def endpoint_sampler(
    cfg: EvalConfig, http_client: Any = None
) -> tuple[Callable[[Sequence[Any]], list[list[Sample]]], str]:
    """Samples from an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, nanoseek serve, ...)."""
    from urllib.parse import urlsplit

    import openai

    base = cfg.model.rstrip("/")
    # a bare host:port gets the OpenAI path; a URL with a path is the base URL itself, as the OpenAI
    # SDK takes it: with /v1 added, Gemini's .../v1beta/openai could not be evaluated at all
    if not urlsplit(base).path:
        base += "/v1"
    timeout = DEFAULT_TIMEOUT if cfg.timeout is None else cfg.timeout
    retries = SAMPLE_RETRIES if cfg.retries is None else cfg.retries
    # connecting keeps the OpenAI client's 5 s: a host that drops the connection is not waited for as an
    # answer is
    connect = min(timeout, 5.0)
    client = openai.OpenAI(
        base_url=base,
        api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
        http_client=http_client,
        max_retries=LISTING_RETRIES,
        timeout=openai.Timeout(timeout, connect=connect),
    )
    model_name = cfg.endpoint_model
    if model_name is None:
        listing_timeout = min(timeout, LISTING_TIMEOUT)
        listing = client.with_options(timeout=openai.Timeout(listing_timeout, connect=connect))
        with _endpoint_errors(base):
            try:
                # the body read as JSON first: a web page's text made the client's page parsing raise
                # an AttributeError, a traceback that named no URL
                raw = listing.models.with_raw_response.list()
                json.loads(raw.text)
                listed = [m.id for m in raw.parse().data]
            except openai.NotFoundError:
                raise ValueError(
                    f"{base}/models answered 404: is {base} the API's base URL (most end in /v1)? "
                    "A server without that route is given the model's name with --model-name"
                ) from None
            except openai.APITimeoutError:
                raise ValueError(
                    f"{base}/models did not answer within {listing_timeout:g} s, {LISTING_RETRIES + 1} times: "
                    f"is the server at {base} hung, or still loading its model?"
                ) from None
        if not listed:
            raise ValueError(f"{base}/models lists no model: name the one to evaluate with --model-name")
        model_name = listed[0]

    # a 429 says "later" (a rate limit, a server's full queue), not "failed": the client's 2 retries
    # (about 2 s, or twice its Retry-After) ended the whole evaluation, every sample drawn lost;
    # lm-evaluation-harness and simple-evals retry more (the latter a rate limit until it passes)
    sampling = client.with_options(max_retries=retries)
    one_choice = threading.Event()  # set: the server takes n = 1 only (shared by the requests in flight)

    def one(index: int, problem: Any) -> list[Sample]:
        out: list[Sample] = []
        max_tokens: Any = cfg.max_new_tokens
        # a server that ignores n (Ollama's) answers with fewer choices: the rest are asked for again,
        # numbered on from those it gave (simple-evals asks for each sample alone)
        while len(out) < cfg.k:
            n = 1 if one_choice.is_set() else cfg.k - len(out)
            with _endpoint_errors(base, retries, timeout):
                try:
                    resp = sampling.chat.completions.create(
                        model=model_name,
                        messages=problem.messages,
                        n=n,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        max_tokens=max_tokens,
                        # choice j of problem i samples with seed + i*k + j (nanoseek serve: seed + choice),
                        # as a checkpoint's sample i*k + j does in-process, not every problem the same seeds
                        seed=cfg.seed + index * cfg.k + len(out),
                        # only said when off, so servers that know no chat_template_kwargs are sent nothing new
                        extra_body=None if cfg.thinking else {"chat_template_kwargs": {"thinking": False}},
                    )
                except openai.BadRequestError as e:
                    # A prompt within --max-new-tokens of the context: OpenAI's rule (vLLM's, nanoseek
                    # serve's) refuses the request, which ended the whole evaluation, where a checkpoint's
                    # answer stops at the context. Without max_tokens those servers answer up to the
                    # context, that is fewer tokens than asked; a prompt over it is refused again.
                    if e.code == "context_length_exceeded" and max_tokens is not openai.NOT_GIVEN:
                        max_tokens = openai.NOT_GIVEN
                        continue
                    if n == 1:
                        raise
                    one_choice.set()  # llama-server's refusal of n > 1 is a 400 in some versions
                    continue
                except openai.InternalServerError as e:
                    # llama.cpp's llama-server refuses n > 1 ("Only one completion choice is allowed",
                    # a 500 in others), which ended every evaluation at k > 1: each sample is asked for
                    # alone from then on, as from a server that ignores n; a refusal of n = 1 is raised
                    if n == 1 or e.status_code != 500:
                        raise
                    one_choice.set()
                    continue
            if isinstance(resp, str):  # the client's answer to a body that is not JSON: its text
                raise _not_json(base, resp)
            if not resp.choices:
                # an error some proxies send with status 200: said, as any other status's message is
                error = (resp.model_extra or {}).get("error")
                said = error.get("message", error) if isinstance(error, dict) else error
                raise ValueError(
                    f"{base} answered a chat completion with no choices{f': {said}' if said else ''}"
                )
            tokens = getattr(resp.usage, "completion_tokens", None)
            per = None if tokens is None else tokens / len(resp.choices)
            # in index order, which is seed order (seed + choice): cons@k's tie goes to the earliest sample
            for ch in sorted(resp.choices, key=lambda c: getattr(c, "index", None) or 0)[: cfg.k - len(out)]:
                text = completion_text(ch.message, cfg.thinking, ch.finish_reason)
                out.append(Sample(text=text, num_tokens=per, finish_reason=ch.finish_reason))
        return out

    def sample(problems: Sequence[Any]) -> list[list[Sample]]:
        from nanoseek.metrics import progress_bar

        # ThreadPool, not ThreadPoolExecutor: its workers are daemon threads, and leaving the block
        # drops the requests not yet answered. An executor's workers are joined at exit, so Ctrl-C (or
        # one problem's error) waited for every request in flight, as long as the longest generation.
        with (
            ThreadPool(cfg.concurrency or DEFAULT_CONCURRENCY) as pool,
            progress_bar(
                total=len(problems) * cfg.k, desc="eval samples", leave=False, disable=not cfg.progress
            ) as bar,
        ):
            out: list[list[Sample]] = []
            answers = pool.imap(lambda args: one(*args), enumerate(problems))
            while True:
                try:
                    # a bounded wait: the kernel may deliver Ctrl-C's SIGINT to a request's thread, and
                    # then nothing interrupts an unbounded one before the next answer (a whole generation)
                    samples = answers.next(timeout=0.2)
                except multiprocessing.TimeoutError:
                    continue
                except StopIteration:
                    return out
                out.append(samples)
                bar.update(len(samples))

    return sample, f"{base} ({model_name})"


# ------------------------------------------------------------------------------------ driver
def eval_problems(cfg: EvalConfig) -> tuple[Any, list[Any]]:
    """The task and its problems an evaluation scores (checked settings)."""
    from nanoseek.data.tasks import get_task
    from nanoseek.engine.sampling import refuse_identical_samples

    if cfg.k < 1 or cfg.n < 1:
        raise ValueError(f"k and n must be >= 1 (got k={cfg.k}, n={cfg.n})")
    if not 0 <= cfg.temperature < math.inf:  # (NaN too) said now, not once the model has loaded
        raise ValueError(f"--temperature must be >= 0 and finite, got {cfg.temperature}")
    refuse_identical_samples(cfg.temperature, cfg.k, "-k", "a problem")
    if cfg.split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {cfg.split!r}")
    if cfg.max_batch_size is not None and cfg.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1 (or left out), got {cfg.max_batch_size}")
    if cfg.concurrency is not None and cfg.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1 (or left out), got {cfg.concurrency}")
    if cfg.timeout is not None and not 0 < cfg.timeout < math.inf:  # NaN fails too
        raise ValueError(f"--timeout must be a number of seconds > 0 (or left out), got {cfg.timeout}")
    if cfg.retries is not None and cfg.retries < 0:
        raise ValueError(f"--retries must be >= 0 (or left out), got {cfg.retries}")
    # a flag of the other kind of model would do nothing: refused, not ignored
    if cfg.model.startswith(("http://", "https://")):
        unused = {
            "--dtype": cfg.dtype != "auto",
            "--device": cfg.device is not None,
            "--quantize": cfg.quantize is not None,
            "--max-batch-size": cfg.max_batch_size is not None,
            "--threads": cfg.threads is not None,
        }
        applies = "a checkpoint (the server decides for a URL)"
    else:
        unused = {
            "--model-name": cfg.endpoint_model is not None,
            "--api-key": cfg.api_key is not None,
            "--concurrency": cfg.concurrency is not None,
            "--timeout": cfg.timeout is not None,
            "--retries": cfg.retries is not None,
        }
        applies = "an http(s) URL"
    if any(unused.values()):
        given = [flag for flag, set_ in unused.items() if set_]
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{' and '.join(given)} {verb} only to {applies}, not to {cfg.model}")
    if not cfg.model.startswith(("http://", "https://")) and (cfg.device or cfg.quantize):
        # a device this machine lacks, or w8a8 off a CPU: said now, as generate and serve say them, not
        # after a Hub name's whole download
        from nanoseek.checkpoint import resolve_device
        from nanoseek.engine.quantize import check_quantize_device
        from nanoseek.perf import default_device

        device = resolve_device(cfg.device or default_device())
        if cfg.quantize:
            check_quantize_device(cfg.quantize, device)
    if cfg.out and Path(cfg.out).is_dir():  # said now, not once every sample is drawn
        raise ValueError(
            f"--out {cfg.out} is a directory: it takes the report's file, such as "
            f"{Path(cfg.out) / f'eval_{slug(cfg.task)}.json'}"
        )
    if not cfg.model.startswith(("http://", "https://")) and Path(cfg.model).expanduser().is_file():
        # a file for the checkpoint (a GGUF export) said as every command says it: the report's default
        # place beside it read "cannot write the report model.gguf/eval_arithmetic.json: Not a directory"
        from nanoseek.checkpoint import resolve_checkpoint

        resolve_checkpoint(cfg.model)
    # said now too: a checkpoint on a read-only disk (a shared model directory) got no report, and no
    # scores printed, after every sample had been drawn. Both places at once: on such a disk the
    # default of each is refused, and naming the one left the other for a second try to find.
    _, run_dir, out = _outputs(cfg)
    refused = []
    for directory, what, flag in (
        (out.parent, f"the report {out}", "--out FILE"),
        (run_dir, "metrics.jsonl", "--run-dir DIR"),
    ):
        try:
            if directory is not None:
                check_writable(directory)
        except OSError as e:
            refused.append(f"{what} in {e.filename}: {e.strerror} (name another place with {flag})")
    if refused:
        raise ValueError(f"cannot write {', nor '.join(refused)}")
    task = get_task(cfg.task)
    return task, task.problems(cfg.split, cfg.n, seed=cfg.seed, language=cfg.language)


def _outputs(cfg: EvalConfig) -> tuple[str, str | None, Path]:
    """What the report calls the model evaluated, the run directory whose metrics.jsonl gets the record
    (None: none), and the report's file."""
    from nanoseek.checkpoint import is_hub_name

    # a score on training problems by a name of its own: under the held-out report's it replaced it
    name = f"eval_{slug(cfg.task)}{'' if cfg.split == 'test' else f'_{cfg.split}'}.json"
    if cfg.model.startswith(("http://", "https://")) or is_hub_name(cfg.model):
        # no directory of the user's to write beside
        evaluated, run_dir, default_out = cfg.model, cfg.run_dir, Path(name)
    else:
        # the directory the weights are read from (`~`, a copy a crash mid-save left aside): a report
        # written at the checkpoint's own path there made a directory of it alone, which hid the copy
        # from every reader, and the next save or resume deleted the copy as a finished swap's leftover
        ck = Path(cfg.model).expanduser()
        # named and placed from the absolute path, as written (a link not followed: its run directory is
        # the link's): `eval .` in the checkpoint was named "" and wrote metrics.jsonl into it, not its RUN
        full = Path(os.path.abspath(ck))
        evaluated, run_dir, default_out = (
            full.name,
            cfg.run_dir or str(full.parent),
            directory_to_read(ck) / name,
        )
    return evaluated, run_dir, Path(cfg.out) if cfg.out else default_out


# what evaluations of one checkpoint must share to draw their samples in one engine queue
SHARED_SAMPLING = (
    *("model", "k", "temperature", "top_p", "max_new_tokens", "thinking", "seed"),
    *("dtype", "device", "quantize"),  # the one model load's
)


def evaluate_many(cfgs: Sequence[EvalConfig]) -> list[dict]:
    """`evaluate` for several tasks of one checkpoint: one model load, and all their samples in one
    engine queue (the ones each evaluation alone would draw: `CheckpointSampler.many`)."""
    if not cfgs:
        return []
    first = cfgs[0]
    for c in cfgs[1:]:
        differ = [f for f in SHARED_SAMPLING if getattr(c, f) != getattr(first, f)]
        if differ:
            raise ValueError(f"evaluate_many: {c.task} differs from {first.task} in {', '.join(differ)}")
    if first.model.startswith(("http://", "https://")):
        return [evaluate(c) for c in cfgs]
    drawn = [eval_problems(c) for c in cfgs]
    sampler = CheckpointSampler(first, samples=sum(len(p) for _, p in drawn) * first.k)
    t0 = time.perf_counter()
    sets = sampler.many([p for _, p in drawn])
    # each record says its samples were drawn together with the others', in this much time
    shared = {
        "generation_time_s": round(time.perf_counter() - t0, 2),
        "sampled_with": [c.task for c in cfgs],
        "dtype": sampler.dtype,
        **({"sampling_defaults": sampler.sampling} if sampler.sampling else {}),
    }

    def given(samples: list[list[Sample]]) -> Callable[[Sequence[Any]], list[list[Sample]]]:
        return lambda problems: samples

    return [
        evaluate(
            c, given(s), source=str(sampler.path), shared=shared, opens_think=sampler.opens_think, drawn=d
        )
        for c, s, d in zip(cfgs, sets, drawn, strict=True)
    ]


def evaluate(
    cfg: EvalConfig,
    sampler: Callable[[Sequence[Any]], list[list[Sample]]] | None = None,
    source: str | None = None,
    shared: dict[str, Any] | None = None,
    opens_think: bool | None = None,
    drawn: tuple[Any, list[Any]] | None = None,
) -> dict:
    """Score a checkpoint or endpoint on a task's held-out split; writes JSON and appends metrics.jsonl.
    `shared`: figures of a queue these samples were drawn in with others' (`evaluate_many`).
    `opens_think`: whether the prompts opened the think block (default: a checkpoint's template says;
    an endpoint's samples are rebuilt as completions of a prompt that did, `completion_text`).
    `drawn`: `eval_problems(cfg)` already drawn (`evaluate_many`): drawn again, a JSONL task smaller than
    --n said so twice."""
    from nanoseek.data.rewards import build_reward
    from nanoseek.metrics import MetricsLog

    is_url = cfg.model.startswith(("http://", "https://"))
    task, problems = drawn or eval_problems(cfg)
    if sampler is None:
        sampler, source = endpoint_sampler(cfg) if is_url else checkpoint_sampler(cfg)
    else:
        source = source or cfg.model
    if opens_think is None:
        opens_think = getattr(sampler, "opens_think", cfg.thinking)
    reward = build_reward(EVAL_PARTS, task=task, prompt_opened_think=opens_think)
    t0 = time.perf_counter()
    samples = sampler(problems)
    gen_time = time.perf_counter() - t0
    metrics, per_problem = score_samples(task, reward, problems, samples, opens_think)
    score_time = time.perf_counter() - t0 - gen_time
    if shared:  # samples drawn before, in a queue shared with other tasks: that queue's time is theirs
        gen_time = shared["generation_time_s"]
    metrics.update(
        task=cfg.task,
        split=cfg.split,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        thinking=cfg.thinking,
        source=source,
        wall_time_s=round(gen_time + score_time, 2),  # drawing the samples and scoring them
        generation_time_s=round(gen_time, 2),
    )
    if hasattr(sampler, "dtype"):  # a checkpoint's: the precision that ran ("auto" picks by the machine)
        metrics["dtype"] = sampler.dtype
    if cfg.quantize:  # the weights scored: an int8 model's pass@1 is not its bf16 one's
        metrics["quantize"] = cfg.quantize
    # a checkpoint's generation_config.json settings it sampled with
    if sampling := getattr(sampler, "sampling", None):
        metrics["sampling_defaults"] = sampling
    metrics.update(shared or {})
    evaluated, run_dir, out = _outputs(cfg)
    metrics["evaluated"] = evaluated
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out,
        json.dumps(
            # the API key is a secret: a report is a file people share
            {
                "config": {**asdict(cfg), "api_key": cfg.api_key and "<redacted>"},
                "metrics": metrics,
                "problems": per_problem,
            },
            indent=2,
            ensure_ascii=False,
            # a Python caller's paths (`out=Path(...)`) as text, not a TypeError once every sample was drawn
            default=os.fspath,
        ),
    )
    metrics["json"] = str(out)
    if run_dir:
        scored = [rec for rec in per_problem if "pass@1" in rec]
        MetricsLog(run_dir, "eval").log(
            step=None,
            checkpoint=source,
            evaluated_stage=evaluated,
            **{k: v for k, v in metrics.items() if k != "json"},
            # per problem, for paired comparisons between stages (the report's intervals on GRPO's gain)
            **{"pass@1_per_problem": [round(rec["pass@1"], 4) for rec in scored]},
            problems_digest=problems_digest([rec["id"] for rec in scored]),
        )
    return metrics


# a task's part of a file name (`eval_<slug>.json`, a speedrun's `<stage>_<slug>`), in bytes
SLUG_MAX = 200


def slug(name: str) -> str:
    """A task spec as a file name: `arithmetic?ops=add` -> `arithmetic_ops_add`. Letters of any script
    are kept (`jsonl:算数.jsonl` -> `jsonl_算数.jsonl`): ASCII only, every Japanese or Chinese file name
    was `jsonl_.jsonl`, and one task's report overwrote another's. Cut short (with a digest) to leave a
    report's name room in the file system's 255 bytes: a `jsonl:` task by a long path was refused its
    report, "File name too long", once every sample was drawn."""
    return cut_name(re.sub(r"[^\w.-]+", "_", name), SLUG_MAX)
