"""The one training loop shared by pretrain, SFT, GRPO and distillation.

What is notable here:
- The objective is a callable returning (loss, metrics) for one micro-batch, weighted by the caller;
  `Trainer.step` runs it `accumulation` times, sums, then clips, guards, steps AdamW and the schedule. `language_model_loss` is the
  next-token objective with DeepSeek-V3's extras: the MTP loss weighted by λ (V3 §2.2, eq. 25) and the
  sequence-wise balance loss α (V3 eq. 17-20).
- AdamW with decoupled weight decay applied to matrices only: norms, biases and the token embedding
  are not decayed (the common practice of GPT-NeoX, OLMo, Llama recipes; decaying embeddings shrinks
  rare tokens' rows for no gain). The router's weight is a matrix and is decayed.
- Schedules: linear warmup, then cosine, WSD (warmup-stable-decay, V3 §4.2: constant, then a cosine
  decay over the final `decay_fraction` of steps) or constant, down to `min_lr_ratio`·lr.
- Auxiliary-loss-free balancing (V3 §2.1.2): after each optimizer step every router's selection bias
  moves by γ·sign(mean load − load), from the loads of that step (all-reduced across ranks), so
  overloaded experts get chosen less. γ = 0.001 as in V3.
- NaN / loss-spike guard: a step whose loss or gradient norm is not finite, or whose loss exceeds
  `spike_factor` × the running mean by at least `spike_min_delta` nats, is skipped (no update, no bias
  move; it still counts as a step of the schedule) and logged as such; `max_consecutive_skips` in a row
  end the run (`TrainingDiverged`), as do weights an update made non-finite at a save.
- Checkpoints are HF-layout directories written atomically (`RUN/<stage>/`, with tokenizer files and
  `train_state/`: optimizer, step, RNG, guard and data position), so `resume()` continues bit-exactly;
  it refuses a resume whose training settings changed, which would continue as another run.
- `StepLog`, composed beside the Trainer by the stages that want it: progress bar with loss, tokens/s
  and MFU (model FLOPs against the measured matmul peak of the precision in use); metrics.jsonl via
  `MetricsLog`; optional TensorBoard. GRPO writes its records through it too, with a bar of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.autograd.graph import increment_version

from nanoseek.accounting import counted
from nanoseek.checkpoint import non_finite
from nanoseek.metrics import MetricsLog, progress_bar
from nanoseek.train import TrainingDiverged, TrainingInterrupted, alike_on_every_rank, one_process
from nanoseek.train.distributed import (
    DistInfo,
    all_reduce_,
    barrier,
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
    shard_model,
)

if TYPE_CHECKING:
    from nanoseek.model.moe import Router
    from nanoseek.model.transformer import DeepSeekV3

LossFn = Callable[[], tuple[torch.Tensor, dict[str, Any]]]
PRECISIONS = ("bf16", "fp32", "fp8")
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
REFIT_EVERY = 5  # steps between refits of a time-budgeted run's step count
# A repeat of the stop signal this soon after the first is the same stop delivered twice, not a second
# request: a terminal's Ctrl-C reaches every process of its group, and torchrun forwards it to its ranks.
REPEAT_WINDOW_S = 1.0
_STOP_PENDING: list[int] = []  # the signal a running stage received and has not yet stopped for


def stop_pending() -> bool:
    """Whether a SIGINT/SIGTERM asked the stage running in this process to stop (`Trainer.stop_on_signals`)
    and it has not yet: for a callback that waits inside a step (the speedrun's teacher waiting for its
    student), which would otherwise hold the stop up for as long as it waits."""
    return bool(_STOP_PENDING)


# ------------------------------------------------------------------ config
@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # V3 §4.2
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: share of steps in the final decay
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still measured and guarded)
    # "muon": Muon on the hidden matrices, AdamW on the rest, one lr for both (train/muon.py)
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} not in {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} not in {', '.join(OPTIMIZERS)}")
        # written so that NaN fails too: a NaN clip or decay passes the guard (the norm it checks is
        # measured before clipping) and writes NaN into every weight on the first step
        if not (self.warmup_steps >= 0 and self.grad_clip >= 0 and 0 <= self.weight_decay < math.inf):
            raise ValueError(
                "warmup_steps, weight_decay and grad_clip must be >= 0 (weight_decay finite), got "
                f"{self.warmup_steps}, {self.weight_decay} and {self.grad_clip}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")

    def check_world_size(self, world_size: int) -> None:
        if self.optimizer == "muon" and world_size > 1:
            # each rank holds a shard of a matrix; its orthogonalization needs the whole matrix
            raise ValueError("optimizer 'muon' runs in one process only; use 'adamw' with several ranks")


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Factor on cfg.lr for 0-based optimizer step `step` of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    # Decay progress counts steps done as warmup does (step + 1): the run's last step, total_steps - 1,
    # is the one that reaches the floor, not the step after it, which never runs.
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step + 1 - cfg.warmup_steps) / span)
    else:  # wsd: flat until the last decay_fraction of the run
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step + 1 - start) / max(1, total_steps - start))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _fused_adamw_ok(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
        for p in params
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices decay; norms, biases, embeddings do not (see the module docstring)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------- objective
def target_counts(
    targets: torch.Tensor, mtp_depths: int, ignore_index: int = -100, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """How many positions each loss term trains: [main head, MTP depth 0, 1, ...] (float64).
    doc_ids: the packed documents of a `document_mask` batch (`packed_documents`)."""
    from nanoseek.model.transformer import mtp_targets

    terms = [targets, *(mtp_targets(targets, k, doc_ids, ignore_index) for k in range(mtp_depths))]
    return torch.tensor([(t != ignore_index).sum().item() for t in terms], dtype=torch.float64)


def packed_documents(model: DeepSeekV3, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, positions) [B,S] of packed rows whose documents each open with the model's BOS."""
    from nanoseek.model.attention import documents_from_bos

    bos = model.config.bos_token_id
    if bos is None:  # (`input_ids == None` is a plain False: "'bool' object has no attribute 'long'")
        raise ValueError("document masking splits packed rows at BOS tokens: this model's config has no BOS")
    return documents_from_bos(input_ids, bos)


@dataclass
class StepTargets:
    """A whole optimizer step's targets, so that each micro-batch's loss is its share of the step's
    mean: N ranks and micro-batches whose rows hold different numbers of targets (prompts masked,
    documents padded) then train exactly as one batch of all their rows would."""

    counts: torch.Tensor  # `target_counts` summed over the step's micro-batches and ranks
    world_size: int = 1  # data parallelism averages the ranks' gradients: each rank's share is scaled up
    micro_batches: int = 1


def language_model_loss(
    model: DeepSeekV3,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    mtp_weight: float = 0.0,
    ignore_index: int = -100,
    document_mask: bool = False,
    step: StepTargets | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy + λ·MTP loss + the routers' sequence-wise balance loss.

    targets[:, i] is the token after input_ids[:, i] (ignore_index masks a position). MTP depth k
    predicts the token k+1 further on, so its targets are targets shifted by k+1 (V3 eq. 24-25:
    L_MTP = λ/D Σ_k L_k). With `document_mask`, a packed row's documents (each opened by the model's
    BOS) attend only within themselves and count positions from their own start, as they will when
    they are prompts; V3 §4.1 packs the same way ("document packing", no cross-sample mask there, but
    its documents are long and unrelated, ours are short and look alike). MTP then predicts nothing
    across a boundary either (`mtp_targets`).

    Each cross-entropy is a mean over this batch's targets; with `step`, this batch's share of the
    mean over the whole step's (`StepTargets`), and the balance loss, a mean over sequences, divided by
    the step's micro-batches. token_mask [B,S]: the tokens the routers' balancing counts (False at
    padding; None: all).
    """
    doc_ids = positions = mask = None
    if document_mask:
        from nanoseek.model.attention import document_causal_mask

        doc_ids, positions = packed_documents(model, input_ids)
        mask = document_causal_mask(doc_ids)
    lm, hidden = model(
        input_ids,
        positions,
        mask=mask,
        return_hidden=True,
        labels=targets,
        ignore_index=ignore_index,
        token_mask=token_mask,
    )
    depths = len(model.model.mtp_layers)
    # per term: which have targets here (a depth's shifted targets can all be masked, leaving its mean
    # NaN; the others still train), and with `step` each term's share of the step's mean
    counts = None
    if step is not None or (mtp_weight > 0 and depths):
        counts = target_counts(targets, depths, ignore_index, doc_ids)

    def weighted(term: torch.Tensor, k: int) -> torch.Tensor:
        """A term's share of the step's mean (no `step`: the batch's own mean); one with no target adds 0."""
        if counts is not None and counts[k] == 0:  # a zero still on the graph: backward runs
            return term.nan_to_num(0.0) * 0.0
        if step is None:
            return term
        assert counts is not None  # counted whenever there is a `step`
        return term * (counts[k] * step.world_size / step.counts[k]).item()

    loss = weighted(lm, 0)
    # logged as shares too: the Trainer averages metrics over micro-batches (and ranks), so they add up
    # to the step's mean over every target, as the loss does
    share = 1 if step is None else step.micro_batches
    metrics: dict[str, Any] = {"lm_loss": (loss * share).detach(), "tokens": input_ids.numel()}
    if mtp_weight > 0:
        per_depth = model.mtp_losses(
            hidden, input_ids, targets, ignore_index, positions, mask, doc_ids, token_mask
        )
        if per_depth:
            terms = [weighted(x, k + 1) for k, x in enumerate(per_depth)]
            mtp_loss = torch.stack(terms).mean()
            loss = loss + mtp_weight * mtp_loss
            metrics["mtp_loss"] = (mtp_loss * share).detach()
            if len(terms) > 1:  # each depth's own, named as its router ('mtp0'): the mean hid a lagging one
                metrics.update({f"mtp{k}_loss": (x * share).detach() for k, x in enumerate(terms)})
    balance = model.balance_loss()
    if balance is not None:
        loss = loss + (balance if step is None else balance / step.micro_batches)
        metrics["balance_loss"] = balance.detach()
    return loss, metrics


# ---------------------------------------------------------------- accounting
def training_flops_per_token(model: DeepSeekV3, seq_len: int, include_mtp: bool = True) -> float:
    """Model FLOPs per trained token, as nanoseek.accounting counts them."""
    from nanoseek.accounting import flops_per_token

    return float(flops_per_token(model.config, seq_len=seq_len, training=True, include_mtp=include_mtp))


def warn_unused_bias_speed(config: Any, stage: Any) -> None:
    """A stage's --bias-update-speed given (not its default) for a model whose routers never read the bias:
    V2's greedy and group_limited_greedy pick experts by their softmax scores alone (only V3's noaux_tc
    adds the bias, §2.1.2). Said once, not trained without a word. A dense model has no router to
    mislead: quiet (the speedrun gives its dense student the MoE model's setting)."""
    speed = stage.bias_update_speed
    if speed == type(stage).bias_update_speed or speed <= 0:  # the default stays quiet
        return
    if not config.n_routed_experts or config.topk_method == "noaux_tc":
        return
    import warnings

    why = (
        f"its routers (topk_method {config.topk_method}) never read the balancing bias, which only V3's "
        "noaux_tc routing adds to its scores"
    )
    warnings.warn(f"--bias-update-speed {speed:g} does nothing for this model: {why}", stacklevel=2)


def warn_unused_model_flags(config: Any, stage: Any) -> None:
    """Pretraining's --balance-alpha and --expert-load-every for a model without routed experts
    (tiny-dense, Qwen2, Llama) and --mtp-weight for one without MTP modules: given, they did nothing and
    left no word of it; said once each. Left out (the preset's α, the defaults, which the speedrun and
    the ablations give every model), quiet. Called before the preset's α fills a left-out --balance-alpha."""
    import warnings

    no_experts = "it has no routed experts"
    unused = []
    if getattr(stage, "balance_alpha", None) and not config.n_routed_experts:
        unused.append(("--balance-alpha", stage.balance_alpha, no_experts))
    every = getattr(stage, "expert_load_every", 0)
    if every and every != type(stage).expert_load_every and not config.n_routed_experts:
        unused.append(("--expert-load-every", every, no_experts))
    weight = getattr(stage, "mtp_weight", 0.0)
    if weight and weight != type(stage).mtp_weight and not config.num_nextn_predict_layers:
        unused.append(("--mtp-weight", weight, "it has no MTP modules (num_nextn_predict_layers 0)"))
    for flag, value, why in unused:
        warnings.warn(f"{flag} {value:g} does nothing for this model: {why}", stacklevel=2)


def _routers(model: nn.Module) -> Iterator[tuple[str, Router]]:
    """Every MoE router with a readable layer name ('3', or 'mtp0' for MTP depth 0)."""
    return model.routers()  # type: ignore[operator]


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v


# ------------------------------------------------------------------- trainer
def _refuse_non_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Weights a stage would start from that hold NaN or inf: every step's loss is NaN, so every step
    was skipped and the run ended as "diverged" (lower the learning rate) after ten of them."""
    broken = non_finite(state)
    if broken:
        # every rank reads the same weights: rank 0 says it, under torchrun
        raise alike_on_every_rank(
            ValueError(
                f"{source} holds NaN or inf in {counted(len(broken), 'weight tensor')} "
                f"(e.g. {', '.join(broken[:2])}): nothing trains from it (every step's loss would be NaN); "
                "start from a checkpoint saved before its run diverged"
            )
        )


def hold_stage(run_dir: str | os.PathLike, stage: str) -> contextlib.AbstractContextManager:
    """Hold RUN/<stage>/ while a stage trains into it (rank 0 holds it for all ranks): a second run of
    the stage into the same --out (another terminal) interleaved its steps with this one's in
    metrics.jsonl, and at their saves each deleted the other's scratch checkpoint (a crash, or a
    checkpoint with files of both). The speedrun holds its whole RUN the same way."""
    from nanoseek.atomic import exclusive

    if int(os.environ.get("RANK", "0")):
        return contextlib.nullcontext()
    ckpt = Path(run_dir) / stage
    return exclusive(
        ckpt.with_name(f".{stage}.lock"),
        f"{ckpt} is in use by a running {stage} ({{holder}}): wait for it to finish (or stop it and "
        "rerun with --resume), or choose another --out",
    )


class Trainer:
    """The optimizer step of a stage: AdamW and its schedule, precision, the aux-loss-free bias, the
    NaN/spike guard and checkpoints. What the stage optimizes (and how its micro-batch losses are
    weighted) is the caller's loss function; what it shows and records per step is `StepLog`'s.

    Typical use::

        trainer = Trainer(model, run, "pretrain", OptimConfig(lr=3e-3), total_steps=500)
        trainer.resume()
        log = StepLog.for_trainer(trainer, seq_len=512)
        while not trainer.done:
            log.step(trainer.step(lambda: language_model_loss(model, *next(batches)), accumulation=2))
        trainer.save(); log.close()

    A step that ends the run as diverged raises `TrainingDiverged` instead of returning its metrics:
    `log.ended_by(error)` records them.
    `model` is the unwrapped module; the trainer applies fp8 conversion and FSDP2 itself (`trainer.model`).
    With a `deadline` (a time.perf_counter() value) the schedule's length is refit to the pace measured,
    so a time-budgeted run still anneals by the deadline instead of being cut off mid-decay.
    `deadline_later`: the stage sets `deadline` as it goes (`train_on_examples`' deadline_fn), so
    `total_steps` is a first estimate there too.
    """

    def __init__(
        self,
        model: DeepSeekV3,
        run_dir: str | os.PathLike,
        stage: str,
        optim: OptimConfig,
        total_steps: int,
        precision: str = "bf16",
        checkpoint_every: int = 0,
        *,
        tokenizer: Any = None,
        bias_update_speed: float = 0.001,
        spike_factor: float = 3.0,
        spike_warmup: int = 20,
        # A divergence moves the loss by nats; near zero a ratio alone flags the batches the model still
        # gets wrong (the speedrun's SFT at ~0.003 nats skipped batches at 0.01-0.03: the ones to learn from)
        spike_min_delta: float = 0.5,
        max_consecutive_skips: int = 10,
        deadline: float | None = None,
        deadline_later: bool = False,
        dist: DistInfo | None = None,
        config_extra: dict[str, Any] | None = None,
        resume_settings: dict[str, Any] | None = None,
        flags_from: type | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in {', '.join(PRECISIONS)}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        low = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
        if low is not None:
            # AdamW would keep its moments and the weights in 16 bits, whatever `precision` says: small
            # updates round away (most of a layer's at lr 1e-5), and the checkpoint is saved in 16 bits
            raise ValueError(
                f"the model {stage} starts from holds weights in {low}: {stage} keeps fp32 master weights and "
                f"optimizer state (precision {precision!r} sets only its matmuls' autocast dtype); load it in "
                "float32 (load_model's default dtype) or call model.float() first"
            )
        if not 0 <= bias_update_speed < math.inf:  # NaN fails too: it made every router's bias NaN
            raise ValueError(f"bias_update_speed (γ) must be >= 0 and finite, got {bias_update_speed}")
        if dist is None:
            # each of torchrun's processes would train the whole batch on its own and write the same
            # checkpoint and metrics as the others
            one_process(f"{stage} trains", ", or pass Trainer(dist=init_distributed())")
        # one process: where the model is (a stage that loaded it on a GPU trains there)
        self.dist = dist or DistInfo(device=next(model.parameters()).device)
        optim.check_world_size(self.dist.world_size)
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.optim_config = optim
        self.total_steps = total_steps
        self.precision = precision
        self.checkpoint_every = checkpoint_every
        self.tokenizer = tokenizer
        self.bias_update_speed = bias_update_speed
        self.spike_factor = spike_factor
        self.spike_warmup = spike_warmup
        self.spike_min_delta = spike_min_delta
        self.max_consecutive_skips = max_consecutive_skips
        self.deadline = deadline
        self.deadline_later = deadline_later
        self.config_extra = config_extra or {}
        # the stage's own settings (by field name) that `resume` must find unchanged, beside the trainer's
        self.resume_settings = resume_settings or {}
        self.flags_from = flags_from  # the stage's config dataclass: a refused resume names its flags
        self.base_model = model
        self.config = model.config

        _refuse_non_finite(model.state_dict(), f"the model {stage} starts from")
        if precision == "fp8":
            from nanoseek.model.fp8 import convert_to_fp8_training

            convert_to_fp8_training(model)  # in place: same parameters, FP8 GEMMs
        self.model = shard_model(model, self.dist)
        from nanoseek.perf import say_if_bf16_is_emulated, tune_malloc

        if precision == "bf16" and self.dist.device.type == "cpu" and self.dist.is_main:
            say_if_bf16_is_emulated(stage)
        tune_malloc()  # reuse freed activation memory instead of page-faulting it in every step
        self.optimizer = self._optimizer(optim)
        self.global_step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._saved = False  # whether RUN/<stage>/ holds a checkpoint of this run (saved or resumed)
        self._loss_mean: float | None = None  # running mean of accepted losses (spike guard)
        self._good_steps = 0
        self._paced_from: tuple[int, float] | None = None  # (step, time) the deadline's pace counts from
        self._warmup_steps = optim.warmup_steps  # as given: a deadline's refit cuts it to fit the steps
        self._signal = 0  # the first SIGINT/SIGTERM this rank received inside `stop_on_signals`
        self._signal_at = 0.0
        self.stop_signal = 0  # the one every rank agreed on at `stop_requested` (0: none)

    # ------------------------------------------------------------ helpers
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / self.stage

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast (CPU included) for bf16/fp8; weights and optimizer state stay fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)

    def _optimizer(self, optim: OptimConfig) -> torch.optim.Optimizer:
        adamw: dict[str, Any] = dict(
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            # One fused kernel per parameter instead of ~10 elementwise passes: 2-4x faster steps on
            # CPU. Sharded (DTensor) parameters keep the default implementation.
            fused=_fused_adamw_ok(self.model),
        )
        if optim.optimizer == "adamw":
            return torch.optim.AdamW(param_groups(self.model, optim.weight_decay), **adamw)
        from nanoseek.train.muon import Muon, muon_param_groups

        # Newton-Schulz in the precision the step multiplies in: bf16 where the CPU has it natively
        ns_dtype = torch.bfloat16 if self.precision in ("bf16", "fp8") else torch.float32
        groups = muon_param_groups(self.model, param_groups(self.model, optim.weight_decay))
        return Muon(groups, ns_dtype=ns_dtype, **adamw)

    def lr_at(self, step: int) -> float:
        return self.optim_config.lr * lr_multiplier(step, self.total_steps, self.optim_config)

    @property
    def done(self) -> bool:
        """The schedule is complete, or the deadline has passed."""
        out_of_time = self.deadline is not None and time.perf_counter() >= self.deadline
        return self.global_step >= self.total_steps or out_of_time

    def pause(self, seconds: float) -> None:
        """`seconds` spent outside training (an evaluation): the deadline moves on by them, and the pace
        the step count is refitted to leaves them out, or it plans too few steps for the time left."""
        if self.deadline is not None:
            self.deadline += seconds
        if self._paced_from is not None:
            self._paced_from = (self._paced_from[0], self._paced_from[1] + seconds)

    def _fit_to_deadline(self) -> None:
        """Refit the step count to the time left at the pace measured since the first step."""
        if self.deadline is None or self._paced_from is None:
            return
        done = self.global_step - self._paced_from[0]
        if done % REFIT_EVERY == 0:
            now = time.perf_counter()
            per_step = (now - self._paced_from[1]) / done
            self._refit(self.global_step + max(1, int((self.deadline - now) / per_step)))

    def _refit(self, total_steps: int) -> None:
        """The schedule's length, refitted to the deadline."""
        self.total_steps = total_steps
        # at most half the run, as stages cut it to their first estimate: a run refitted to fewer
        # steps than the warmup would end on its ramp, never annealed
        warmup = min(self._warmup_steps, self.total_steps // 2)
        self.optim_config = replace(self.optim_config, warmup_steps=warmup)

    # --------------------------------------------------------------- step
    def step(self, loss_fn: LossFn, accumulation: int = 1) -> dict[str, Any]:
        """One optimizer step over `accumulation` calls of loss_fn; returns this step's metrics.

        The micro-batch losses are summed as given: the caller weights them (a mean over equal-size
        micro-batches divides each by `accumulation`; GRPO's already sum to the batch loss). Metrics
        other than the loss are averaged over the micro-batches.
        """
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        started = time.perf_counter()
        if self.deadline is not None and self._paced_from is None:
            self._paced_from = (self.global_step, time.perf_counter())
        model = self.model
        model.train()
        step = self.global_step
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._take_loads()  # loads left by anything outside training (e.g. generation) do not count
        loss_sum = torch.zeros((), dtype=torch.float64)
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(accumulation):
            if self.dist.enabled:
                from torch.distributed.fsdp import FSDPModule

                if isinstance(model, FSDPModule):  # FSDP2's (`shard_model`)
                    # Reduce-scatter gradients once per step, on the last micro-batch.
                    model.set_requires_gradient_sync(micro == accumulation - 1)
            with self.autocast():
                loss, m = loss_fn()
            loss.backward()
            loss_sum += loss.detach().double().cpu()
            tokens += int(_scalar(m.pop("tokens", 0)))
            for k, v in m.items():
                v = _scalar(v)
                if isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + float(v)
        # the loss, the tokens and every other metric (lm_loss, mtp_loss, ...) over all ranks, not rank 0's
        names = sorted(sums)
        stats = torch.tensor([loss_sum.item(), float(tokens), *(sums[k] for k in names)], dtype=torch.float64)
        all_reduce_(stats, self.dist, "sum")
        loss_value = stats[0].item() / self.dist.world_size
        tokens = int(stats[1].item())
        sums = {k: v / self.dist.world_size for k, v in zip(names, stats[2:].tolist(), strict=True)}
        grad_norm = self._clip_grads()

        reason = None
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            reason = "non-finite loss" if not math.isfinite(loss_value) else "non-finite grad norm"
        elif (
            self.spike_factor > 0
            and self._loss_mean is not None
            and self._good_steps >= self.spike_warmup
            and loss_value > max(self.spike_factor * self._loss_mean, self._loss_mean + self.spike_min_delta)
        ):
            reason = (
                f"loss spike ({loss_value:.3f} > {self.spike_factor:g} x mean {self._loss_mean:.3f}, "
                f"and by more than {self.spike_min_delta:g})"
            )

        loads = self._take_loads()
        if reason is None:
            self.optimizer.step()
            if self.optimizer.defaults.get("fused"):
                # The fused kernel writes the weights without bumping their version counters, which is
                # how an Engine sharing this model (GRPO rollouts) sees that its derived weights are stale.
                increment_version([p for g in self.optimizer.param_groups for p in g["params"]])
            self._update_bias(loads)
            self._consecutive_skips = 0
            self._good_steps += 1
            # Running mean over ~the last 20 accepted steps.
            self._loss_mean = (
                loss_value if self._loss_mean is None else 0.95 * self._loss_mean + 0.05 * loss_value
            )
        else:
            self.skipped_steps += 1
            self._consecutive_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.tokens_seen += tokens

        metrics: dict[str, Any] = {
            "step": self.global_step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "step_tokens": tokens,
            "step_time_s": time.perf_counter() - started,  # the step's own: tok/s leaves out validations
        }
        metrics.update({k: v / accumulation for k, v in sums.items()})
        # only the routers that routed this step's tokens: an MTP router when the loss leaves MTP out
        # (--mtp-weight 0, SFT, GRPO) counted none, and its 0 / 0 read as an imbalance of 0, below the
        # perfect 1 (the report drew it as a "layer mtp0" line at 0)
        loads = {layer: ld for layer, ld in loads.items() if ld.sum() > 0}
        if loads:
            imb = {layer: (ld.max() / ld.mean().clamp_min(1e-9)).item() for layer, ld in loads.items()}
            metrics["expert_imbalance"] = imb
            metrics["expert_imbalance_max"] = max(imb.values())
            metrics["expert_load"] = loads  # tensors: a log that keeps them turns them into lists
        if reason is not None:
            metrics["skipped"] = reason
        if reason is not None and self._consecutive_skips >= self.max_consecutive_skips:
            first = self.global_step - self._consecutive_skips + 1
            # Not "resume from the last checkpoint": a resume keeps the run's settings (a lower lr is
            # refused) and, being exact, retraces the same steps into the same divergence
            kept = f"; the last checkpoint, in {self.checkpoint_dir}, is kept" if self._saved else ""
            raise TrainingDiverged(
                f"{self._consecutive_skips} consecutive steps skipped (optimizer steps {first}-{self.global_step}, "
                f"last: {reason}); training diverged{kept}. Lower the learning rate and train anew (a --resume "
                "goes on with this run's settings into the same steps).",
                metrics,
            )
        self._fit_to_deadline()
        if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
            self._pending_save = True
        return metrics

    def _clip_grads(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.optim_config.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the global norm
            norm = norm.full_tensor()
        return float(norm)

    def _take_loads(self) -> dict[str, torch.Tensor]:
        """Per-router token counts since the last call, summed over ranks; resets the counters."""
        loads = self.model.take_expert_load()
        if not loads:
            return {}
        flat = torch.stack([load.float() for load in loads.values()])
        all_reduce_(flat, self.dist, "sum")
        return {name: flat[i].cpu() for i, name in enumerate(loads)}

    @torch.no_grad()
    def _update_bias(self, loads: dict[str, torch.Tensor]) -> None:
        """V3 §2.1.2: b_i += γ·sign(mean load − load_i), same on every rank (loads are all-reduced)."""
        if self.bias_update_speed <= 0:
            return
        for name, router in _routers(self.model):
            load = loads.get(name)
            if load is None or load.sum() == 0:
                continue
            delta = self.bias_update_speed * torch.sign(load.mean() - load)
            bias = router.e_score_correction_bias
            bias.add_(delta.to(bias.device, bias.dtype))

    # --------------------------------------------------------- interrupts
    @contextlib.contextmanager
    def stop_on_signals(self, then: str = "to save a checkpoint") -> Iterator[None]:
        """Inside, a first SIGINT or SIGTERM (Ctrl-C; what Slurm, Kubernetes and `timeout` send before
        a kill) only asks the run to stop: the stage sees it at `stop_requested`, saves and raises
        `interrupted`. A second aborts at once, as the signal does outside (the checkpoint's atomic
        write leaves nothing half written). The previous handlers come back on leaving (the Python
        API runs in notebooks); a signal ignored before (a background job's SIGINT, the speedrun's
        stage processes' SIGINT) stays ignored. Off the main thread, where handlers cannot be set, nothing changes.
        `then`: what the stage does on stopping, as the first signal's message says it. A write the run
        directory refuses inside keeps the steps trained elsewhere (`keep_steps`), on any thread."""
        import signal

        if threading.current_thread() is not threading.main_thread():
            with self.keep_steps():
                yield
            return
        previous: dict[int, Any] = {}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        def handler(signum: int, frame: Any) -> None:
            if self._signal and time.monotonic() - self._signal_at < REPEAT_WINDOW_S:
                return
            if self._signal:  # a second request: stop now, as the signal would have without us
                restore()
                before = previous[signum]
                # restored once: leaving must not put back what `before` changes (the CLI's SIGTERM
                # handler leaves the next SIGTERM to end the process, as the speedrun's unwinding waits)
                previous.clear()
                if callable(before):
                    before(signum, frame)  # Python's SIGINT handler: KeyboardInterrupt
                else:
                    signal.raise_signal(signum)  # SIG_DFL: the process ends by the signal
                return
            self._signal, self._signal_at = signum, time.monotonic()
            _STOP_PENDING.append(signum)
            if self.dist.is_main:
                again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
                _say(
                    f"\n{self.stage}: {signal.Signals(signum).name} received: stopping after this step "
                    f"{then} ({again} again to stop now, without saving)"
                )

        for sig in (signal.SIGINT, signal.SIGTERM):
            before = signal.getsignal(sig)
            if before in (signal.SIG_IGN, None):  # ignored, or a handler not set from Python
                continue
            previous[sig] = before
            signal.signal(sig, handler)
        try:
            with self.keep_steps():
                yield
        finally:
            restore()
            _STOP_PENDING.clear()

    def stop_requested(self) -> bool:
        """Whether a signal asked the run to stop (see `stop_on_signals`), agreed by every rank: each
        calls it at the same step boundary, and a rank that stopped alone would leave the others
        waiting in their next collective. One scalar all-reduce."""
        flag = torch.tensor([float(self._signal)])
        all_reduce_(flag, self.dist, "max")
        self.stop_signal = int(flag.item())
        return bool(self.stop_signal)

    def interrupted(
        self,
        checkpoint: Path,
        step: int | None = None,
        total_steps: int | None = None,
        kept: str | None = None,
    ) -> TrainingInterrupted:
        """The exception that ends a run stopped by a signal, once it saved `checkpoint`; `step` and
        `total_steps` where the stage counts other steps than the optimizer's (GRPO's); `kept` where
        the stage keeps something else than a checkpoint (ablate: its finished runs)."""
        step = self.global_step if step is None else step
        total = self.total_steps if total_steps is None else total_steps
        return TrainingInterrupted(self.stage, self.stop_signal, step, total, checkpoint, kept)

    # ----------------------------------------------------------- validate
    @torch.no_grad()
    def validate(self, loss_fn: LossFn, num_batches: int) -> float:
        """Mean loss over `num_batches` calls of loss_fn (averaged across ranks)."""
        self._take_loads()
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(num_batches):
            with torch.no_grad(), self.autocast():
                loss, m = loss_fn()
            value = _scalar(m.get("lm_loss", loss))
            total[0] += float(value)
            total[1] += 1
        self._take_loads()  # evaluation traffic must not move the balancing bias
        self.model.train(was_training)
        all_reduce_(total, self.dist, "sum")
        return total[0].item() / max(1.0, total[1].item())

    # -------------------------------------------------------- checkpoints
    _pending_save = False

    def checkpoint_due(self) -> bool:
        """True once after each `checkpoint_every` steps; the caller then calls save(extra_state). Not once
        the run is done (its last step, or its deadline passed): the stage saves then anyway, and a second
        full write of the same step would only cost its time."""
        due, self._pending_save = self._pending_save, False
        return due and not self.done

    def _train_state(self, extra_state: dict[str, Any] | None) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.global_step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
            "good_steps": self._good_steps,
            "loss_mean": self._loss_mean,
            "rng_torch": torch.get_rng_state(),
            "rng_python": list(random.getstate()[1]),
            "rng_python_version": random.getstate()[0],
            "rng_python_gauss": random.getstate()[2],
            "extra": extra_state or {},
        }
        if self.dist.device.type == "cuda":
            # this rank's own GPU only: a list over every visible GPU cannot be restored on a machine
            # with fewer of them (IndexError), and rank 0's other entries are states it never used
            state["rng_cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def save(self, extra_state: dict[str, Any] | None = None) -> Path:
        """Write RUN/<stage>/ atomically: HF-layout weights + config, tokenizer, train_state/.

        Every rank must call (the full state dict is gathered); only rank 0 writes.
        """
        from nanoseek.atomic import atomic_directory
        from nanoseek.checkpoint import build_model

        model_state = full_model_state_dict(self.model, self.dist)
        # The guard checks a step's loss and gradient, not the weights its update wrote: an update too
        # large for fp32 (a huge lr) passes it and leaves inf/NaN weights, which must not replace the
        # last good checkpoint (the one the divergence error says is kept)
        broken = non_finite(model_state)
        flag = torch.tensor([float(len(broken))])
        all_reduce_(flag, self.dist, "max")  # rank 0 holds the gathered state: every rank stops with it
        if flag.item():
            raise TrainingDiverged(
                f"{self.stage} step {self.global_step}: {int(flag.item())} weight tensors hold NaN or inf "
                f"(e.g. {', '.join(broken[:2]) or 'on rank 0'}); training diverged, {self.checkpoint_dir} "
                "not overwritten. Lower the learning rate."
            )
        fresh = not self.optimizer.state
        optim_state = full_optimizer_state_dict(self.model, self.optimizer, self.dist)
        if fresh:
            # torch's state-dict helper fills an empty optimizer's state with a zero-gradient step
            # (AdamW: step 1, zero moments): undo it, or saving before the first update would change
            # the updates that follow (AdamW's bias correction would count one step too many)
            self.optimizer.state.clear()
            optim_state["state"] = {}
        if self.dist.is_main:
            if self.dist.enabled:
                plain = build_model(self.config)
                plain.load_state_dict(model_state, strict=False)
            else:
                plain = self.base_model
            try:
                with atomic_directory(self.checkpoint_dir) as tmp:
                    self._write_checkpoint(tmp, plain, (optim_state, extra_state))
            except OSError as e:
                raise self._rescued(e, plain, (optim_state, extra_state)) from e
        barrier(self.dist)
        self._saved = True
        return self.checkpoint_dir

    def _write_checkpoint(
        self, directory: Path, plain: DeepSeekV3, state: tuple[dict[str, Any], dict[str, Any] | None] | None
    ) -> None:
        """RUN/<stage>/'s files in `directory`: weights and config, tokenizer, generation config and, with
        `state` (the optimizer's state dict and `save`'s extra state), train_state/."""
        from nanoseek.checkpoint import save_model, save_train_state

        save_model(plain, directory)
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        self._write_generation_config(directory)
        if state is None:
            return
        meta = {
            "stage": self.stage,
            "step": self.global_step,
            # by the clock of metrics.jsonl's times (`_check_latest_run`)
            "saved_at": round(time.time(), 3),
            "total_steps": self.total_steps,
            "precision": self.precision,
            "world_size": self.dist.world_size,
            "optim": asdict(self.optim_config),
            "resume_settings": self._settings(),
            **self.config_extra,
        }
        save_train_state(directory, state[0], self._train_state(state[1]), meta)

    def _rescued(
        self,
        error: OSError,
        plain: DeepSeekV3,
        state: tuple[dict[str, Any], dict[str, Any] | None] | None = None,
    ) -> OSError:
        """The error to raise where RUN/ refused a write of this run (a disk gone read-only or full, a
        permission taken away): the steps trained so far live only in this process, so they are written
        to a new directory in the temporary directory first, and the error says where."""
        import shutil
        import tempfile

        rescue: Path | None = None
        try:
            rescue = Path(tempfile.mkdtemp(prefix=f"nanoseek-{self.stage}-step{self.global_step}-"))
            self._write_checkpoint(rescue, plain, state)
        except Exception as again:  # (any: the error it would replace says what was lost, and why)
            if rescue is not None:
                shutil.rmtree(rescue, ignore_errors=True)
            filename = getattr(again, "filename", None)
            failed = f"{filename}: " if filename else ""
            failed += str(getattr(again, "strerror", None) or again)
            note = f"; writing step {self.global_step}'s weights elsewhere failed too ({failed})"
        else:
            if state is None:
                note = f"; the weights of step {self.global_step} were written to {rescue} instead"
            else:
                note = (
                    f"; the checkpoint of step {self.global_step} was written to {rescue} instead: move it "
                    f"to {self.checkpoint_dir.name}/ in a copy of {self.run_dir} on a disk that takes writes and "
                    "resume there (--resume --out COPY; a speedrun resumes its stages by itself)"
                )
        if error.errno is None:  # (a writer's bare OSError("...") has only its message)
            rescued = OSError(f"{error}{note}")
        else:
            rescued = OSError(error.errno, f"{error.strerror}{note}", error.filename)
        rescued.rescued = True  # type: ignore[attr-defined]  # (once: `keep_steps` must not write it again)
        return rescued

    @contextlib.contextmanager
    def keep_steps(self) -> Iterator[None]:
        """Inside, a write to the run directory that fails mid-run (metrics.jsonl on a disk gone read-only
        or full) ends the run with the weights trained so far written elsewhere (`_rescued`), not lost
        with the process. One process only: with several, gathering the weights needs every rank."""
        try:
            yield
        except OSError as e:
            refused = e.filename is not None and Path(str(e.filename)).absolute().is_relative_to(
                self.run_dir.absolute()
            )
            if getattr(e, "rescued", False) or not refused or self.global_step == 0 or self.dist.enabled:
                raise
            raise self._rescued(e, self.base_model) from e

    def _write_generation_config(self, directory: Path) -> None:
        cfg = self.config
        from nanoseek.engine.sampling import GENERATION_SAMPLING_FIELDS

        # what the starting checkpoint shipped (Qwen2.5's temperature 0.7, top_p 0.8, ...) stays, as
        # transformers' Trainer keeps a model's generation_config; greedy where it said nothing. Not
        # where it names a temperature without do_sample: read as sampling with it (`serve`, vLLM), the
        # added do_sample false served the trained model greedily.
        shipped = getattr(self.tokenizer, "generation_config", None) or {}
        shipped = {k: v for k, v in shipped.items() if k != "transformers_version"}
        said = any(k in shipped for k in ("do_sample", *GENERATION_SAMPLING_FIELDS))
        gen = {**({} if said else {"do_sample": False}), **shipped}
        gen.update(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
        if self.tokenizer is not None:
            gen["bos_token_id"] = getattr(self.tokenizer, "bos_token_id", gen["bos_token_id"])
            gen["eos_token_id"] = getattr(self.tokenizer, "eos_token_id", gen["eos_token_id"])
            # every id that ends a generation, as the checkpoint it started from listed them
            stops = list(getattr(self.tokenizer, "stop_token_ids", ()))
            if len(stops) > 1:
                gen["eos_token_id"] = stops
            gen["pad_token_id"] = getattr(self.tokenizer, "pad_token_id", None)
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")

    def _settings(self) -> dict[str, Any]:
        """What a resume must find unchanged to continue the same run, as JSON would hold it: the
        optimizer's settings but its warmup (stages shorten it to fit a short run, so it moves with a
        longer --steps, which a resume may ask for), γ, and the stage's `resume_settings`."""
        optim = {k: v for k, v in asdict(self.optim_config).items() if k != "warmup_steps"}
        settings = {**optim, "bias_update_speed": self.bias_update_speed, **self.resume_settings}
        # tuples become lists, and paths (a Python caller's `out=Path(...)`) text, as in the saved copy
        return json.loads(json.dumps(settings, default=os.fspath))

    @staticmethod
    def _saved_meta(ckpt: Path) -> dict[str, Any]:
        """The readable record a checkpoint's train state keeps beside it (`save`'s meta); {} if none."""
        from nanoseek.checkpoint import TRAIN_STATE
        from nanoseek.config import read_json_object

        meta_path = ckpt / TRAIN_STATE / "trainer.json"
        return read_json_object(meta_path) if meta_path.exists() else {}

    def _check_settings(self, ckpt: Path) -> None:
        """Refuse a resume whose settings differ from the checkpoint's: it would go on as another
        run (Muon on AdamW's moments, another batch) and save that run's state over this one's."""
        from nanoseek.options import describe_change

        meta = self._saved_meta(ckpt)
        saved = meta.get("resume_settings")
        if saved is None:  # saved before the settings were: its optimizer's are all it recorded
            saved = {k: v for k, v in meta.get("optim", {}).items() if k != "warmup_steps"}
        # Older checkpoints recorded fewer settings (none, or not those added since): the stage's config
        # saved beside them (`config_extra`) holds the others, but its precision, resolved ("bf16" for auto).
        recorded = {k: v for block in self.config_extra for k, v in (meta.get(block) or {}).items()}
        older = {k: recorded[k] for k in self.resume_settings if k in recorded and k != "precision"}
        saved = {**older, **saved}
        now = self._settings()
        changed = [k for k in saved if k in now and saved[k] != now[k]]
        detail = [describe_change(self.flags_from, k, saved[k], now[k]) for k in changed]
        detail += self._tokenizer_change(ckpt)
        if detail:
            raise ValueError(
                f"cannot resume {ckpt}, the training settings changed ({', '.join(detail)}): resume with the "
                "settings it was trained with (a longer --steps is fine), or train a new run in another --out"
            )

    def note_replacing(self) -> None:
        """At a run's fresh start, say that it replaces the checkpoint an earlier run left in RUN/<stage>/
        (at its first save): a rerun without --resume after a crash lost that run without a word."""
        ckpt = self.checkpoint_dir
        if not self.dist.is_main or not (ckpt / "config.json").exists():
            return
        try:
            step = f" (step {int(self._saved_meta(ckpt)['step'])})"
        except (ValueError, KeyError, TypeError):  # no train state, or one unreadable: no step to name
            step = ""
        print(
            f"warning: {ckpt} holds an earlier run's checkpoint{step}; this {self.stage} trains from the start "
            "and replaces it at its first save. To continue that one instead, stop this one now with Ctrl-C "
            "twice (once saves this run over it) and rerun with --resume",
            file=sys.stderr,  # beside the progress bar: stdout sent to a log file (`> train.log`) hid it
        )

    def _check_latest_run(self, ckpt: Path, step: int) -> None:
        """Refuse a checkpoint saved before the stage's latest start in metrics.jsonl: a run trained
        afresh into RUN stopped (killed) before its first save, so the checkpoint is an earlier run's.
        Resumed, it went on as that earlier run under the later one's records (a curve of both)."""
        from nanoseek.metrics import read_metrics
        from nanoseek.report import trained_starts

        saved_at = self._saved_meta(ckpt).get("saved_at")  # (checkpoints of an older nanoseek: not told)
        if not isinstance(saved_at, (int, float)):
            return
        starts = trained_starts(list(read_metrics(self.run_dir, self.stage)))
        if starts and max(starts) > saved_at:
            raise ValueError(
                f"cannot resume {ckpt}: it holds an earlier run's checkpoint (step {step}); the {self.stage} "
                f"started in {self.run_dir} since then stopped before its first save, so there is none of "
                "it to resume. Run without --resume to train from the start (replacing it), or choose "
                "another --out"
            )

    def _tokenizer_change(self, ckpt: Path) -> list[str]:
        """How this run's tokenizer differs from the one saved with the checkpoint (nothing where either
        is not a nanoseek Tokenizer): the weights learned its ids, and another vocabulary of the same
        size would train them on tokens that mean other things to them (and save over the old one)."""
        from nanoseek.tokenizer import Tokenizer, load_tokenizer, tokens_moved

        if not isinstance(self.tokenizer, Tokenizer) or not (ckpt / "tokenizer.json").exists():
            return []
        saved = load_tokenizer(ckpt)
        moved = tokens_moved(self.tokenizer, saved) + tokens_moved(saved, self.tokenizer)
        if not moved:
            return []
        return [f"the tokenizer: {len(set(moved))} tokens not at the same ids, e.g. {moved[:3]}"]

    def resume(self, logged_step: str | None = None) -> dict[str, Any] | None:
        """Restore weights, optimizer, step, RNG and guard from RUN/<stage>/; returns the extra state
        saved with it (e.g. the data position), or None when there is nothing to resume. Refuses
        (ValueError, nothing loaded or written) when the training settings changed since.
        `logged_step`: the extra state's key for the step the stage's records count, where that is not
        the optimizer's (GRPO's steps: one without signal makes no update, μ > 1 makes several)."""
        from nanoseek.atomic import restore_directory
        from nanoseek.checkpoint import check_keys, from_hf_state_dict, load_train_state, read_safetensors

        ckpt = self.checkpoint_dir
        if self.dist.is_main:
            # one rank puts back a checkpoint a save cut short left aside (as `load_dcp`), the others
            # wait: each moving it, one found it gone under its rename (FileNotFoundError)
            restore_directory(ckpt)
        barrier(self.dist)
        saved = load_train_state(ckpt)
        if self.dist.enabled:
            # Every rank must resume the same step: a node that does not see rank 0's checkpoint (a
            # node-local --out, another working directory) would start from nothing beside it: the
            # ranks' collectives no longer match, and the job hangs until the timeout (10 minutes).
            step = -1.0 if saved is None else float(saved[1]["step"])
            steps = all_reduce_(torch.tensor([step, -step], dtype=torch.float64), self.dist, "max")
            if steps[0] != -steps[1]:
                lowest = "none" if steps[1] == 1 else f"step {int(-steps[1])}"
                raise ValueError(
                    f"the ranks found different checkpoints in {ckpt} (from {lowest} to step {int(steps[0])}): "
                    "resume with --out on a filesystem every node sees, the same directory on each "
                    "(docs/multinode.md)"
                )
        if saved is None:
            return None
        self._check_latest_run(ckpt, int(saved[1]["step"]))
        self._check_settings(ckpt)
        optim_state, state = saved
        tensors = from_hf_state_dict(read_safetensors(ckpt), self.config, torch.float32)
        check_keys(self.model, tensors, f"checkpoint {ckpt}")
        _refuse_non_finite(tensors, f"checkpoint {ckpt}")
        load_full_model_state_dict(self.model, tensors, self.dist)
        load_full_optimizer_state_dict(self.model, self.optimizer, optim_state, self.dist)
        if not optim_state.get("state"):  # saved before any update: the loader's zero-gradient init step
            self.optimizer.state.clear()  # (see `save`) must not count either
        self.global_step = int(state["step"])
        self._saved = True
        if self.deadline is not None or self.deadline_later:
            # a time-budgeted run goes on with the step count last refitted to its deadline, not the
            # first estimate: one the run had outgrown ended it at once, a longer one restarted its decay
            # (a deadline still unknown at the resume too: the speedrun's control beside GRPO)
            self._refit(int(self._saved_meta(ckpt).get("total_steps", self.total_steps)))
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self._consecutive_skips = int(state["consecutive_skips"])
        self._good_steps = int(state["good_steps"])
        self._loss_mean = state["loss_mean"]
        torch.set_rng_state(state["rng_torch"])
        random.setstate((state["rng_python_version"], tuple(state["rng_python"]), state["rng_python_gauss"]))
        saved_cuda = state.get("rng_cuda")
        if saved_cuda is not None and self.dist.device.type == "cuda":
            if isinstance(saved_cuda, (list, tuple)):  # older checkpoints: one state per GPU rank 0 saw
                saved_cuda = saved_cuda[min(self.dist.local_rank, len(saved_cuda) - 1)]
            torch.cuda.set_rng_state(saved_cuda, self.dist.device)
        # a stage that counts other steps (`logged_step`: GRPO's) says it in its own: "step 268 of 267" in
        # optimizer updates named no step a user gave
        if self.global_step >= self.total_steps and self.dist.is_main and logged_step is None:
            print(f"{self.stage}: checkpoint already at step {self.global_step} of {self.total_steps}")
        # The steps after it were logged once already: the report reads the ones this run logs instead.
        from_step = state["extra"].get(logged_step, self.global_step) if logged_step else self.global_step
        MetricsLog(self.run_dir, self.stage, enabled=self.dist.is_main).log(
            event="resume", from_step=from_step, world_size=self.dist.world_size, nodes=self.dist.nodes
        )
        return state["extra"]


def _say(message: str) -> None:
    """A line on stderr from a signal handler: straight to the file descriptor, since the handler may
    have interrupted a write to the same stream (a progress bar's), which `print` would re-enter."""
    # A notebook's stderr (ipykernel's stream, as `progress_bar` tells it) is printed to: its fileno is a
    # copy of the terminal the kernel was started from, not the cell, which never showed the line
    if not type(sys.stderr).__module__.startswith("ipykernel."):
        try:
            os.write(sys.stderr.fileno(), (message + "\n").encode(errors="replace"))
            return
        except (AttributeError, OSError, ValueError):  # a stream with no file descriptor
            pass
    print(message, file=sys.stderr)


# ------------------------------------------------------------------ step log
def require_tensorboard() -> None:
    """--tensorboard's package, checked before a run spends anything (a tokenizer, a corpus)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'nanoseek[tensorboard]'")


def _quiet_tensorboard_thread(args: Any) -> None:
    """threading's excepthook while a TensorBoard log is open: the write error of TensorBoard's writer
    thread (a full disk) is raised again in the stage at the writer's next call, naming the events'
    directory (`StepLog`); printed here too, its traceback came first, as if it were a bug."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
        return
    _THREAD_HOOK[0](args)


_THREAD_HOOK: list[Callable[[Any], None]] = []  # the excepthook `_quiet_tensorboard_thread` passes on to


class StepLog:
    """What a stage shows and records per step: RUN/metrics.jsonl (rank 0), optional TensorBoard, and a
    progress bar with loss, tokens/s and MFU (model FLOPs against the measured matmul peak of the
    precision in use). Per-expert loads are kept every `expert_load_every` steps, the imbalance always.
    `resumed_from`: the step a resumed run goes on from (0: a fresh start).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        stage: str,
        total_steps: int,
        *,
        precision: str = "fp32",
        flops_per_token: float | None = None,
        device: str = "cpu",
        world_size: int = 1,
        is_main: bool = True,
        log_every: int = 1,
        expert_load_every: int = 50,
        tensorboard: bool = False,
        progress: bool = True,
        resumed_from: int = 0,
        desc: str | None = None,
    ) -> None:
        self.stage = stage
        self.desc = desc or stage  # the bar's label
        self.total_steps = total_steps
        self.precision = precision
        self.flops_per_token = flops_per_token
        self.device = device
        self.world_size = world_size
        self.log_every = max(1, log_every)
        self.expert_load_every = expert_load_every
        self.metrics = MetricsLog(run_dir, stage, enabled=is_main)
        self._progress = progress and is_main
        self._bar: Any = None  # `progress_bar`'s, drawn at the first step
        self._peak: float | None = None
        self._peak_threads = 0  # torch's CPU threads when `_peak` was measured
        self._tb = None
        self._replaced: list[Path] = []  # an earlier run's TensorBoard events, deleted at the first step
        if tensorboard and is_main:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(run_dir) / "tensorboard" / stage
            if not resumed_from:
                # a fresh start replaces the stage's earlier run (as its checkpoint): TensorBoard read
                # that run's event files with this one's, two curves drawn over each other as one. They
                # go at its first step, as the checkpoint at its first save: one stopped before it (as
                # `note_replacing` advises, to --resume the earlier run) left that run without its curves
                self._replaced = list(folder.glob("events.out.tfevents.*"))
            # resumed: the steps the stopped run logged after its checkpoint are logged again; purged
            # from the view, not drawn twice (a zig-zag back to the checkpoint's step)
            self._tb = SummaryWriter(str(folder), purge_step=resumed_from + 1 if resumed_from else None)
            self._tb_dir = folder
            if threading.excepthook is not _quiet_tensorboard_thread:
                _THREAD_HOOK[:] = [threading.excepthook]
                threading.excepthook = _quiet_tensorboard_thread

    @classmethod
    def for_trainer(
        cls, trainer: Trainer, *, seq_len: int | None = None, include_mtp: bool = True, **kwargs: Any
    ) -> StepLog:
        """A log for `trainer`'s stage, made after `trainer.resume()` (it goes on from the step resumed);
        with `seq_len` it reports MFU. `include_mtp`: whether the stage's loss runs the MTP modules
        (their FLOPs count only then)."""
        flops = training_flops_per_token(trainer.base_model, seq_len, include_mtp) if seq_len else None
        return cls(
            trainer.run_dir,
            trainer.stage,
            trainer.total_steps,
            precision=trainer.precision,
            flops_per_token=flops,
            device="cuda" if trainer.dist.device.type == "cuda" else "cpu",
            world_size=trainer.dist.world_size,
            is_main=trainer.dist.is_main,
            resumed_from=trainer.global_step,
            **kwargs,
        )

    def step(self, metrics: dict[str, Any], total_steps: int | None = None) -> None:
        """Record one `Trainer.step`'s metrics (throughput and MFU added); `total_steps` refits the bar."""
        metrics = dict(metrics)
        step = metrics.pop("step")
        self._drop_replaced()
        if total_steps is not None:
            self.total_steps = total_steps
        loads = metrics.pop("expert_load", None)
        if loads is not None and self.expert_load_every and step % self.expert_load_every == 0:
            metrics["expert_load"] = {layer: ld.tolist() for layer, ld in loads.items()}
        self._throughput(metrics)
        if "skipped" in metrics:
            self.write(f"step {step}: skipped ({metrics['skipped']}); no update")
        if "skipped" in metrics or step % self.log_every == 0 or step == self.total_steps:
            self.log(step, **metrics)
        self._update_bar(step, metrics)

    def ended_by(self, error: BaseException) -> None:
        """Record the step that ended the run as diverged (its metrics ride on the error), as a skipped
        step: metrics.jsonl held the skipped steps before it, not the one the error names."""
        if isinstance(error, TrainingDiverged) and error.metrics is not None:
            self.step(error.metrics)

    def _throughput(self, metrics: dict[str, Any]) -> None:
        tok_s = metrics.pop("step_tokens") / max(metrics.pop("step_time_s"), 1e-9)
        metrics["tok_per_s"] = tok_s
        if self.flops_per_token:
            achieved = tok_s * self.flops_per_token
            metrics["mfu"] = achieved / self._peak_flops(achieved)

    def _peak_flops(self, achieved: float = 0.0) -> float:
        """The machine's measured matmul peak; measured again if a step beat it (the first measurement
        ran while other work shared the machine), keeping the highest, so MFU stays a fraction. Measured
        anew at another thread count: a CPU's peak is its threads' (the speedrun's teacher pretrains on
        half of them, then takes back the student's: MFU went on against the half's peak)."""
        threads = torch.get_num_threads()
        if self._peak is None or achieved > self._peak or threads != self._peak_threads:
            from nanoseek.perf import matmul_peak_flops

            dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
            if self._peak is not None:
                matmul_peak_flops.cache_clear()  # type: ignore[attr-defined]  # set on it in nanoseek.perf
            measured = matmul_peak_flops(dtype, self.device) * self.world_size
            kept = self._peak if threads == self._peak_threads else None
            self._peak, self._peak_threads = max(kept or 0.0, measured, achieved), threads
        return self._peak

    def _update_bar(self, step: int, metrics: dict[str, Any]) -> None:
        if not self._progress:
            return
        if self._bar is None:
            self._bar = progress_bar(
                total=self.total_steps, initial=step - 1, desc=self.desc, dynamic_ncols=True
            )
        self._bar.total = self.total_steps
        post = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tok_per_s']:.0f}"}
        if "mfu" in metrics:
            post["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        if "expert_imbalance_max" in metrics:
            post["imb"] = f"{metrics['expert_imbalance_max']:.2f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """A line that does not break the progress bar (rank 0 only)."""
        if not self.metrics.enabled:
            return
        (self._bar.write if self._bar is not None else print)(message)

    def _drop_replaced(self) -> None:
        for old in self._replaced:
            old.unlink(missing_ok=True)
        self._replaced = []

    def log(self, step: int | None, **metrics: Any) -> dict[str, Any]:
        """Append to RUN/metrics.jsonl (rank 0) and TensorBoard if enabled."""
        if step:  # a step's record (GRPO logs its steps here, not through `step`): as in `step`
            self._drop_replaced()
        record = self.metrics.log(step=step, **metrics)
        if self._tb is not None and step is not None:
            with self._tensorboard_writes():
                for k, v in metrics.items():
                    v = _scalar(v)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(f"{self.stage}/{k}", v, step)
                    elif isinstance(v, dict) and k == "expert_imbalance":
                        for layer, x in v.items():
                            self._tb.add_scalar(f"{self.stage}/expert_imbalance/{layer}", x, step)
        return record

    def log_model(self, config: Any) -> None:
        """The report's model table (`nanoseek inspect`'s figures) at a new run's start: every stage logs
        it, so a run fine-tuned by hand (`sft --init` a Llama) is not shown as "–" under MLA's name."""
        from nanoseek.accounting import account

        acc = account(config)
        self.log(
            0,
            event="model",
            total_params=acc.total_params,
            active_params=acc.active_params,
            kv_cache_bytes_per_token=acc.kv_cache_bytes_per_token,
            mha_kv_cache_bytes_per_token=acc.mha_kv_cache_bytes_per_token,
            attention_variant=acc.attention_variant,
        )

    @contextlib.contextmanager
    def _tensorboard_writes(self) -> Iterator[None]:
        """Inside, TensorBoard's write error (its writer thread's, raised at the next call) names the
        events' directory: a full disk's ENOSPC named no file, so the run ended with "No space left on
        device" alone, and with the steps trained since the last save (`keep_steps` keeps those only
        for a write into the run directory it can name)."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = str(self._tb_dir)
            raise

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            unwinding = sys.exc_info()[1] is not None  # called while another error ends the run
            try:
                with self._tensorboard_writes():
                    tb.close()  # (its flush raises a write its thread failed)
            except OSError:
                # the error that ends the run says what was lost and where the weights went (`keep_steps`):
                # the events' own, raised again here, replaced it
                if not unwinding:
                    raise
