"""The one training loop shared by pretrain, SFT, GRPO and distillation.

What is notable here:
- The objective is a callable returning (loss, metrics) for one micro-batch; `Trainer.step` runs it
  `accumulation` times, then clips, guards, steps AdamW and the schedule. `language_model_loss` is the
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
  `spike_factor` × the running mean, is skipped (no update, no bias move) and logged as such.
- Checkpoints are HF-layout directories written atomically (`RUN/<stage>/`, with tokenizer files and
  `train_state/`: optimizer, step, RNG, guard and data position), so `resume()` continues bit-exactly.
- Progress bar with loss, tokens/s and MFU (model FLOPs against the measured matmul peak of the
  precision in use); metrics.jsonl via `MetricsLog`; optional TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version

from nanoseek.metrics import MetricsLog
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

LossFn = Callable[[], tuple[torch.Tensor, dict[str, Any]]]
TRAIN_STATE = "train_state"
PRECISIONS = ("bf16", "fp32", "fp8")
SCHEDULES = ("cosine", "wsd", "constant")


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

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} not in {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Factor on cfg.lr for 0-based optimizer step `step` of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
    else:  # wsd: flat until the last decay_fraction of the run
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
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
    decay, no_decay, seen = [], [], set()
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
def language_model_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    mtp_weight: float = 0.0,
    ignore_index: int = -100,
    document_mask: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy + λ·MTP loss + the routers' sequence-wise balance loss.

    targets[:, i] is the token after input_ids[:, i] (ignore_index masks a position). MTP depth k
    predicts the token k+1 further on, so its targets are targets shifted by k+1 (V3 eq. 24-25:
    L_MTP = λ/D Σ_k L_k). With `document_mask`, a packed row's documents (each opened by the model's
    BOS) attend only within themselves and count positions from their own start, as they will when
    they are prompts; V3 §3.4 packs the same way ("document packing", no cross-sample mask there, but
    its documents are long and unrelated, ours are short and look alike).
    """
    positions = mask = None
    if document_mask:
        from nanoseek.model.attention import document_causal_mask, documents_from_bos

        doc_ids, positions = documents_from_bos(input_ids, model.config.bos_token_id)
        mask = document_causal_mask(doc_ids)
    lm, hidden = model(
        input_ids, positions, mask=mask, return_hidden=True, labels=targets, ignore_index=ignore_index
    )
    loss = lm
    metrics: dict[str, Any] = {"lm_loss": lm.detach(), "tokens": input_ids.numel()}
    if mtp_weight > 0:
        per_depth = model.mtp_losses(hidden, input_ids, targets, ignore_index, positions, mask)
        if per_depth:
            mtp_loss = torch.stack(per_depth).mean()
            # A batch whose shifted targets are all masked gives NaN: it has nothing to learn.
            if torch.isfinite(mtp_loss):
                loss = loss + mtp_weight * mtp_loss
            metrics["mtp_loss"] = mtp_loss.detach()
    balance = model.balance_loss()
    if balance is not None:
        loss = loss + balance
        metrics["balance_loss"] = balance.detach()
    return loss, metrics


# ---------------------------------------------------------------- accounting
def training_flops_per_token(model: nn.Module, seq_len: int, include_mtp: bool = True) -> float:
    """Model FLOPs per trained token: nanoseek.accounting if it offers them, else 6·N_active plus
    causal attention (3 passes × L × heads × S × (d_qk + d_v), the score and value matmuls)."""
    cfg = model.config
    try:
        from nanoseek.accounting import flops_per_token
    except ImportError:
        flops_per_token = None
    if flops_per_token is not None:
        return float(flops_per_token(cfg, seq_len=seq_len, training=True, include_mtp=include_mtp))
    active = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or (not include_mtp and "mtp_layers" in name):
            continue
        n = p.numel()
        if ".experts." in name and cfg.n_routed_experts:
            n = n * cfg.num_experts_per_tok / cfg.n_routed_experts
        active += n
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    attention = 3 * layers * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6.0 * active + attention


def _routers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every MoE router with a readable layer name ('3', or 'mtp0' for MTP depth 0)."""
    return model.routers()  # type: ignore[operator]


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v


# ------------------------------------------------------------------- trainer
class Trainer:
    """Owns the optimizer, schedule, precision, balancing, guard, checkpoints and logging of a stage.

    Typical use::

        trainer = Trainer(model, run, "pretrain", OptimConfig(lr=3e-3), total_steps=500)
        trainer.resume()
        while trainer.global_step < trainer.total_steps:
            trainer.step(lambda: language_model_loss(model, *next(batches)), accumulation=2)
        trainer.save(); trainer.close()

    `model` is the unwrapped module; the trainer applies fp8 conversion and FSDP2 itself (`trainer.model`).
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike,
        stage: str,
        optim: OptimConfig,
        total_steps: int,
        precision: str = "bf16",
        checkpoint_every: int = 0,
        *,
        tokenizer: Any = None,
        bias_update_speed: float = 0.001,
        balance_alpha: float = 0.0001,
        expert_load_every: int = 50,
        log_every: int = 1,
        spike_factor: float = 3.0,
        spike_warmup: int = 20,
        max_consecutive_skips: int = 10,
        tensorboard: bool = False,
        progress: bool = True,
        seq_len: int | None = None,
        dist: DistInfo | None = None,
        config_extra: dict[str, Any] | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in {', '.join(PRECISIONS)}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if bias_update_speed < 0 or balance_alpha < 0:
            raise ValueError("bias_update_speed (γ) and balance_alpha (α) must be >= 0")
        self.dist = dist or DistInfo()
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.optim_config = optim
        self.total_steps = total_steps
        self.precision = precision
        self.checkpoint_every = checkpoint_every
        self.tokenizer = tokenizer
        self.bias_update_speed = bias_update_speed
        self.expert_load_every = expert_load_every
        self.log_every = max(1, log_every)
        self.spike_factor = spike_factor
        self.spike_warmup = spike_warmup
        self.max_consecutive_skips = max_consecutive_skips
        self.config_extra = config_extra or {}
        self.base_model = model
        self.config = model.config

        if precision == "fp8":
            try:
                from nanoseek.model.fp8 import convert_to_fp8_training
            except ImportError as e:
                raise ValueError(
                    f"--precision fp8 needs nanoseek.model.fp8.convert_to_fp8_training ({e})"
                ) from e
            convert_to_fp8_training(model)  # in place: same parameters, FP8 GEMMs
        model.set_balance_alpha(balance_alpha)
        self.model = shard_model(model, self.dist)
        from nanoseek.perf import tune_malloc

        tune_malloc()  # reuse freed activation memory instead of page-faulting it in every step
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, optim.weight_decay),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            # One fused kernel per parameter instead of ~10 elementwise passes: 2-4x faster steps on
            # CPU. Sharded (DTensor) parameters keep the default implementation.
            fused=_fused_adamw_ok(self.model),
        )
        self.global_step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._loss_mean: float | None = None  # running mean of accepted losses (spike guard)
        self._good_steps = 0
        self._flops_per_token = training_flops_per_token(model, seq_len or 1) if seq_len else None
        self._peak: float | None = None
        self._t_last = time.perf_counter()
        self._tokens_since = 0
        self._bar = None
        self._progress = progress and self.dist.is_main
        self.metrics = MetricsLog(self.run_dir, stage, enabled=self.dist.is_main)
        self._tb = None
        if tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from e
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard" / stage))

    # ------------------------------------------------------------ helpers
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / self.stage

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast (CPU included) for bf16/fp8; weights and optimizer state stay fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)

    def lr_at(self, step: int) -> float:
        return self.optim_config.lr * lr_multiplier(step, self.total_steps, self.optim_config)

    def _peak_flops(self, achieved: float = 0.0) -> float:
        """The machine's measured matmul peak; measured again if a step beat it (the first measurement
        ran while other work shared the machine), keeping the highest, so MFU stays a fraction."""
        if self._peak is None or achieved > self._peak:
            from nanoseek.perf import matmul_peak_flops

            dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
            device = "cuda" if self.dist.device.type == "cuda" else "cpu"
            if self._peak is not None:
                matmul_peak_flops.cache_clear()
            measured = matmul_peak_flops(dtype, device) * self.dist.world_size
            self._peak = max(self._peak or 0.0, measured, achieved)
        return self._peak

    # --------------------------------------------------------------- step
    def step(self, loss_fn: LossFn, accumulation: int = 1) -> dict[str, Any]:
        """One optimizer step over `accumulation` micro-batches; returns this step's metrics."""
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
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
            if self.dist.enabled and hasattr(model, "set_requires_gradient_sync"):
                # Reduce-scatter gradients once per step, on the last micro-batch.
                model.set_requires_gradient_sync(micro == accumulation - 1)
            with self.autocast():
                loss, m = loss_fn()
            (loss / accumulation).backward()
            loss_sum += loss.detach().double().cpu()
            tokens += int(_scalar(m.pop("tokens", 0)))
            for k, v in m.items():
                v = _scalar(v)
                if isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + float(v)
        stats = torch.tensor([loss_sum.item() / accumulation, float(tokens)], dtype=torch.float64)
        all_reduce_(stats, self.dist, "sum")
        loss_value = stats[0].item() / self.dist.world_size
        tokens = int(stats[1].item())
        grad_norm = self._clip_grads()

        reason = None
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            reason = "non-finite loss" if not math.isfinite(loss_value) else "non-finite grad norm"
        elif (
            self.spike_factor > 0
            and self._loss_mean is not None
            and self._good_steps >= self.spike_warmup
            and loss_value > self.spike_factor * self._loss_mean
        ):
            reason = f"loss spike ({loss_value:.3f} > {self.spike_factor:g} x mean {self._loss_mean:.3f})"

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
        self._tokens_since += tokens

        metrics: dict[str, Any] = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
        }
        metrics.update({k: v / accumulation for k, v in sums.items()})
        if loads:
            imb = {layer: (ld.max() / ld.mean().clamp_min(1e-9)).item() for layer, ld in loads.items()}
            metrics["expert_imbalance"] = imb
            metrics["expert_imbalance_max"] = max(imb.values())
            if self.expert_load_every and (step + 1) % self.expert_load_every == 0:
                metrics["expert_load"] = {layer: ld.tolist() for layer, ld in loads.items()}
        if reason is not None:
            metrics["skipped"] = reason
            if self.dist.is_main:
                msg = f"step {step + 1}: skipped ({reason}); no update"
                (self._bar.write if self._bar is not None else print)(msg)
        self._throughput(metrics)
        if reason is not None or (step + 1) % self.log_every == 0 or step + 1 == self.total_steps:
            self.log(step + 1, **metrics)
        self._update_bar(metrics)
        if reason is not None and self._consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"{self._consecutive_skips} consecutive steps skipped (last: {reason}); training diverged. "
                f"Lower the learning rate or resume from the last checkpoint in {self.checkpoint_dir}."
            )
        if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0 and step + 1 < self.total_steps:
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
        routers = list(_routers(self.model))
        if not routers:
            return {}
        flat = torch.stack([r.expert_load.float() for _, r in routers])
        for _, r in routers:
            r.expert_load.zero_()
        all_reduce_(flat, self.dist, "sum")
        return {name: flat[i].cpu() for i, (name, _) in enumerate(routers)}

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

    # ----------------------------------------------------------- validate
    @torch.no_grad()
    def validate(self, loss_fn: LossFn, num_batches: int) -> float:
        """Mean loss over `num_batches` calls of loss_fn (averaged across ranks), logged as val_loss."""
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
        val = total[0].item() / max(1.0, total[1].item())
        self.log(self.global_step, val_loss=val)
        if self._bar is not None:
            self._bar.write(f"step {self.global_step}: val_loss {val:.4f}")
        return val

    # ------------------------------------------------------------ logging
    def _throughput(self, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        tok_s = self._tokens_since / dt
        self._t_last, self._tokens_since = now, 0
        metrics["tok_per_s"] = tok_s
        if self._flops_per_token:
            achieved = tok_s * self._flops_per_token
            metrics["mfu"] = achieved / self._peak_flops(achieved)

    def _update_bar(self, metrics: dict[str, Any]) -> None:
        if not self._progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self.global_step - 1,
                desc=self.stage,
                dynamic_ncols=True,
            )
        self._bar.total = self.total_steps  # a time-budgeted run refits its step count as it goes
        post = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tok_per_s']:.0f}"}
        if "mfu" in metrics:
            post["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        if "expert_imbalance_max" in metrics:
            post["imb"] = f"{metrics['expert_imbalance_max']:.2f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def log(self, step: int | None, **metrics: Any) -> dict[str, Any]:
        """Append to RUN/metrics.jsonl (rank 0) and TensorBoard if enabled."""
        record = self.metrics.log(step=step, **metrics)
        if self._tb is not None and step is not None:
            for k, v in metrics.items():
                v = _scalar(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, step)
                elif isinstance(v, dict) and k == "expert_imbalance":
                    for layer, x in v.items():
                        self._tb.add_scalar(f"{self.stage}/expert_imbalance/{layer}", x, step)
        return record

    # -------------------------------------------------------- checkpoints
    _pending_save = False

    def checkpoint_due(self) -> bool:
        """True once after each `checkpoint_every` steps; the caller then calls save(extra_state)."""
        due, self._pending_save = self._pending_save, False
        return due

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
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save(self, extra_state: dict[str, Any] | None = None) -> Path:
        """Write RUN/<stage>/ atomically: HF-layout weights + config, tokenizer, train_state/.

        Every rank must call (the full state dict is gathered); only rank 0 writes.
        """
        from nanoseek.checkpoint import atomic_directory, build_model, save_model

        model_state = full_model_state_dict(self.model, self.dist)
        optim_state = full_optimizer_state_dict(self.model, self.optimizer, self.dist)
        if self.dist.is_main:
            if self.dist.enabled:
                plain = build_model(self.config)
                plain.load_state_dict(model_state, strict=False)
            else:
                plain = self.base_model
            with atomic_directory(self.checkpoint_dir) as tmp:
                save_model(plain, tmp)
                if self.tokenizer is not None:
                    self.tokenizer.save(tmp)
                self._write_generation_config(tmp)
                ts = tmp / TRAIN_STATE
                ts.mkdir()
                torch.save(optim_state, ts / "optimizer.pt")
                torch.save(self._train_state(extra_state), ts / "trainer.pt")
                meta = {
                    "stage": self.stage,
                    "step": self.global_step,
                    "total_steps": self.total_steps,
                    "precision": self.precision,
                    "world_size": self.dist.world_size,
                    "optim": asdict(self.optim_config),
                    **self.config_extra,
                }
                (ts / "trainer.json").write_text(json.dumps(meta, indent=2) + "\n")
        barrier(self.dist)
        return self.checkpoint_dir

    def _write_generation_config(self, directory: Path) -> None:
        cfg = self.config
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
        if self.tokenizer is not None:
            gen["bos_token_id"] = getattr(self.tokenizer, "bos_token_id", gen["bos_token_id"])
            gen["eos_token_id"] = getattr(self.tokenizer, "eos_token_id", gen["eos_token_id"])
            gen["pad_token_id"] = getattr(self.tokenizer, "pad_token_id", None)
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    def resume(self) -> dict[str, Any] | None:
        """Restore weights, optimizer, step, RNG and guard from RUN/<stage>/; returns the extra state
        saved with it (e.g. the data position), or None when there is nothing to resume."""
        from nanoseek.checkpoint import from_hf_state_dict, read_safetensors

        ckpt = self.checkpoint_dir
        ts = ckpt / TRAIN_STATE
        if not (ts / "trainer.pt").exists():
            return None
        tensors = from_hf_state_dict(read_safetensors(ckpt), self.config, torch.float32)
        load_full_model_state_dict(self.model, tensors, self.dist)
        optim_state = torch.load(ts / "optimizer.pt", map_location="cpu", weights_only=True)
        load_full_optimizer_state_dict(self.model, self.optimizer, optim_state, self.dist)
        state = torch.load(ts / "trainer.pt", map_location="cpu", weights_only=True)
        self.global_step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self._consecutive_skips = int(state["consecutive_skips"])
        self._good_steps = int(state["good_steps"])
        self._loss_mean = state["loss_mean"]
        torch.set_rng_state(state["rng_torch"])
        random.setstate((state["rng_python_version"], tuple(state["rng_python"]), state["rng_python_gauss"]))
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if self.global_step >= self.total_steps and self.dist.is_main:
            print(f"{self.stage}: checkpoint already at step {self.global_step} of {self.total_steps}")
        return state["extra"]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
