"""`nanoseek speedrun`: the whole DeepSeek recipe in one command, on the embedded data.

tokenizer → pretrain (`tiny`: MLA + MoE + MTP) → cold-start SFT → GRPO (R1's RL with rule-based
rewards) → [control: the same wall time as GRPO spent on more SFT] → distillation into a small dense
student → evaluation of every stage on held-out problems (English, Japanese, Chinese) → report.

Every stage writes RUN/<stage>/ and appends to RUN/metrics.jsonl. A finished stage leaves a
`RUN/<stage>/.done` marker, so rerunning with the same --out skips it; an interrupted training stage
resumes from its last checkpoint. RUN/speedrun.json records the preset's settings and a digest of
how this nanoseek writes the run's data; resuming with other settings, or with a nanoseek that writes
the documents or worked solutions otherwise, is refused, since it would mix two runs' stages (or two
formats) in one model and report. RUN/final is the checkpoint to chat with, serve, or load with
transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from nanoseek.atomic import atomic_directory, atomic_write, exclusive, restore_directory
from nanoseek.config import read_json_object
from nanoseek.data.tasks import as_second_turn, in_unseen_wordings, is_later_turn, is_unseen_wordings
from nanoseek.evaluate import slug
from nanoseek.metrics import MetricsLog, append_records, read_metrics
from nanoseek.options import shell_quoted
from nanoseek.report import EVAL_STAGES, STAGES, RunMetrics, pass_at_1_margin, plus_minus
from nanoseek.train import TrainingInterrupted

DONE = ".done"
STOP_WAIT_S = 10.0  # how long a stage beside another is given to stop on its own SIGTERM (`_beside`)
SETTINGS = "speedrun.json"
FORMATS = "data_formats"  # in SETTINGS: `Speedrun.data_formats()` of the nanoseek that started the run
# What a speedrun writes into RUN. A directory without SETTINGS that holds only these is taken for a
# run's first stages (a copy of them resumed with other later settings: benchmarks/README.md); one
# that holds anything else is not a speedrun, and is refused
RUN_ENTRIES = frozenset(
    {*STAGES, "final", "plots", "report.md", "metrics.jsonl", ".lock", ".student", ".control"}
    | {"distill_data.jsonl", "distill_traces.json"}
    | {f".{stage}.lock" for stage in STAGES}  # what its training stages hold (`hold_stage`)
)
# a run directory it cannot write: one clear error, and a rerun resumes once there is room
STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


# The families the `cpu` and `gpu` runs teach from worked solutions, and the one they leave to GRPO.
FAMILIES: tuple[str, ...] = (
    "addition",
    "subtraction",
    "multiplication",
    "comparison",
    "sorting",
    "counting",
    "linear_equation",
)
# The largest of three numbers composes the comparison of two; no worked solution of it is ever
# shown, so what GRPO gains there comes from the verifier alone (R1-Zero). Word problems were the
# first candidate, but a model that never saw a story prompt starts them at 0%: GRPO has no signal.
VERIFIER_ONLY: tuple[str, ...] = ("largest",)


@dataclass
class SpeedrunPreset:
    """One dial per stage; the defaults are the `cpu` preset (about 20 minutes on 2 CPU cores)."""

    name: str = "cpu"
    model: str = "tiny"
    student: str = "tiny-dense"
    # families with worked solutions: the corpus, the cold start, GRPO and the evaluation
    tasks: tuple[str, ...] = FAMILIES
    # families learned from their verifier alone (R1-Zero): never a worked solution of them in the
    # corpus or the SFT data; GRPO trains on them with the others and every stage is evaluated on them
    verifier_only_tasks: tuple[str, ...] = VERIFIER_ONLY
    # tokenizer: at most this many ids. The corpus, without the letters counting problems spell,
    # stops at 875 ids (the merges it sees twice); 4096 gave the same tokens per document, a 4x larger
    # embedding and head, and 2x slower steps
    vocab_size: int = 1024
    tokenizer_docs: int = 20000
    # pretrain: the embedded corpus of these families ("tasks" = the run's own, "all" = every family)
    pretrain_corpus: str = "tasks"
    # how many times as often as the others a family's documents are drawn ("tasks" corpus). Sorting
    # is learned in some draws and not in others at 720 steps (seed 0: 1.0% held out, comparison 87%,
    # mean 72.1%); drawn twice as often it was learned at seed 0 too (58.9%, comparison 96.9%, mean
    # 76.8%), for less multiplication (79.2% -> 62.0%) (benchmarks/README.md, runs Y and Z2)
    pretrain_weights: dict[str, int] = field(default_factory=lambda: {"sorting": 2})
    # The share of the corpus's chats that ask 2-3 questions in a row (earlier answers without their
    # reasoning, as a chat client sends them back, and untrained). Taught one question after BOS, a
    # model reads the first question of a chat, not the last: asked second, the final models of seeds
    # 0 / 2 answer 8.3 / 10.0% (alone 94.7 / 92.3%); at 0.05, 66.3 / 72.4% (alone 88.3 / 90.8%), and
    # 78.4 / 74.1% (alone 91.5 / 93.4%) with half the follow-ups of one kind (`synthetic.SAME_FAMILY`).
    # At 0.1 seed 2 fell under the comparison goal (81.8%) (benchmarks/README.md, "Chats of several
    # questions in the corpus", "Follow-ups of one kind")
    pretrain_multi_turn: float = 0.05
    # the student's share: it learns from the teacher's one-question traces, and at seed 2 the
    # teacher's 0.1 cost it 36 points before distillation (run M2, benchmarks/README.md)
    student_multi_turn: float = 0.0
    # 720 steps left the model undertrained (held-out losses still falling steeply at the end) and the
    # seed deciding which skills it had: at seed 0 multiplication 62.0%, mean 76.8%; at 960, seeds
    # 0 / 1 / 2 end at multiplication 93.8% / 91.1% / 97.9%, mean 83.3% / 84.4% / 89.9% (runs A, B, D;
    # their wall times are in benchmarks/README.md)
    pretrain_steps: int = 960
    pretrain_batch: int = 8
    seq_len: int = 320  # a whole multiplication (prompt + up to ~300 response tokens) fits one window
    pretrain_lr: float = 3e-3
    # Muon on the hidden matrices: in-context copying appears ~4x sooner than under AdamW
    # (benchmarks/bench_learning.py), the difference between a model that copies and one that guesses
    pretrain_optimizer: str = "muon"
    # held-out loss and copy probe every this many steps (it never touches training)
    val_every: int = 250
    # γ of aux-loss-free balancing: V3's 0.001 is for ~10^5 steps; a few hundred need a bigger step to
    # balance within the run (measured in benchmarks/bench_pretrain.py).
    bias_update_speed: float = 0.01
    mtp_weight: float = 0.3  # λ of the MTP loss (V3 §2.2)
    # the dense student's own pretraining on the same corpus (0: distil into random weights); as many
    # steps as the teacher's, at ~40% of the cost each: copying appears at the same step in both,
    # and at 400 steps the student had not got there (14.5% mean pass@1 against 48% at 800)
    student_steps: int = 960
    # the student's own peak lr (0: the teacher's pretrain_lr); a preset whose teacher is wider than the
    # student lowers pretrain_lr for the teacher alone
    student_lr: float = 0.0
    # cold-start SFT: thousands of worked solutions, as R1's cold start (§2.3.1). 10 steps of 300 left
    # the final model 2-3 points lower (seeds 0 and 2: mean 86.0 -> 88.3, five families 82.4 -> 85.1,
    # on 96 problems; run C0 88.9 against S0's 86.5) in less time (benchmarks/README.md, "A longer
    # cold start", "Run C0")
    sft_steps: int = 100
    sft_examples: int = 3000
    # where pretraining's schedule ended: 1e-3 undid part of what pretraining had learned
    sft_lr: float = 3e-4
    # The share of cold-start chats that ask 2-3 problems in a row (the history: earlier questions
    # and their answers, as a chat client sends them back). Taught only one-question chats, the model
    # reads the first question of a chat, not the last: run W0's final model, asked second in a chat,
    # 8.3% against 94.7% alone. Off: at 0.3 the final model reached 18.9% there for 3 points alone;
    # with `grpo_second_turn` too (run R0), 53.4% for 7 points alone and `largest`'s gain under its
    # goal (+15.0 on 480 problems) (benchmarks/README.md, "Asked second in a chat")
    sft_multi_turn: float = 0.0
    # SFT, the control and distillation take the optimizer pretraining used: a fresh AdamW at 3e-4 moves
    # every weight of a Muon-trained model by ~lr at once (sign-like first steps), and its 10 steps cost
    # 4 points of held-out pass@1 that Muon at the same lr, or AdamW at 5e-5, keep (benchmarks/README.md)
    # GRPO: 120 steps at lr 5e-5, not 60: drawn from all eight families, `largest` went 55.2 -> 66.7 ->
    # 77.1% at 60 / 90 / 120 steps from run S1's SFT checkpoint (seed 0), 51.6 -> 59.4 -> 67.7% from
    # H1's (seed 1), sorting 74.0 -> 78.1 -> 83.3% at seed 0 (benchmarks/README.md, "Longer GRPO")
    grpo_steps: int = 120
    group_size: int = 8
    batch_prompts: int = 8
    grpo_lr: float = 5e-5
    # DAPO's token-level loss (§3.3), not GRPO's mean per response: a long wrong answer (a sorting list
    # written for "which is the largest?") weighs per token what a short one does. `largest` on 480
    # held-out problems, from the SFT checkpoints of seeds 0 / 1 / 2 and seed 0 in fp32: 88.9 / 80.2 /
    # 54.4 / 83.1% against 80.3 / 81.7 / 42.9 / 75.6% (benchmarks/README.md, "GRPO's gains on 480 problems")
    grpo_loss: str = "dapo"
    # Prompts from the families a probe before the first step finds unsolved, and comparison always:
    # drawn uniformly from all eight, `largest` got an eighth of the groups and at seed 2 did not move
    # (39.1 -> 35.4%, run S5). From the SFT checkpoints of seeds 0 / 1 / 2, on each run's 48 problems:
    # `largest` +38.5 / +51.1 / +19.8 against +39.6 / +34.4 / -3.6, final mean 94.3 / 93.4 / 92.2% against 94.3 / 91.3 / 88.7%,
    # GRPO 1.6-2.6x shorter. Left out too, comparison fell to 93.8% at seed 2: its own groups are what
    # push back when `largest`'s shortcut (answer the larger) leaks into "which is smaller?"
    # (benchmarks/README.md, "The unsolved draw at three seeds")
    grpo_task_sampling: str = "unsolved"
    grpo_keep_tasks: tuple[str, ...] = ("comparison",)
    # R1's accuracy and format rewards, and the reasoning's conclusion (`conclusion`: its last line names
    # the answer given, in the question's direction): accuracy alone raised `largest` under traces that
    # concluded "So 85 is smaller." and answered 85 as the largest. From SR19's SFT checkpoint (seed 0),
    # `largest` 66.1 -> 68.8% and the passes whose reasoning concludes their answer 22.9 -> 49.0%, the
    # other families unchanged (benchmarks/README.md, "The reasoning's conclusion")
    grpo_reward: str = "accuracy:1,format:0.2,conclusion:0.5"
    # a supervised loss on worked solutions of these families added to each GRPO update, at this
    # weight (PPO-ptx, InstructGPT §3.5), over the families the probe left out (the uniform draw: all
    # of them): it holds what GRPO no longer draws. Under the uniform draw, asked in varied wordings,
    # GRPO without it cost comparison 4-7 points and counting ~20 at 60 steps (benchmarks/README.md,
    # "Asked in other words"); under the unsolved draw, mixing only those two cost multiplication 8
    # points at seed 1 and sorting 17
    grpo_sft_mix: float = 1.0
    grpo_sft_mix_tasks: tuple[str, ...] = FAMILIES
    # GRPO draws each family asked second in a chat too (`task?turn=2`), as a task of its own for the
    # unsolved draw (`nanoseek speedrun --grpo-second-turn`). Off: from the same SFT checkpoints (bf16
    # seeds 0 / 1 / 2, fp32 seed 0) it lifts the final model asked second from 69.8% to 76.2% on
    # average, but alone 87.1% against 87.9%, comparison under its 95% goal in two runs of four (its
    # share of the groups diluted) and the two precisions 5.0 points apart instead of 2.0
    # (benchmarks/README.md, "GRPO on a chat's second question")
    grpo_second_turn: bool = False
    max_new_tokens: int = 320  # a 3-digit x 2-digit long multiplication, worked out, takes up to ~300
    # control: SFT for GRPO's wall time (beside it where the CPU runs two stages at once; off on the gpu preset)
    control: bool = True
    # beside GRPO, the control's first plan in steps (refitted to GRPO's pace), with fresh worked solutions
    # at the cold start's rate per step: ~350 steps fit GRPO's time, a larger plan only builds data, and
    # more than 280 ask linear equations for more distinct training problems than they have (1,212 since
    # equations that work a held-out subtraction are in neither split; 1,539 before, and 350 steps)
    control_plan_steps: int = 280
    # distillation: ~180 kept traces, ~60 packed rows. 120 steps (~16 passes) against 40: mean +2.7 /
    # +1.7 points at seeds 0 / 1 (83.3 -> 86.0%, 80.9 -> 82.6%), mostly `largest`, which the student
    # learns from the teacher's right answers alone (46.9 -> 64.6%, 31.8 -> 47.4%)
    distill_prompts: int = 24
    distill_k: int = 4
    distill_steps: int = 120
    # a light touch on a pretrained student: 1e-3 over a few dozen traces overwrote what it knew
    distill_lr: float = 1e-4
    # evaluation: per family, an equal share per language; with 24 problems a family's figure moved by
    # up to 20 points between two draws, more than the effects the report is there to show
    eval_n: int = 48
    eval_k: int = 4
    # the final model on held-out problems asked in wordings no stage trains on, per family (0: not
    # asked). Half of eval_n: the gap it shows is tens of points (benchmarks/README.md)
    eval_unseen_n: int = 24
    # the final model on held-out problems each asked second in a chat, after another problem and its
    # answer, as `nanoseek chat` and the server's chat page send them (0: not asked)
    eval_second_turn_n: int = 24
    # sequences the engine decodes together in GRPO, distillation and evaluation (0: each stage's own
    # default). A GPU decodes a whole GRPO step's groups in one batch for about the time of its longest
    engine_batch: int = 0
    precision: str = "auto"  # pretraining: bf16 autocast where the CPU has native bf16, else fp32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # refused when the preset is made, before a run directory holds anything; unknown names first,
        # or every check below would name a family the run lacks instead of the one it cannot have
        check_task_names([*self.tasks, *self.verifier_only_tasks])
        if not self.tasks:
            raise ValueError(
                "tasks must name at least one family with worked solutions: the corpus and the cold "
                f"start are written from them (verifier only: {', '.join(self.verifier_only_tasks) or 'none'})"
            )
        if self.control_plan_steps < 1:
            raise ValueError(f"control_plan_steps must be >= 1, got {self.control_plan_steps}")
        for name in ("pretrain_multi_turn", "student_multi_turn", "sft_multi_turn"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        bad = {name: w for name, w in self.pretrain_weights.items() if not isinstance(w, int) or w < 1}
        if bad:
            raise ValueError(f"pretrain_weights must be whole numbers >= 1, got {bad}")
        stray = sorted(set(self.grpo_sft_mix_tasks) - set(self.tasks))
        if stray:
            raise ValueError(
                f"grpo_sft_mix_tasks must be families with worked solutions (tasks), got {stray}"
            )
        stray = sorted(set(self.grpo_keep_tasks) - {*self.tasks, *self.verifier_only_tasks})
        if stray:
            raise ValueError(f"grpo_keep_tasks must be families of the run, got {stray}")
        from nanoseek.train.grpo import LOSS_TYPES, TASK_SAMPLING

        if self.grpo_loss not in LOSS_TYPES:
            raise ValueError(f"grpo_loss must be one of {', '.join(LOSS_TYPES)}, got {self.grpo_loss!r}")
        if self.grpo_task_sampling not in TASK_SAMPLING:
            raise ValueError(
                f"grpo_task_sampling must be one of {', '.join(TASK_SAMPLING)}, got {self.grpo_task_sampling!r}"
            )
        from nanoseek.data.rewards import build_reward

        try:  # a misspelt part is refused here, not after pretraining
            build_reward(self.grpo_reward)
        except ValueError as e:
            raise ValueError(f"grpo_reward: {e}") from None

    def with_tasks(self, tasks: Sequence[str]) -> SpeedrunPreset:
        """This preset on the families `tasks` names instead of its own (`nanoseek speedrun --tasks`).
        A family the preset learns from its verifier alone (`largest`) stays so when named, and drops
        out when not, as any family does; the preset's per-family settings (pretraining weights, the
        families GRPO always draws and those it mixes worked solutions of) keep the families named. A
        mix over all the preset's families (cpu) stays a mix over all the run's: a family the preset
        lacks would otherwise be the one GRPO never holds on to."""
        from nanoseek.data.tasks import get_task

        names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))  # named twice: one family
        if not names:
            raise ValueError("--tasks names no family; leave it out for the preset's")
        check_task_names(names)
        for name in names:
            get_task(name)  # its options, checked before a run directory holds anything
        zero = tuple(t for t in names if t in self.verifier_only_tasks)
        taught = tuple(t for t in names if t not in zero)
        if not taught:
            raise ValueError(
                f"--tasks names only families learned from their verifier alone ({', '.join(zero)}); "
                f"name at least one with worked solutions too, e.g. {', '.join(self.tasks)}"
            )
        kept = set(names)
        mix_all = set(self.tasks) <= set(self.grpo_sft_mix_tasks)
        return dataclasses.replace(
            self,
            tasks=taught,
            verifier_only_tasks=zero,
            pretrain_weights={t: w for t, w in self.pretrain_weights.items() if t in kept},
            grpo_keep_tasks=tuple(t for t in self.grpo_keep_tasks if t in kept),
            grpo_sft_mix_tasks=taught if mix_all else tuple(t for t in self.grpo_sft_mix_tasks if t in kept),
        )


def check_task_names(names: Sequence[str]) -> None:
    """Refuse, by name, every family the speedrun cannot run: its corpus and worked solutions are
    written from the built-in families (options after `?`: `addition?digits=3`)."""
    from nanoseek.data.tasks import TASK_ALIASES, TASKS, refuse_unseen_wordings

    unknown = [n for n in names if n.partition("?")[0].strip() not in {*TASKS, *TASK_ALIASES}]
    if unknown:
        which = "task" if len(unknown) == 1 else "tasks"
        raise ValueError(
            f"unknown {which} {', '.join(map(repr, unknown))}; the speedrun runs the built-in families: "
            f"{', '.join([*TASKS, *TASK_ALIASES])}"
        )
    # every stage trains on them, and the report asks the final model in them as in phrasings none did
    refuse_unseen_wordings(names, "--tasks")


def split_tasks(text: str) -> tuple[str, ...]:
    """`--tasks addition,sorting` -> ("addition", "sorting"). Split at every comma: the stages join the
    run's families with commas and split them so again, so an option can hold none."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


PRESETS: dict[str, SpeedrunPreset] = {
    # Every stage for a few steps: the CI end-to-end check, under 3 minutes.
    "smoke": SpeedrunPreset(
        name="smoke",
        tasks=("addition", "comparison"),
        vocab_size=600,
        tokenizer_docs=3000,
        pretrain_steps=30,
        pretrain_batch=8,
        seq_len=128,
        student_steps=10,
        sft_steps=10,
        sft_examples=200,
        control_plan_steps=100,
        grpo_steps=3,
        group_size=4,
        batch_prompts=4,
        max_new_tokens=32,
        distill_prompts=8,
        distill_k=2,
        distill_steps=5,
        eval_n=6,
        eval_k=2,
        eval_unseen_n=3,
        eval_second_turn_n=3,
        # a 30-step model solves nothing, so the unsolved draw would leave nothing out and mix nothing:
        # the uniform draw runs every part of GRPO's update here
        grpo_task_sampling="uniform",
        grpo_sft_mix_tasks=("comparison",),
        grpo_second_turn=True,  # the path that draws, and evaluates GRPO's start, asked second
    ),
    "cpu": SpeedrunPreset(),
    # One GPU: the `small` model (~75M active parameters) on 3x the CPU preset's tokens, sized from an
    # H200's measured rates (benchmarks/README.md, "The gpu preset on an H200"). Decode there is bound
    # by host work (far above its FLOPs at 512 sequences), so a GRPO step costs about its longest response
    # whatever the batch: few steps of many samples. At 600 steps the held-out loss was 0.0004, at 300
    # already 0.0047
    "gpu": SpeedrunPreset(
        name="gpu",
        model="small",
        vocab_size=2048,
        tokenizer_docs=50000,
        pretrain_steps=400,
        pretrain_batch=64,
        seq_len=320,
        pretrain_lr=1.5e-3,
        val_every=200,
        student_steps=400,  # as many as the teacher, as on the CPU
        # the cpu preset's lr for the same model: at the teacher's 1.5e-3 it ended 400 steps of 64 rows
        # at a held-out loss of 0.020-0.026 and 59.8% mean pass@1 (multiplication 2.6%), at 3e-3 at
        # 0.0028 and 87.8%: same model, corpus and steps, on a CPU (benchmarks/README.md)
        student_lr=3e-3,
        sft_steps=50,
        sft_examples=5000,
        # where pretraining's schedule ended, as on the CPU (pretrain_lr x the 0.1 floor): at 3e-4 the
        # H200 run's SFT loss rose tenfold over its 50 steps (0.0005 to 0.003-0.016, spikes of 0.04-0.06
        # with gradient norms 1.3-2.0) and sorting fell from 97.7% to 74.6% (benchmarks/README.md)
        sft_lr=1.5e-4,
        grpo_steps=12,
        group_size=16,
        batch_prompts=32,
        grpo_lr=1e-4,
        # the draw and the loss measured on the H200; the cpu preset's (the unsolved draw, DAPO's
        # loss) have not run on a GPU yet, though the draw should suit a model that nearly solves
        # seven families before RL even more
        grpo_task_sampling="uniform",
        grpo_loss="grpo",
        grpo_sft_mix_tasks=("comparison", "counting"),
        # one question a chat, as measured on the H200; the cpu preset's several-question chats have
        # not run on a GPU yet (`nanoseek speedrun --preset gpu --multi-turn 0.05` tries them)
        pretrain_multi_turn=0.0,
        control=False,
        # 64 prompts x 4 samples per family (2,048 over the eight), four engine batches. 16 prompts x 8 samples kept ~120 traces, and
        # 200 steps over them (40 passes) took a student of 87.8% down to 83.8%; 64 x 4, ~490 traces
        # in 60 steps (3 passes), took it to 90.1% (benchmarks/README.md)
        distill_prompts=64,
        distill_k=4,
        distill_steps=60,
        eval_n=64,
        eval_k=4,
        eval_unseen_n=32,
        eval_second_turn_n=32,
        engine_batch=512,  # a GRPO step's 32 x 16 samples in one batch
    ),
}


# The share of the teacher's pretraining steps after which it takes back the threads it lent the
# student: about where the student ends (0.19-0.22 of the teacher's steps on an AMX host, ~0.29 on an
# AMD one: benchmarks/README.md), fixed so that a run's numbers do not depend on timing.
TAKE_BACK_AT = 0.25


class _EngineBatch(TypedDict, total=False):
    """The engine's batch a tuning stage's config is given (`Speedrun._engine_batch`): none, its own."""

    max_batch_size: int


class Speedrun:
    def __init__(
        self, out: str | Path, preset: SpeedrunPreset, progress: bool = True, tensorboard: bool = False
    ) -> None:
        self.run = Path(out)
        self.p = preset
        self.progress = progress
        # TensorBoard events of every training stage in RUN/tensorboard/<stage>/, as the stages' own
        # --tensorboard writes them; not a setting of the run (a rerun may add or drop it)
        self.tensorboard = tensorboard
        try:
            self.run.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # under a file, on a read-only or full filesystem, not permitted
            raise ValueError(
                f"cannot create the run directory {self.run}: {e.strerror or e}; choose another --out"
            ) from None

    # -------------------------------------------------------------- plumbing
    def _claim_directory(self) -> None:
        """Record this run's settings and how this nanoseek writes its data, or refuse to resume a run
        that was started with other settings, or by a nanoseek that writes its data otherwise."""
        path = self.run / SETTINGS
        mine = json.loads(json.dumps(dataclasses.asdict(self.p)))  # tuples as lists, as stored
        formats = self.data_formats()
        if not path.exists():
            atomic_write(path, json.dumps({**mine, FORMATS: formats}, indent=2) + "\n")
            return
        stored = read_json_object(path)  # a hand edit or a broken copy: named, not a bare JSON error
        recorded = stored.pop(FORMATS, None)
        # a setting added since the run started counts as unchanged where it keeps its default: the value
        # the run's own preset gives it (a gpu or smoke run's differ from the cpu preset's)
        defaults = json.loads(
            json.dumps(dataclasses.asdict(PRESETS.get(stored.get("name", ""), SpeedrunPreset())))
        )
        changed = [
            k for k in sorted(set(stored) | set(mine)) if stored.get(k, defaults.get(k)) != mine.get(k)
        ]
        if changed:
            shown = ", ".join(f"{k} {stored.get(k)!r} -> {mine.get(k)!r}" for k in changed[:4])
            raise ValueError(
                f"{self.run} holds a speedrun started with preset {stored.get('name')!r} and other settings "
                f"({shown}); resume it with the same --preset and flags, or choose a new --out"
            )
        if recorded is None:
            print(
                f"warning: {self.run} was started by a nanoseek that did not record how it writes its data; "
                "if the documents or worked solutions changed since, its later stages train on a format "
                "its earlier ones never saw",
                file=sys.stderr,  # a warning, with the progress bars: stdout is the run's log of stages
            )
        elif recorded != formats:
            raise ValueError(
                f"{self.run} was started by a nanoseek that writes the corpus, worked solutions or prompts "
                "of its tasks otherwise than this one: its finished stages learned another format than the "
                "ones left would teach. Choose a new --out, or resume it with the nanoseek that started it"
            )

    def data_formats(self) -> str:
        """A digest of how this nanoseek writes the run's data: the first pretraining documents, and
        the prompt, worked solution and answer of a few problems of every family. Resuming a run with a
        nanoseek that writes them otherwise mixes two formats in one model: seed 1's pretraining from
        before sorting's worked solution crossed numbers out, with its cold start from after, fell from
        79.7% to 26.6% on sorting (benchmarks/README.md, "Run N1")."""
        from itertools import islice

        from nanoseek.data.corpus import embedded_tasks, is_embedded, tokenizer_documents
        from nanoseek.data.synthetic import iter_documents
        from nanoseek.data.tasks import get_task

        digest, corpus = hashlib.sha256(), self.pretrain_data()
        for doc in islice(tokenizer_documents(corpus, seed=0), 64):
            digest.update(doc.encode())
        if max(self.p.pretrain_multi_turn, self.p.student_multi_turn) and is_embedded(corpus):
            # how a chat of several questions is composed (its share is in the settings already)
            chats = iter_documents(seed=0, tasks=embedded_tasks(corpus), multi_turn=1.0)
            for doc in islice(chats, 16):
                digest.update(doc.encode())
        for name in self.all_tasks:
            task = get_task(name)
            for problem in task.problems("train", 6, seed=0):
                worked = task.worked_solution(problem) if hasattr(task, "worked_solution") else ""
                digest.update(f"{problem.prompt}\0{worked}\0{problem.answer}\0".encode())
        return digest.hexdigest()[:16]

    def _done(self, stage: str) -> bool:
        return (self.run / stage / DONE).exists()

    def _mark_done(self, stage: str, wall: float, **fields: Any) -> None:
        MetricsLog(self.run, stage).log(event="end", wall_time_s=round(wall, 2), **fields)
        # Its presence says the stage is done, so it must never be seen half written.
        atomic_write(self.run / stage / DONE, json.dumps({"wall_time_s": wall, **fields}) + "\n")

    def _stage(self, index: int, total: int, stage: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        if self._done(stage):
            marker = read_json_object(self.run / stage / DONE)
            if marker.get("beside"):
                print(
                    f"[{index}/{total}] {stage}: trained beside {marker['beside']} in {marker['wall_time_s']:.0f}s"
                )
            else:
                print(f"[{index}/{total}] {stage}: done already, skipped")
            return
        print(f"[{index}/{total}] {stage} ...", flush=True)
        t0 = time.perf_counter()
        fields = fn() or {}
        wall = time.perf_counter() - t0
        self._mark_done(stage, wall, **fields)
        print(f"[{index}/{total}] {stage}: finished in {wall:.0f}s", flush=True)

    # ---------------------------------------------------------------- stages
    def tokenizer(self) -> dict[str, Any]:
        from itertools import islice

        from nanoseek.data.corpus import tokenizer_documents
        from nanoseek.tokenizer import train_tokenizer

        # the corpus the model will read: never a document of a verifier-only family
        source = "embedded:" + ",".join(self.p.tasks)
        docs = list(islice(tokenizer_documents(source, seed=self.p.seed), self.p.tokenizer_docs))
        tok = train_tokenizer(docs, vocab_size=self.p.vocab_size)
        tok.save(self.run / "tokenizer")
        return {"vocab_size": tok.vocab_size, "documents": len(docs)}

    def pretrain(self, student: bool = False, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """The model's pretraining; with `student`, the dense student's, on the same corpus and tokens
        (R1 distils into pretrained bases, §2.4), in a side directory adopted as RUN/student."""
        from nanoseek.train.pretrain import PretrainConfig, pretrain

        steps = self.p.student_steps if student else self.p.pretrain_steps
        out = self.run / ".student" if student else self.run
        cfg = PretrainConfig(
            out=str(out),
            data=self.pretrain_data(),
            tokenizer=str(self.run / "tokenizer"),
            preset=self.p.student if student else self.p.model,
            steps=steps,
            batch_size=self.p.pretrain_batch,
            seq_len=self.p.seq_len,
            lr=(self.p.student_lr or self.p.pretrain_lr) if student else self.p.pretrain_lr,
            optimizer=self.p.pretrain_optimizer,
            bias_update_speed=self.p.bias_update_speed,
            mtp_weight=self.p.mtp_weight,
            multi_turn=self.p.student_multi_turn if student else self.p.pretrain_multi_turn,
            val_every=self.p.val_every,
            precision=self.p.precision,
            seed=self.p.seed,
            resume=True,
            progress=self.progress,
            tensorboard=self.tensorboard,
        )
        path = pretrain(cfg, on_step=on_step)
        if student:
            self._adopt(out, Path(path), "student", renamed="pretrain")
        return {"tokens": steps * self.p.pretrain_batch * self.p.seq_len, "corpus": cfg.data}

    def student(self) -> dict[str, Any]:
        return self.pretrain(student=True)

    @contextlib.contextmanager
    def _beside(self, stage: str, during: str, target: Callable[..., None], args: tuple) -> Iterator[Any]:
        """Runs `target(*args, threads)` (stage `stage`) in a spawned process on half the CPU threads
        while the body (stage `during`) runs here on the rest; yields the process. On an error it is
        terminated; should it fail, its own stage runs it again later, alone. Where `stage` is done
        already (a run resumed after it), the body still runs on its share of the threads and None is
        yielded: on some CPUs a step's last bits depend on the thread count, and a resumed run must
        give the figures of one never stopped."""
        import multiprocessing

        import torch

        threads = torch.get_num_threads()
        child = None
        if not self._done(stage):
            child = multiprocessing.get_context("spawn").Process(
                target=_with_tasks, args=(_carried_tasks() or {}, target, (*args, threads // 2)), name=stage
            )
            with _sigint_ignored():  # Ctrl-C: this process stops it (below), without its traceback
                child.start()
        torch.set_num_threads(threads - threads // 2)
        if child is not None:
            print(f"  {stage}: beside {during} on {threads // 2} of {threads} threads", flush=True)
        try:
            yield child
        except TrainingInterrupted as e:
            # The body saved and stops; the child is to do the same (it saves on a first SIGTERM). It
            # ignores SIGINT, so a Ctrl-C is passed on to it. A SIGTERM reached it too where the job's
            # every process was signalled (timeout, Slurm, systemd), and a second would stop it unsaved:
            # it is given time to save first, and told only if it goes on (only this process signalled).
            if child is not None:
                if e.signum != signal.SIGINT:
                    child.join(STOP_WAIT_S)
                if child.is_alive():
                    child.terminate()
            raise
        except BaseException:
            if child is not None:
                child.terminate()
            raise
        finally:
            torch.set_num_threads(threads)
            if child is not None:
                child.join()
        if child is not None and child.exitcode != 0:
            print(
                f"  {stage}: its run beside {during} failed (exit code {child.exitcode}); it runs alone next"
            )

    def pretrain_beside_student(self) -> dict[str, Any]:
        """The teacher's pretraining with the student's in a second process, each on half the CPU
        threads; the teacher takes all of them back when the student is done.

        One step of a model this small cannot keep two cores busy, so two jobs side by side finish
        sooner than one after the other (thread scaling measured in benchmarks/README.md). The teacher
        takes its threads back at a fixed step (waiting there for a student not yet done), not when the
        student happens to finish: on some CPUs a step's last bits depend on the thread count, and a
        switch at a timing-dependent step made two runs of one seed differ by about their figures' own
        intervals (benchmarks/README.md, "Run H2").
        Should the student fail here, its own stage runs it again, alone, where its error shows."""
        import math

        import torch

        from nanoseek.train.loop import stop_pending

        threads = torch.get_num_threads()
        at = math.ceil(self.p.pretrain_steps * TAKE_BACK_AT)
        if self._saved_step("pretrain") >= at:  # resumed past the step where it took back every thread
            return self.pretrain()
        with self._beside(
            "student",
            "pretrain",
            _run_stage,
            (str(self.run), self.p, "student", "pretrain", self.tensorboard),
        ) as child:

            def take_back(step: int) -> None:
                if step >= at and torch.get_num_threads() < threads:
                    # a student still running is waited for: three busy threads on two cores would
                    # slow both more than the wait costs. Not past a Ctrl-C or SIGTERM, though: the
                    # student ignores SIGINT, and the stop waited for its whole run; the teacher stops
                    # at its next step, and its stop is passed on to the student (`_beside`). The
                    # threads are taken back all the same: that next step is the one its checkpoint
                    # holds, and a rerun (resumed past this step) must give a run never stopped's figures.
                    while child is not None and child.is_alive() and not stop_pending():
                        child.join(0.2)
                    torch.set_num_threads(threads)

            return self.pretrain(on_step=take_back)

    def _saved_step(self, stage: str) -> int:
        """The step of RUN/<stage>'s last checkpoint, where a resumed training stage goes on (0: none)."""
        from nanoseek.checkpoint import TRAIN_STATE

        restore_directory(self.run / stage)  # a crash mid-swap left the last checkpoint aside
        meta = self.run / stage / TRAIN_STATE / "trainer.json"
        return int(read_json_object(meta)["step"]) if meta.exists() else 0

    def overlaps(self) -> bool:
        """Whether CPU stages run side by side (two processes): on a CPU with at least 2 threads, where
        the families registered in this process can reach a spawned one (`_carried_tasks`)."""
        import torch

        return not torch.cuda.is_available() and torch.get_num_threads() >= 2 and _carried_tasks() is not None

    def pretrain_data(self) -> str:
        """The pretraining corpus: the embedded documents of the run's task families by default (a tiny
        model learns what it sees often, and a few minutes of CPU buy ~1M tokens), or of all families."""
        c = self.p.pretrain_corpus
        if c == "tasks":
            weights = self.p.pretrain_weights
            # a family listed twice is drawn twice as often (nanoseek.data.synthetic picks a family per document)
            return "embedded:" + ",".join(name for name in self.p.tasks for _ in range(weights.get(name, 1)))
        return "embedded" if c == "all" else c

    def sft(
        self,
        stage: str = "sft",
        steps: int | None = None,
        init: str = "pretrain",
        examples: int | None = None,
        max_seconds: float | None = None,
        deadline_fn: Callable[[], float | None] | None = None,
    ) -> dict[str, Any]:
        from nanoseek.train.sft import SFTConfig, sft

        # The control run is an SFT run under another name: train it in a side directory, then adopt it.
        sub = self.run if stage == "sft" else self.run / f".{stage}"
        path = sft(
            SFTConfig(
                init=str(self.run / init),
                task=",".join(self.p.tasks),
                task_examples=self._examples_held(examples or self.p.sft_examples),
                out=str(sub),
                steps=steps or self.p.sft_steps,
                seq_len=self.p.seq_len,
                lr=self.p.sft_lr,
                multi_turn=self.p.sft_multi_turn,
                optimizer=self.p.pretrain_optimizer,
                precision=self._tuning_precision(),
                seed=self.p.seed,
                resume=True,
                progress=self.progress,
                tensorboard=self.tensorboard,
                max_seconds=max_seconds,
            ),
            deadline_fn=deadline_fn,
        )
        if stage != "sft":
            self._adopt(sub, Path(path), stage, renamed="sft")
        return {}

    @property
    def all_tasks(self) -> list[str]:
        return [*self.p.tasks, *self.p.verifier_only_tasks]

    def grpo(self, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        from nanoseek.train.grpo import GRPOConfig, grpo

        grpo(
            GRPOConfig(
                init=str(self.run / "sft"),
                tasks=[
                    *self.all_tasks,
                    *(map(as_second_turn, self.all_tasks) if self.p.grpo_second_turn else ()),
                ],
                out=str(self.run),
                steps=self.p.grpo_steps,
                group_size=self.p.group_size,
                batch_prompts=self.p.batch_prompts,
                lr=self.p.grpo_lr,
                loss=self.p.grpo_loss,
                reward=self.p.grpo_reward,
                task_sampling=self.p.grpo_task_sampling,
                # GRPO reads no list as every task's worked solutions: a run whose families left
                # none of the preset's mixed (`--tasks addition` on smoke) mixes nothing
                sft_mix=self.p.grpo_sft_mix if self.p.grpo_sft_mix_tasks else 0.0,
                sft_mix_tasks=list(self.p.grpo_sft_mix_tasks),
                keep_tasks=list(self.p.grpo_keep_tasks),
                max_new_tokens=self.p.max_new_tokens,
                precision=self._tuning_precision(),
                seed=self.p.seed,
                resume=True,
                progress=self.progress,
                tensorboard=self.tensorboard,
                **self._engine_batch(),
            ),
            on_step=on_step,
        )
        return {}

    def grpo_beside_control(self) -> dict[str, Any]:
        """GRPO with its control in a second process, each on half the CPU threads, the control
        training until GRPO is done: both get the same wall time and the same share of the machine,
        and the control's time no longer adds to the run's.

        Neither step keeps two cores busy (as in `pretrain_beside_student`). GRPO's pace after each
        step tells the control when GRPO will end, so the control's cosine schedule is refitted to it
        and ends with it. Should the control fail here, its own stage runs it again, alone."""
        import multiprocessing

        end = multiprocessing.get_context("spawn").Value("d", 0.0)  # GRPO's end (time.time()); 0: not known
        t0 = time.time()
        first_step: list[int] = []

        def pace(done: int, total: int) -> None:
            if not first_step:  # a resumed GRPO starts past step 0
                first_step.append(done - 1)
            now = time.time()
            end.value = now + (now - t0) / (done - first_step[0]) * (total - done)

        args = (str(self.run), self.p, self.tensorboard, end)
        with self._beside("control", "grpo", _control_beside_grpo, args):
            stopped = False
            try:
                return self.grpo(on_step=pace)
            except TrainingInterrupted:
                stopped = True  # not GRPO's end: the control stops unfinished too, both go on at the rerun
                raise
            finally:
                if not stopped:
                    end.value = time.time()  # done (or failed): the control stops at its next step

    def control(self, deadline_fn: Callable[[], float | None] | None = None) -> dict[str, Any]:
        """More SFT from the SFT checkpoint for the wall time GRPO took: what RL bought, honestly.
        With `deadline_fn` it runs beside GRPO, until GRPO is done (`grpo_beside_control`)."""
        if deadline_fn is not None:
            # a first plan, refitted to GRPO's pace once its first step is done; fresh worked solutions
            # at the cold start's rate per step for that plan
            steps = self.p.control_plan_steps
            return self.sft(
                stage="control",
                steps=steps,
                init="sft",
                examples=self._control_examples(steps),
                deadline_fn=deadline_fn,
            )
        grpo_time = self._wall_time("grpo") or 0.0
        sft_time = self._wall_time("sft") or 1.0
        # Per-step time from the SFT stage's own step records; the rest of its wall time (loading,
        # packing, saving) is overhead the control pays once too.
        per_step = self._step_seconds("sft") or sft_time / max(1, self.p.sft_steps)
        overhead = max(0.0, sft_time - per_step * self.p.sft_steps)
        steps = max(1, int((grpo_time - overhead) / per_step))
        examples = self._control_examples(steps)
        # The step estimate sets the schedule; the budget guarantees the wall time (data building for
        # more examples and per-step time can differ from the short SFT stage's).
        return self.sft(
            stage="control", steps=steps, init="sft", examples=examples, max_seconds=grpo_time
        ) | {"matched_wall_time_s": grpo_time}

    def _control_examples(self, steps: int) -> int:
        """Fresh worked solutions for a control of `steps` at the cold start's rate per step, not
        epochs over the cold start's own."""
        return max(self.p.sft_examples, steps * self.p.sft_examples // max(1, self.p.sft_steps))

    def _examples_held(self, n: int) -> int:
        """`n` worked solutions in equal shares per family (rounded down to them), or fewer where a family
        holds fewer distinct training problems than its share: a family run alone (`--tasks
        linear_equation`, 1,212 of them) gives all of a control's ~8k, and SFT draws every family's share
        up to what it holds, so each family keeps an equal share."""
        from nanoseek.data.tasks import get_task

        share = n // len(self.p.tasks)
        held = min(
            len(get_task(t).problems("train", share, seed=self.p.seed, strict=False)) for t in self.p.tasks
        )
        return min(share, held) * len(self.p.tasks)

    def _step_seconds(self, stage: str) -> float | None:
        """Median seconds between consecutive step records of `stage` in metrics.jsonl."""
        import statistics

        times = [r["time"] for r in read_metrics(self.run) if r.get("stage") == stage and r.get("step")]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
        return statistics.median(gaps) if gaps else None

    def distill(self) -> dict[str, Any]:
        from nanoseek.train.distill import DistillConfig, distill
        from nanoseek.train.sft import SFTConfig

        distill(
            DistillConfig(
                teacher=str(self.run / "grpo"),
                student=str(self.run / "student") if self.p.student_steps else self.p.student,
                tasks=self.all_tasks,
                k=self.p.distill_k,
                prompts=self.p.distill_prompts,
                max_new_tokens=self.p.max_new_tokens,
                out=str(self.run),
                seed=self.p.seed,
                fallback_reference=True,
                **self._engine_batch(),
                sft=SFTConfig(
                    init="",
                    steps=self.p.distill_steps,
                    seq_len=self.p.seq_len,
                    lr=self.p.distill_lr,
                    optimizer=self.p.pretrain_optimizer,
                    precision=self._tuning_precision(),
                    seed=self.p.seed,
                    resume=True,  # a rerun trains on the traces already sampled
                    progress=self.progress,
                    tensorboard=self.tensorboard,
                ),
            )
        )
        return {}

    def evaluate(self) -> dict[str, Any]:
        """Every stage's checkpoint on every family's held-out problems. On a GPU one job per checkpoint:
        its families' samples in one engine queue (`evaluate_many`: the samples each family alone would
        draw), where a decode step costs about the same for one sequence or hundreds. On a CPU one job
        per family, two processes of half the threads each sharing them (small-batch decode gains
        little from a second thread: benchmarks/README.md). Each evaluation's records go to
        RUN/metrics.jsonl in the order of the evaluations."""
        order = [
            (stage, task)
            for stage in EVAL_STAGES
            if (self.run / stage / "config.json").exists()
            for task in self.all_tasks
        ]
        if self.p.eval_unseen_n and (self.run / "grpo" / "config.json").exists():
            order += [("grpo", in_unseen_wordings(task)) for task in self.all_tasks]  # asked as none was
        if self.p.eval_second_turn_n and (self.run / "grpo" / "config.json").exists():
            # GRPO's start too where GRPO drew them (`grpo_second_turn`): the report gives its gain there
            asked = ("sft", "grpo") if self.p.grpo_second_turn else ("grpo",)
            order += [(stage, as_second_turn(task)) for stage in asked for task in self.all_tasks]
        if self._one_queue_per_checkpoint():
            by_checkpoint: dict[str, list[str]] = {}
            for stage, task in order:
                by_checkpoint.setdefault(stage, []).append(task)
            jobs = list(by_checkpoint.items())
        else:
            # one family a job on a CPU, where a step's cost grows with its rows: whole checkpoints made
            # the cpu preset's evaluation slower on one worker and on two, the samples identical
            # (benchmarks/README.md, "The gpu preset on an H200")
            jobs = [(stage, [task]) for stage, task in order]
        logs = self.run / "eval" / ".logs"
        shutil.rmtree(logs, ignore_errors=True)  # an interrupted evaluation's records, never merged
        workers = 2 if self.overlaps() and len(jobs) > 1 else 1
        results: dict[str, float] = {}

        def done(stage: str, tasks: list[str], ms: list[dict[str, Any]]) -> None:
            for task, m in zip(tasks, ms, strict=True):
                results[f"{stage}/{task}"] = m["pass@1"]
                # as the report shows it: no "± 0.0" where the scores do not vary over the problems
                interval = plus_minus(pass_at_1_margin(m))
                print(
                    f"  eval {stage:8s} {task}: pass@1 {m['pass@1']:.1%}{interval}{' (95%)' if interval else ''}, "
                    f"format {m['format_rate']:.1%}"
                    # a pass whose reasoning concluded otherwise ("So 85 is smaller." and 85 as the largest)
                    + (f", concluded {m['pass@1_concluded']:.1%}" if "pass@1_concluded" in m else ""),
                    flush=True,
                )

        if workers == 1:
            for stage, tasks in jobs:
                done(stage, tasks, _evaluate_checkpoint(str(self.run), self.p, stage, tasks, self.progress))
        else:
            import multiprocessing
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            import torch

            threads = max(1, torch.get_num_threads() // workers)
            with ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_with_tasks,
                initargs=(_carried_tasks() or {}, _set_threads, (threads,)),
            ) as pool:
                try:
                    futures = {
                        pool.submit(_evaluate_checkpoint, str(self.run), self.p, stage, tasks, False): (
                            stage,
                            tasks,
                        )
                        for stage, tasks in jobs
                    }
                    pending = set(futures)
                    while pending:
                        # a bounded wait: the kernel may deliver a Ctrl-C or SIGTERM to the pool's own
                        # thread, and then nothing interrupts an unbounded one before an evaluation ends
                        finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        for future in (f for f in futures if f in finished):
                            done(*futures[future], future.result())
                except BaseException:
                    # Ctrl-C or a failed evaluation: the queued ones are not run before it is reported,
                    # nor the running ones waited for: a SIGTERM to this process alone (`kill`, Kubernetes)
                    # reached no worker, and the stop waited for their whole evaluations (the pool keeps
                    # its workers private: Python 3.14's `terminate_workers` does this)
                    processes = list((getattr(pool, "_processes", None) or {}).values())
                    pool.shutdown(wait=False, cancel_futures=True)
                    for worker in processes:
                        worker.terminate()
                    raise
        for stage, task in order:
            append_records(self.run / "metrics.jsonl", read_metrics(logs / _job_name(stage, task)))
        shutil.rmtree(logs, ignore_errors=True)
        return {"pass@1": {k: results[k] for k in (f"{s}/{t}" for s, t in order)}, "workers": workers}

    # -------------------------------------------------------------- helpers
    def _adopt(self, sub_run: Path, checkpoint: Path, stage: str, renamed: str) -> None:
        """Stages that write their own run dir: move the checkpoint to RUN/<stage>, merge metrics
        (their `renamed` stage records become `stage`'s)."""
        with atomic_directory(self.run / stage) as tmp:
            tmp.rmdir()
            shutil.move(str(checkpoint), tmp)
        records = list(read_metrics(sub_run))
        for r in records:
            if r.get("stage") == renamed:
                r["stage"] = stage
        append_records(self.run / "metrics.jsonl", records)
        events = sub_run / "tensorboard" / renamed  # (--tensorboard) under the stage's name too
        if events.is_dir():
            shutil.rmtree(self.run / "tensorboard" / stage, ignore_errors=True)
            (self.run / "tensorboard").mkdir(exist_ok=True)
            shutil.move(str(events), self.run / "tensorboard" / stage)
        shutil.rmtree(sub_run, ignore_errors=True)

    def _one_queue_per_checkpoint(self) -> bool:
        from nanoseek.perf import default_device

        return default_device().type == "cuda"

    def _tuning_precision(self) -> str:
        """SFT, GRPO (its rollouts too) and distillation: bf16 autocast on a GPU, whose grouped expert
        GEMM has a fast kernel for bf16 only (fp32 takes a loop with a host sync per call); fp32 on a
        CPU, where the recipe was tuned, and wherever `precision` is forced to fp32."""
        from nanoseek.perf import default_device
        from nanoseek.train.pretrain import resolve_precision

        wanted = "fp32" if self.p.precision == "fp32" else "auto"
        return resolve_precision(wanted, default_device(), bf16_on_cpu=False)

    def _engine_batch(self) -> _EngineBatch:
        return {"max_batch_size": self.p.engine_batch} if self.p.engine_batch else {}

    def _wall_time(self, stage: str) -> float | None:
        """The stage's seconds over every process that ran it, as the report counts them: a stage killed
        and resumed spent its first process's too (its marker holds the last one's only)."""
        wall = RunMetrics(self.run).wall_time(stage)
        marker = self.run / stage / DONE
        if wall is None and marker.exists():  # a metrics log without the stage's records
            return read_json_object(marker).get("wall_time_s")
        return wall

    def model_facts(self) -> None:
        """Accounting and decode speed of the final model, for the report's summary table. Measured
        once: rerunning a finished run must not replace the figure with one taken on a busier machine."""
        from nanoseek.accounting import account
        from nanoseek.config import ModelConfig

        if any(r.get("event") == "model" for r in read_metrics(self.run, "speedrun")):
            return
        cfg = ModelConfig.load(self.run / "grpo")
        acc = account(cfg).to_dict()
        tok_s = self._decode_speed()
        MetricsLog(self.run, "speedrun").log(
            event="model",
            total_params=acc["total_params"],
            active_params=acc["active_params"],
            kv_cache_bytes_per_token=acc["kv_cache_bytes_per_token"],
            mha_kv_cache_bytes_per_token=acc["mha_kv_cache_bytes_per_token"],
            attention_variant=acc["attention_variant"],
            decode_tokens_per_s=tok_s,
        )

    def _decode_speed(self, tokens: int = 64) -> float:
        from nanoseek.checkpoint import load_model
        from nanoseek.engine import Engine, SamplingParams
        from nanoseek.perf import default_device

        # as `nanoseek generate` and `serve` would load it here ("auto": bf16 on a GPU)
        model = load_model(self.run / "grpo", dtype="auto", device=default_device()).eval()
        engine = Engine(model, max_batch_size=1)
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))  # warm-up
        t0 = time.perf_counter()
        out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=tokens, stop_token_ids=[]))
        return round(len(out[0]) / (time.perf_counter() - t0), 1)

    def finalize(self) -> Path:
        """RUN/final: the GRPO checkpoint (model + tokenizer), without training state."""
        from fnmatch import fnmatch

        skipped = ("train_state", DONE, "eval_*.json")
        ignore = shutil.ignore_patterns(*skipped)
        failed: list[OSError] = []

        def held(d: Path) -> dict[Path, tuple[int, int]]:
            """The files a copy holds, by size and time (copy2 keeps the time)."""
            files = (p for p in d.rglob("*") if p.is_file())
            kept = (
                p for p in files if not any(fnmatch(n, k) for n in p.relative_to(d).parts for k in skipped)
            )
            return {p.relative_to(d): (p.stat().st_size, p.stat().st_mtime_ns) for p in kept}

        # A rerun (its report refused by a full disk: "make room and rerun") copied the model again,
        # needing room for two copies of it beside the one already there (the swap keeps the old one)
        restore_directory(self.run / "final")
        if (self.run / "final").is_dir() and held(self.run / "final") == held(self.run / "grpo"):
            return self.run / "final"

        def copy(src: str | os.PathLike, dst: str) -> None:
            try:
                shutil.copy2(src, dst)
            except OSError as e:
                e.filename, e.filename2 = dst, None  # the file it could not write
                failed.append(e)
                raise

        with atomic_directory(self.run / "final") as tmp:
            try:
                shutil.copytree(self.run / "grpo", tmp, ignore=ignore, dirs_exist_ok=True, copy_function=copy)
            except shutil.Error:
                # copytree folds its copies' errors into one with neither errno nor file: a full disk was a
                # traceback, not the one line that says to make room and rerun (`STORAGE_ERRORS`)
                if not failed:
                    raise
                raise failed[0] from None
        return self.run / "final"

    # ------------------------------------------------------------------ run
    def _locked(self) -> contextlib.AbstractContextManager:
        """Hold RUN while this run works in it: a second speedrun into the same --out would train the
        same stage beside it, and each would delete the other's scratch files at its save."""
        return exclusive(
            self.run / ".lock",
            f"{self.run} is in use by a running speedrun ({{holder}}): wait for it to finish, or stop it "
            "and rerun to resume, or choose another --out",
        )

    def _refuse_foreign(self) -> None:
        """Refuse an --out that holds what no speedrun writes, before writing anything there: the
        stages would mix their files with its own, replace its `final/` or `report.md`, and append to
        its `metrics.jsonl`."""
        if (self.run / SETTINGS).exists():
            return
        foreign = sorted(p.name for p in self.run.iterdir() if p.name not in RUN_ENTRIES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(
                f"{self.run} holds no speedrun (no {SETTINGS}) but other files ({shown}): a run there "
                "would mix its files with them; choose a new or empty --out"
            )

    def __call__(self) -> Path:
        self._refuse_foreign()
        try:
            with self._locked():
                return self._run_all()
        except OSError as e:
            if e.errno not in STORAGE_ERRORS:
                raise
            where = e.filename or self.run
            raise ValueError(
                f"cannot write {where}: {e.strerror}; make room (or choose another --out) and rerun: "
                "finished stages are kept"
            ) from None

    def _run_all(self) -> Path:
        import torch

        # Setting the thread count turns MKL's dynamic threading off too, which changes a GEMM's last
        # bits. The stages beside another set it, so every run sets it first: a process resumed past
        # them (at SFT) would otherwise train another model than the run never stopped.
        torch.set_num_threads(torch.get_num_threads())
        self._claim_directory()
        if not any(r.get("event") == "plan" for r in read_metrics(self.run, "speedrun")):
            MetricsLog(self.run, "speedrun").log(
                event="plan",
                preset=self.p.name,
                tasks=list(self.p.tasks),
                verifier_only_tasks=list(self.p.verifier_only_tasks),
            )
        # side by side wherever the CPU allows it, resumed or not: a stage's thread count, and with it
        # its figures, must not depend on whether the run stopped after the stage beside it was done
        beside = self.p.student_steps and self.overlaps()
        stages: list[tuple[str, Callable[[], dict[str, Any] | None]]] = [
            ("tokenizer", self.tokenizer),
            ("pretrain", self.pretrain_beside_student if beside else self.pretrain),
        ]
        if self.p.student_steps:
            stages.append(("student", self.student))
        control_beside = self.p.control and self.overlaps()
        stages += [("sft", self.sft), ("grpo", self.grpo_beside_control if control_beside else self.grpo)]
        if self.p.control:
            stages.append(("control", self.control))
        stages += [("distill", self.distill), ("eval", self.evaluate)]
        for i, (name, fn) in enumerate(stages, 1):
            self._stage(i, len(stages), name, fn)
        final = self.finalize()
        self.model_facts()
        from nanoseek.report import build_report

        report = build_report(self.run)
        # the run's time over every process that ran it (a resumed run's earlier ones too), as the report
        wall = RunMetrics(self.run).run_wall_time()
        print(
            f"speedrun ({self.p.name}) finished in {wall / 60:.1f} min: chat with `nanoseek chat {shell_quoted(final)}`, "
            f"report at {report}"
        )
        return final


def _set_threads(threads: int) -> None:
    """A spawned worker's setup (the student's or control's process, an evaluation worker): its share
    of the CPU threads, and an end with the run's process."""
    import torch

    _exit_with_parent()
    torch.set_num_threads(threads)


def _carried_tasks() -> dict[str, Any] | None:
    """The families registered in this process (`register_task`), which a spawned process does not
    have: it starts from the built-in ones (a notebook's registrations, or a script's under its
    `__main__` guard, are not run there). None where one cannot be sent: a lambda or a local function
    does not pickle, and a notebook's class (a `__main__` without a file) is not found there, nor a
    script's defined under its `__main__` guard (or any block: indented), which a spawned process leaves
    out when it runs the script again."""
    import inspect
    import pickle

    from nanoseek.data.tasks import registered_tasks

    tasks = registered_tasks()
    for factory in tasks.values():
        module = sys.modules.get(getattr(factory, "__module__", None) or "")
        if module is not None and module.__name__ == "__main__":
            if not getattr(module, "__file__", None):
                return None
            # pickled by name, it broke the evaluation's pool (and a stage's process) at its first task
            try:
                if inspect.getsourcelines(factory)[0][0][:1].isspace():
                    return None
            except (OSError, TypeError):
                return None
        try:
            pickle.dumps(factory)
        except (pickle.PicklingError, AttributeError, TypeError):
            return None
    return tasks


def _with_tasks(tasks: dict[str, Any], target: Callable[..., None], args: tuple) -> None:
    """A spawned process's start: the run's registered families (`_carried_tasks`), then `target(*args)`."""
    from nanoseek.data.tasks import register_task

    for name, factory in tasks.items():
        register_task(name, factory)
    target(*args)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Processes started inside ignore SIGINT from their first line (an ignored signal outlives exec).
    A Ctrl-C reaches the whole process group: a stage's spawned process would print its own traceback
    of the KeyboardInterrupt over the run's one-line message, where the run's process ends it instead.
    Off the main thread (where handlers cannot be set) nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _exit_when_interrupted() -> Iterator[None]:
    """A stage's spawned process stopped by a signal (its checkpoint saved) ends with the signal's exit
    code, unmarked, and without the traceback multiprocessing prints: the run's process says how the
    run resumes. One that a full or read-only disk stopped says so in one line (the file, and where its
    steps went), not under that traceback: the run's process runs the stage again alone next."""
    import multiprocessing

    try:
        yield
    except TrainingInterrupted as e:
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in STORAGE_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{multiprocessing.current_process().name}: error: {where}{e.strerror}", file=sys.stderr)
        sys.exit(2)


def _exit_with_parent() -> None:
    """A worker that outlives the run's process (killed by the OOM killer, or `kill -9`) would go on
    training and writing into RUN, racing the rerun that resumes it: a thread watches the parent and
    ends the worker once it is gone (its writes are atomic, so nothing is left half written)."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    pid = parent.pid

    def watch() -> None:
        if sys.platform == "win32":
            # Windows gives an orphan no new parent: os.getppid() named the dead one on and on, and the
            # worker trained on; the parent's process handle (what join waits on) is signalled at its end
            parent.join()
        else:
            while os.getppid() == pid:
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def _quiet_beside() -> Iterator[None]:
    """A stage beside another prints nothing on stdout, as it draws no bar: its lines landed on the end
    of the run's progress bar ("...imb=1.81]step 10: val_loss 2.0079"), under the name of the stage it
    runs as (the student's as "pretrain:", the control's as "sft: time budget spent at step 2/100") with
    a scratch directory for its checkpoint. Its records are in metrics.jsonl; errors still go to stderr."""
    with open(os.devnull, "w", encoding="utf-8") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _run_stage(
    out: str, preset: SpeedrunPreset, stage: str, beside: str, tensorboard: bool, threads: int
) -> None:
    """A stage in its own process (spawned), marked done as the main process would mark it."""
    _set_threads(threads)
    run = Speedrun(out, preset, progress=False, tensorboard=tensorboard)
    t0 = time.perf_counter()
    with _exit_when_interrupted():
        with _quiet_beside():
            fields = getattr(run, stage)() or {}
        run._mark_done(stage, time.perf_counter() - t0, beside=beside, threads=threads, **fields)


def _control_beside_grpo(out: str, preset: SpeedrunPreset, tensorboard: bool, end: Any, threads: int) -> None:
    """The control stage in its own process (spawned) until GRPO's end, which the main process keeps
    in `end` (a shared time.time(); 0 while not yet known)."""
    _set_threads(threads)
    run = Speedrun(out, preset, progress=False, tensorboard=tensorboard)
    t0 = time.perf_counter()

    asked = [0]

    def deadline() -> float | None:
        # asked before every step; the first always runs: a control that trained nothing compares nothing
        asked[0] += 1
        if asked[0] == 1 or not end.value:
            return None
        return time.perf_counter() + (end.value - time.time())

    with _exit_when_interrupted():
        with _quiet_beside():
            fields = run.control(deadline_fn=deadline) or {}
        run._mark_done("control", time.perf_counter() - t0, beside="grpo", threads=threads, **fields)


def _job_name(stage: str, task: str) -> str:
    """A file name for one evaluation: `grpo_sorting`, `grpo_sorting_wording_unseen`."""
    return f"{stage}_{slug(task)}"


def _evaluate_checkpoint(
    out: str, preset: SpeedrunPreset, stage: str, tasks: list[str], progress: bool
) -> list[dict[str, Any]]:
    """One checkpoint on its families (possibly in a worker process); each evaluation's records go to a
    side log that `Speedrun.evaluate` merges in order."""
    from nanoseek.evaluate import EvalConfig, evaluate_many

    run = Path(out)
    return evaluate_many(
        [
            EvalConfig(
                model=str(run / stage),
                task=task,
                k=preset.eval_k,
                n=preset.eval_unseen_n
                if is_unseen_wordings(task)
                else preset.eval_second_turn_n
                if is_later_turn(task)
                else preset.eval_n,
                max_new_tokens=preset.max_new_tokens,
                seed=preset.seed,
                out=str(run / "eval" / f"{_job_name(stage, task)}.json"),
                max_batch_size=preset.engine_batch or None,
                run_dir=str(run / "eval" / ".logs" / _job_name(stage, task)),
                progress=progress,
            )
            for task in tasks
        ]
    )


def run_speedrun(
    out: str | Path,
    preset: str = "cpu",
    progress: bool = True,
    families: str | Sequence[str] | None = None,
    tensorboard: bool = False,
    **overrides: Any,
) -> Path:
    """Run (or resume, or re-read) the speedrun in `out`. `families` is `--tasks`: the preset on those
    families (`SpeedrunPreset.with_tasks`); `overrides` replace the preset's fields as they are.
    `tensorboard`: every training stage also writes TensorBoard events to RUN/tensorboard/<stage>/."""
    if preset not in PRESETS:
        raise ValueError(f"unknown speedrun preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if preset == "gpu" and not (Path(out) / "report.md").exists():
        import torch

        # the `small` model on 400 x 64 x 320 tokens would take the CPU many hours: said before the
        # tokenizer, not found deep into pretraining. A finished run is still re-read (bench_speedrun)
        if not torch.cuda.is_available():
            raise ValueError(
                "the gpu preset is sized for one CUDA GPU and torch sees none here "
                f"(torch {torch.__version__}); run --preset cpu on a CPU"
            )
    if tensorboard:  # its package said now, not at pretraining, once the tokenizer is trained
        from nanoseek.train.loop import require_tensorboard

        require_tensorboard()
    p = dataclasses.replace(PRESETS[preset], **overrides)
    if families is not None:
        p = p.with_tasks(split_tasks(families) if isinstance(families, str) else families)
    return Speedrun(out, p, progress=progress, tensorboard=tensorboard)()
