"""Distillation the R1 way: sample reasoning traces from a teacher, keep the correct ones, SFT a student.

What is notable here:
- Rejection sampling (R1 §2.3.3): k samples per prompt from the teacher through the batched Engine
  (all prompts × k in one queue), scored by the task's own verifier; only correct traces are kept, at
  most `keep_per_prompt` distinct ones per prompt.
- The kept traces are trained on token for token as the teacher produced them (no decode/re-encode
  round trip), and written to RUN/distill_data.jsonl as chat messages so they can be inspected or reused
  with `nanoseek sft --data`. Their token ids and the sampling settings go to RUN/distill_traces.json:
  `--resume` trains on those instead of sampling the teacher again (refused if the settings changed).
- A student built from a preset takes the teacher's tokenizer (vocab size, BOS/EOS ids from it): a
  distilled model must speak the same tokens as its teacher.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanoseek.atomic import atomic_write, check_out
from nanoseek.config import ModelConfig
from nanoseek.data.tasks import check_training_tasks, prescore, split_task_list
from nanoseek.engine.sampling import SamplingParams, refuse_identical_samples
from nanoseek.options import check_choices, option, path, shell_quoted, torch_seed
from nanoseek.train.sft import SFTConfig, check_seq_len, completion_example, train_on_examples

if TYPE_CHECKING:
    from nanoseek.model.transformer import DeepSeekV3


@dataclass
class DistillConfig:
    teacher: str = option(
        help="teacher checkpoint directory (with tokenizer files) or Hub name (owner/name)", parse=path
    )
    student: str = option(
        help="student checkpoint directory, Hub name (owner/name) or preset (tiny-dense, small, ...)",
        parse=path,
    )
    tasks: list[str] = option(help="task name(s), comma-separated", flag="--task", parse=split_task_list)
    k: int = option(4, "samples per prompt", flag="-k")
    prompts: int = option(256, "training prompts per task, at most (a task with fewer gives all it has)")
    keep_per_prompt: int = option(2, "distinct correct traces kept per prompt")
    # When the teacher solves nothing (e.g. a smoke-sized run), train on the tasks' reference worked
    # solutions instead of failing; the switch is printed and logged as `fallback`.
    fallback_reference: bool = option(
        False, "train on the tasks' reference solutions when the teacher solves nothing"
    )
    max_new_tokens: int = option(256)
    # the teacher's sampling: a flag left out (None) takes the teacher's generation_config.json value,
    # else TEACHER_SAMPLING's (`teacher_sampling`)
    temperature: float | None = option(
        None, "the teacher's sampling temperature (default: its generation_config.json's, else 0.7)"
    )
    top_p: float | None = option(None, "(default: the teacher's generation_config.json, else 0.95)")
    top_k: int | None = option(None, "(default: the teacher's generation_config.json, else 0: off)")
    min_p: float | None = option(None, "(default: the teacher's generation_config.json, else 0: off)")
    repetition_penalty: float | None = option(
        None, "(default: the teacher's generation_config.json, else 1: off)"
    )
    out: str = option("runs/distill", "run directory", parse=path)
    seed: int = option(0, parse=torch_seed)
    language: str | None = option(None, "only prompts in this language (en, ja, zh)")
    max_batch_size: int = option(64, "engine: sequences decoded together")
    sft: SFTConfig = option(factory=lambda: SFTConfig(init=""), cli=False)


# the teacher's sampling where neither a flag nor its generation_config.json names a value
TEACHER_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def teacher_sampling(cfg: DistillConfig, generation_config: dict, source: object) -> DistillConfig:
    """`cfg` with the teacher's sampling settled: a flag given, else the teacher's generation_config.json
    value (the setting its authors sample it with: R1-Distill's 0.6 / 0.95, Qwen2.5's top_k 20, as
    `generate` and `serve` read it), else TEACHER_SAMPLING's. Its `do_sample: false` is not taken:
    rejection sampling draws k different samples, and every checkpoint nanoseek trains says it."""
    from nanoseek.engine.sampling import generation_defaults

    left_out = [k for k in TEACHER_SAMPLING if getattr(cfg, k) is None]
    # only the values used: a bad one the flag replaces is the user's fix for it
    file = generation_defaults({k: v for k, v in generation_config.items() if k in left_out}, source)
    if file:
        shown = ", ".join(f"{k}={v}" for k, v in file.items())
        print(f"distill: the teacher samples with its generation_config.json's {shown}")
    settled: dict[str, Any] = {k: file.get(k, TEACHER_SAMPLING[k]) for k in left_out}
    return dataclasses.replace(cfg, **settled)


def build_student(student: str, tokenizer: Any, seed: int = 0) -> DeepSeekV3:
    """A student from a checkpoint (must share the tokenizer's vocabulary) or a preset sized to it."""
    from nanoseek.checkpoint import build_model, load_model
    from nanoseek.perf import default_device

    p = _student_path(student)
    if (p / "config.json").exists():
        _check_student_tokens(p, tokenizer)
        return load_model(p, device=default_device())
    cfg = _student_preset(student, p).replace(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        # distillation (SFT on traces) trains the main head alone: a preset's MTP module (tiny's) was
        # saved at its random init, and `--speculative` drafted with it as if trained
        num_nextn_predict_layers=0,
    )
    return build_model(cfg, device=default_device()).init_weights(seed)


def _student_path(student: str) -> Path:
    """--student as a path: a local path or Hub name (owner/name) resolves as --teacher's does; a preset
    name, which has no slash, is no path."""
    from nanoseek.checkpoint import resolve_checkpoint

    # `~/models/qwen` (`--student=~/...`, which the shell leaves as it is) and a mistyped /path were read as
    # an unknown preset's name; --teacher's errors name a missing directory. A bare name without config.json
    # is a preset's (`_student_preset` refuses a directory of another name)
    if "/" in student or student.startswith("~") or (Path(student) / "config.json").exists():
        return resolve_checkpoint(student, flag="--student")
    return Path(student)


# a tokenizer's files in the formats transformers' slow tokenizers read (Llama 2's sentencepiece, GPT-2's BPE)
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def _check_student_tokens(p: Path, tokenizer: Any) -> None:
    """A student checkpoint is trained on the teacher's token ids: its vocabulary must hold the teacher's
    tokens at the same ids (a Qwen2.5 or Llama 3 checkpoint with its own tokenizer would be trained on
    ids that mean other tokens to it, and saved with the teacher's tokenizer in place of its own)."""
    from nanoseek.config import read_json_object
    from nanoseek.tokenizer import load_tokenizer, tokens_moved

    # its own tokenizer first: a Llama 3 student of an R1 teacher (128,256 < 129,280 rows) was told only
    # that its vocab_size is too small, not that it speaks other tokens and what to do instead
    if (p / "tokenizer.json").exists():
        other = tokens_moved(tokenizer, load_tokenizer(p))
        if other:
            # a refused run samples nothing: the traces' text comes from a run into a preset
            raise ValueError(
                f"student {p} has another tokenizer than the teacher's ({len(other)} of its {tokenizer.vocab_size} "
                f"tokens are not the student's at the same ids, e.g. {other[:3]}), and distillation trains on "
                "the teacher's token ids: distil into a preset (--student tiny-qwen2), which also writes "
                "RUN/distill_data.jsonl, and train this student with its own tokenizer on the traces' text: "
                f"nanoseek sft --init {shell_quoted(p)} --data RUN/distill_data.jsonl"
            )
    else:
        # a tokenizer only in the slow formats (sentencepiece, vocab.json) cannot be compared: it was taken
        # as none, the student trained on ids that mean other tokens to it
        own = sorted(x.name for x in p.iterdir() if x.name in SLOW_TOKENIZER_FILES)
        if own:
            raise ValueError(
                f"student {p} has its own tokenizer ({', '.join(own)}) but no tokenizer.json to check it against "
                "the teacher's: write it (transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) "
                "or distil into a preset (--student tiny-qwen2)"
            )
    size = read_json_object(p / "config.json").get("vocab_size")
    if isinstance(size, int) and size < tokenizer.vocab_size:
        raise ValueError(
            f"student {p} has vocab_size {size} < the teacher tokenizer's "
            f"{tokenizer.vocab_size}: it cannot read the teacher's tokens"
        )


def _check_student(student: str, tokenizer: Any, seq_len: int | None = None) -> None:
    """The errors `build_student` would raise for a missing directory, an unknown preset or a student
    with another tokenizer, and the student's fine-tuning for a --seq-len past its context, up front."""
    p = _student_path(student)
    if (p / "config.json").exists():
        _check_student_tokens(p, tokenizer)
        config = ModelConfig.load(p)
    else:
        config = _student_preset(student, p)
    if seq_len is not None:
        check_seq_len(seq_len, config)


def _student_preset(student: str, p: Path) -> ModelConfig:
    """--student as a preset, where `p` holds no config.json. A directory of a preset's name is no
    student: `--student tiny-dense --out tiny-dense` made it (the run directory) after the check, and
    the student was refused as "a path without config.json" once the teacher's sampling was done."""
    from nanoseek.config import get_preset

    try:
        return get_preset(student)
    except KeyError:
        if p.exists():
            raise FileNotFoundError(f"student {p} is a path without config.json") from None
        raise


def sample_correct_traces(
    engine: Any, tokenizer: Any, tasks: list[Any], problems: list[Any], cfg: DistillConfig
) -> tuple[list[tuple[Any, list[int], list[int]]], dict[str, float]]:
    """(problem, prompt_ids, completion_ids) for the correct samples, and acceptance statistics."""
    from nanoseek.evaluate import chat_prompt_ids, engine_generate, strip_stop

    # settled by `distill` already; a caller's cfg with flags left out (None) as `distill` settles them
    cfg = teacher_sampling(
        cfg, getattr(tokenizer, "generation_config", {}), "the teacher's generation_config.json"
    )

    assert cfg.temperature is not None and cfg.top_p is not None and cfg.top_k is not None  # settled
    assert cfg.min_p is not None and cfg.repetition_penalty is not None
    stop = list(tokenizer.stop_token_ids)
    prompts = [chat_prompt_ids(tokenizer, p.messages) for p in problems]
    flat = [ids for ids in prompts for _ in range(cfg.k)]
    outs = engine_generate(
        engine,
        flat,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_token_ids=stop,
        seed=cfg.seed,
        sampling={"top_k": cfg.top_k, "min_p": cfg.min_p, "repetition_penalty": cfg.repetition_penalty},
        # minutes of sampling at the defaults (256 prompts x k = 4 per task) showed nothing at all
        progress="teacher samples" if cfg.sft.progress else False,
    )
    kept: list[tuple[Any, list[int], list[int]]] = []
    correct = 0
    prompts_with_any = 0
    texts = [tokenizer.decode(strip_stop(o.token_ids, stop), skip_special_tokens=True) for o in outs]
    # reasoning-gym answers: all scored in one sandboxed child, not one per trace below
    finished = [j for j, o in enumerate(outs) if o.finish_reason == "stop"]
    prescore([problems[j // cfg.k] for j in finished], [texts[j] for j in finished])
    for i, (task, prob) in enumerate(zip(tasks, problems, strict=True)):
        seen: set[tuple[int, ...]] = set()
        n_kept = 0
        for o, text in zip(
            outs[i * cfg.k : (i + 1) * cfg.k], texts[i * cfg.k : (i + 1) * cfg.k], strict=True
        ):
            if o.finish_reason != "stop":
                continue  # a truncated trace is not a finished demonstration, whatever it contains
            if task.score(prob, text, require_think=True) < 1.0:
                continue
            correct += 1
            key = tuple(o.token_ids)
            if key in seen or n_kept >= cfg.keep_per_prompt:
                continue
            seen.add(key)
            n_kept += 1
            kept.append((prob, prompts[i], list(o.token_ids)))
        prompts_with_any += n_kept > 0
    n = max(len(problems), 1)
    stats = {
        "teacher_accuracy": correct / (n * cfg.k),
        "prompts_with_correct": prompts_with_any / n,
        "kept_traces": float(len(kept)),
    }
    return kept, stats


# DistillConfig's fields that decide which traces are sampled: a --resume reuses the traces only if these
# are unchanged (the SFT settings are the Trainer's to check).
SAMPLING_SETTINGS = (
    "tasks", "k", "prompts", "keep_per_prompt", "fallback_reference", "max_new_tokens", "temperature",
    "top_p", "top_k", "min_p", "repetition_penalty", "seed", "language",
)  # fmt: skip
# settings distill did not record before it read them: traces saved without them were sampled with them off
UNRECORDED = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _sampling_settings(cfg: DistillConfig, teacher_dir: Path) -> dict[str, Any]:
    return {"teacher": str(Path(teacher_dir).resolve()), **{k: getattr(cfg, k) for k in SAMPLING_SETTINGS}}


def _traces_to_reuse(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The traces a previous run sampled with these settings (None: there are none); a change refused."""
    from nanoseek.config import read_json_object

    if not path.exists():
        return None
    saved = read_json_object(path)
    if not isinstance(saved.get("settings"), dict) or not isinstance(saved.get("traces"), list):
        # a hand edit or a partial copy (the file is written whole): a KeyError named only the field
        raise ValueError(
            f"--resume: {path} holds no sampling settings and traces; run without --resume to sample "
            "again, or choose another --out"
        )
    # through JSON, as saved: a tuple and a list compare equal
    before = {**UNRECORDED, **saved["settings"]}
    changed = [k for k, v in json.loads(json.dumps(settings)).items() if before.get(k) != v]
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise ValueError(
            f"--resume: {path} was sampled with other settings ({shown}); run without --resume to sample "
            "again, or choose another --out"
        )
    return saved


def _reference_completion(tok: Any, worked: str, opened: bool) -> list[int]:
    """A task's worked solution as completion ids after the generation prompt: without its opening <think>
    where the prompt opened it (R1's template), whole where it did not (ChatML's, Llama 3's)."""
    text = worked.removeprefix(tok.think_start).lstrip("\n") if opened else worked
    return tok.encode(text) + [tok.eos_token_id]


def distill(cfg: DistillConfig) -> Path:
    """Rejection-sample the teacher, then SFT the student on the kept traces; returns RUN/distill/."""
    import time

    from nanoseek.checkpoint import resolve_checkpoint
    from nanoseek.perf import torch_threads
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.loop import hold_stage

    started = time.perf_counter()  # --max-seconds covers the data building: the teacher's sampling
    # the flags first: a Hub teacher is its whole download before them (offline, the Hub's error for them)
    # their types first, as the other stages check them: `tasks="arithmetic"` from Python was refused as
    # "--task names i, t more than once", and a str -k failed its comparison with a bare TypeError
    check_choices(cfg)
    if cfg.k < 1 or cfg.prompts < 1 or cfg.keep_per_prompt < 1:
        raise ValueError("-k, --prompts and --keep-per-prompt must be >= 1")
    check_training_tasks(cfg.tasks)
    if cfg.max_batch_size < 1:  # said now, as serve says it, not by the engine once the teacher has loaded
        raise ValueError(f"--max-batch-size must be >= 1, got {cfg.max_batch_size}")
    # (NaN too) said now, not by the engine once the teacher has loaded
    if cfg.temperature is not None and not 0 <= cfg.temperature < math.inf:
        raise ValueError(f"--temperature must be >= 0 and finite, got {cfg.temperature}")
    given = {k: getattr(cfg, k) for k in TEACHER_SAMPLING if getattr(cfg, k) is not None}
    # --top-p 5 too, and --max-new-tokens 0, which the engine refused only once the teacher had loaded
    SamplingParams(max_new_tokens=cfg.max_new_tokens, **given).validate()
    if cfg.temperature is not None:  # else the teacher's generation_config.json may set one
        refuse_identical_samples(cfg.temperature, cfg.k, "-k", "a prompt")
    cfg.sft.validate()  # before the teacher's sampling, not after it
    run = Path(cfg.out)
    # nor an --out it cannot write (a file, a read-only disk): the traces are its first write
    check_out(run, resume=cfg.sft.resume)
    teacher_dir = resolve_checkpoint(cfg.teacher, flag="--teacher")
    tok = load_tokenizer(teacher_dir)
    cfg = teacher_sampling(cfg, tok.generation_config, teacher_dir / "generation_config.json")
    assert cfg.temperature is not None  # settled
    refuse_identical_samples(cfg.temperature, cfg.k, "-k", "a prompt")
    # a typo in --student (or a --seq-len past its context) must not cost the whole sampling first
    _check_student(cfg.student, tok, cfg.sft.seq_len)
    torch.manual_seed(cfg.seed)
    # held from the teacher's sampling on: a second distill into --out would sample beside it for nothing
    with torch_threads(cfg.sft.threads), hold_stage(run, "distill"):  # the teacher's sampling too
        traces_path = run / "distill_traces.json"
        settings = _sampling_settings(cfg, teacher_dir)
        saved = _traces_to_reuse(traces_path, settings) if cfg.sft.resume else None
        if saved is not None:
            traces = [(t["prompt"], t["completion"]) for t in saved["traces"]]
            stats = saved["stats"]
            print(f"distill: --resume trains on the {len(traces)} traces sampled before ({traces_path})")
        else:
            traces, stats = _sample(cfg, teacher_dir, tok)
            atomic_write(
                traces_path,
                json.dumps(
                    {
                        "settings": settings,
                        "stats": stats,
                        "traces": [{"prompt": p, "completion": c} for p, c in traces],
                    }
                ),
            )
        student = build_student(cfg.student, tok, cfg.seed)
        examples = [completion_example(p, c, tok.stop_token_ids) for p, c in traces]
        return train_on_examples(
            student,
            tok,
            examples,
            run,
            "distill",
            cfg.sft,
            {"distill": {"teacher": str(teacher_dir), "student": cfg.student, "tasks": cfg.tasks, **stats}},
            started,
            start_record={"teacher": str(teacher_dir), **stats},
        )


def _sample(
    cfg: DistillConfig, teacher_dir: Path, tok: Any
) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Sample the teacher and keep its correct traces (or the reference solutions, if allowed and it
    solved nothing); writes them to RUN/distill_data.jsonl as chats. (prompt ids, completion ids) each."""
    import time

    from nanoseek.checkpoint import load_model
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tasks.base import worked_solution_of
    from nanoseek.engine import Engine
    from nanoseek.evaluate import chat_prompt_ids, check_prompts_fit, prompt_opens_think
    from nanoseek.perf import default_device

    # the problems before the teacher: a bad line of a jsonl: task was named only once it had loaded
    tasks, problems = [], []
    for name in cfg.tasks:
        task = get_task(name)
        # up to --prompts, as SFT's --task-examples: a smaller JSONL file gives all its training lines
        for p in task.problems("train", cfg.prompts, seed=cfg.seed, language=cfg.language, strict=False):
            tasks.append(task)
            problems.append(p)
    # as `generate` and `eval` load it: bf16 on a GPU (the grouped expert GEMM's fast kernel is bf16
    # only), a trained (fp32) checkpoint in fp32 on a CPU
    teacher = load_model(teacher_dir, dtype="auto", device=default_device()).eval()
    # a problem the teacher's context cannot hold ended the sampling with the engine's error, naming none
    check_prompts_fit(
        ((p, chat_prompt_ids(tok, p.messages)) for p in problems), teacher.config.max_position_embeddings
    )
    t0 = time.perf_counter()
    engine = Engine(teacher, max_batch_size=cfg.max_batch_size)
    kept, sampled = sample_correct_traces(engine, tok, tasks, problems, cfg)
    stats: dict[str, Any] = sampled  # and what stood in for the teacher's traces, if anything (a str)
    stats["sampling_time_s"] = time.perf_counter() - t0
    print(
        f"distill: teacher solved {stats['teacher_accuracy']:.1%} of {len(problems) * cfg.k} samples; "
        f"kept {len(kept)} traces ({stats['prompts_with_correct']:.0%} of prompts) in {stats['sampling_time_s']:.0f}s"
    )
    # R1's template opens the think block in the prompt; another family's (ChatML, Llama 3) leaves it to
    # the completion, which then holds it already
    opened = prompt_opens_think(tok)
    if not kept and cfg.fallback_reference:
        solutions = [(p, worked_solution_of(t, p)) for t, p in zip(tasks, problems, strict=True)]
        kept = [
            (p, chat_prompt_ids(tok, p.messages), _reference_completion(tok, text, opened))
            for p, text in solutions
            if text is not None  # a task (or JSONL line) without worked solutions
        ]
        if not kept:  # said as such: the error below told the user to pass the flag they had passed
            raise ValueError(
                "the teacher produced no correct trace, and --fallback-reference has no reference solutions to "
                f'train on: no worked solutions in {", ".join(cfg.tasks)} (a JSONL task: add "reasoning" to '
                "its lines); raise -k, the temperature or max tokens"
            )
        stats["fallback"] = "reference worked solutions (teacher solved nothing)"
        stats["kept_traces"] = float(len(kept))  # what the student trains on
        print(
            f"distill: WARNING the teacher solved nothing; training the student on {len(kept)} reference solutions",
            file=sys.stderr,  # a warning: seen where stdout goes to a log file
        )
    if not kept:
        raise ValueError(
            "the teacher produced no correct trace: nothing to distill (raise -k, the temperature or max "
            "tokens, or pass --fallback-reference to train on the tasks' reference solutions)"
        )
    del engine, teacher
    lines = []
    opening = f"{tok.think_start}\n" if opened else ""
    for prob, _, comp in kept:
        msg = {"role": "assistant", "content": opening + tok.decode(comp, skip_special_tokens=True)}
        # a chat's earlier answers (`task?turn=N`) are history, not traces: `sft --data` skips them
        history = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prob.messages]
        lines.append(json.dumps({"messages": [*history, msg]}, ensure_ascii=False) + "\n")
    atomic_write(Path(cfg.out) / "distill_data.jsonl", "".join(lines))
    return [(p, c) for _, p, c in kept], stats
