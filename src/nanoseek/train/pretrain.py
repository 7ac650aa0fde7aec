"""Pretraining: a DeepSeek-V3-style model on packed text, the V3 recipe at whatever scale fits.

What is notable:
- Data: any corpus `nanoseek.data.corpus` reads (txt / jsonl / parquet, globs, dirs), default the
  embedded multilingual worked-problem corpus; documents BOS-separated and packed, a held-out
  validation split by document hash, and the data position saved in every checkpoint.
- No tokenizer given: one is trained on the data (byte-level BPE) into RUN/tokenizer/ and the model's
  vocabulary is sized to it.
- The objective is next-token cross-entropy + λ·MTP (V3 §2.2; V3 used λ = 0.3 then 0.1) + the small
  sequence-wise balance loss α; routing is balanced mainly by the aux-loss-free bias (γ), see
  `nanoseek.train.loop`.
- `precision="auto"`: bf16 autocast on GPUs and on CPUs with bf16 matmul units (AVX512-BF16 / AMX),
  fp32 elsewhere: on a CPU without them bf16 matmuls are emulated and ~10x slower than fp32.
- Data parallel under torchrun: each rank packs the same stream and keeps its slice of the global
  batch, so the loss curve matches one process with the same global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoseek.accounting import counted, human
from nanoseek.options import check_choices, option, path, torch_seed
from nanoseek.perf import cpu_has_bf16
from nanoseek.train import alike_on_every_rank

if TYPE_CHECKING:  # torch loads inside the functions, so `nanoseek --help` stays fast
    import torch

    from nanoseek.train.loop import OptimConfig


DATA = "data and model"
OPTIM = "optimization"
V3 = "DeepSeek-V3 losses and balancing"
RUN = "run"
# Settings a --resume must find unchanged beside the optimizer's (the Trainer checks those, and
# PackedDataset the data's): the precision and warmup as given, not as resolved for this machine or
# for this many steps, so a run may move to other hardware or grow longer.
RESUME_SETTINGS = (
    "batch_size",
    "accumulation",
    "warmup_steps",
    "precision",
    "mtp_weight",
    "balance_alpha",
    "document_mask",
    "whole_documents",
    "mask_prompts",
)


@dataclass
class PretrainConfig:
    out: str = option("runs/nanoseek", "run directory", parse=path, group=DATA)
    data: str | list[str] | None = option(
        "embedded",
        "txt/jsonl/parquet files, globs, dirs, 'embedded', or 'embedded:TASKS' (the embedded corpus "
        "of those task families only)",
        nargs="+",
        parse=path,
        group=DATA,
    )
    text_field: str = option("text", "JSON/parquet field holding the text", group=DATA)
    tokenizer: str | None = option(
        None,
        "tokenizer dir or tokenizer.json (default: train one into RUN/tokenizer/)",
        parse=path,
        group=DATA,
    )
    vocab_size: int | None = option(None, "vocabulary of a trained tokenizer (default: preset's)", group=DATA)
    tokenizer_docs: int = option(20000, "documents to train the tokenizer on", group=DATA)
    preset: str = option(
        "tiny", "model preset or directory with config.json (random init)", parse=path, group=DATA
    )
    steps: int = option(300, group=OPTIM)
    batch_size: int = option(8, "sequences per micro-batch, global (split across ranks)", group=OPTIM)
    seq_len: int = option(256, group=OPTIM)
    accumulation: int = option(1, "micro-batches per step", group=OPTIM)
    lr: float = option(3e-3, group=OPTIM)
    min_lr_ratio: float = option(0.1, group=OPTIM)
    warmup_steps: int = option(20, group=OPTIM)
    schedule: str = option("cosine", choices=("cosine", "wsd", "constant"), group=OPTIM)
    optimizer: str = option(
        "adamw",
        "adamw, or muon: Muon on the hidden matrices, AdamW on the rest, one lr (train/muon.py)",
        choices=("adamw", "muon"),
        group=OPTIM,
    )
    weight_decay: float = option(0.1, group=OPTIM)
    grad_clip: float = option(1.0, group=OPTIM)
    precision: str = option(
        "auto",
        "auto: bf16 where the hardware multiplies bf16 natively, else fp32",
        choices=("auto", "bf16", "fp32", "fp8"),
        group=OPTIM,
    )
    bias_update_speed: float = option(
        0.001, "γ of aux-loss-free balancing (V3 §2.1.2; only V3's noaux_tc routers read the bias)", group=V3
    )
    balance_alpha: float | None = option(
        None,
        "α of the balance loss (V3 §4.2; default: the preset's aux_loss_alpha, V3's 0.0001)",
        group=V3,
    )
    mtp_weight: float = option(
        0.3, "λ of the MTP loss (V3 §4.2; 0 = off: the model is built without MTP modules)", group=V3
    )
    # Each packed document attends only to itself (Llama 3 §3.2 masks the same way), positions counted
    # from its BOS; without it short look-alike documents drown the prompt a copy must look back at.
    document_mask: bool = option(
        True,
        "let packed documents attend to the documents before them (default: each only to itself)",
        group=V3,
    )
    # Whole documents per window (the rest padded) instead of contiguous cuts that start the next
    # window mid-document, without the prompt its copies refer to (Ding et al. 2024, "Fewer
    # Truncations Improve Language Modeling"); documents longer than a window are still cut.
    whole_documents: bool = option(
        True,
        "fill every window to the brim, cutting documents at window edges (default: whole documents, padded)",
        flag="--cut-documents",
        group=V3,
    )
    # No loss on the prompts of chat documents (user turns, system prompt, tool results: nothing the
    # model can predict), as in SFT; the responses' is kept, tool calls included.
    mask_prompts: bool = option(
        True,
        "train on the prompts of chat documents too (default: loss on the responses only)",
        flag="--prompt-loss",
        group=V3,
    )
    # Chats of several questions in the embedded corpus: taught only one question after BOS, a model
    # reads the first question of a chat, not the last (benchmarks/README.md, "Asked second in a chat").
    multi_turn: float = option(
        0.0,
        "share of the embedded corpus's chats that ask 2-3 questions in a row (earlier answers untrained)",
        group=V3,
    )
    probe_problems: int = option(
        16,
        "held-out problems per task family for the copy probe at each validation (embedded corpus)",
        group=RUN,
    )
    val_every: int = option(100, "steps between validation (0 = off)", group=RUN)
    val_batches: int = option(
        8, "held-out batches of a step's sequences (--batch-size x --accumulation)", group=RUN
    )
    val_fraction: float = option(0.01, "share of documents held out for validation", group=RUN)
    checkpoint_every: int = option(200, "0 = only at the end", group=RUN)
    expert_load_every: int = option(50, "log per-expert loads every K steps", group=RUN)
    log_every: int = option(1, group=RUN)
    seed: int = option(0, parse=torch_seed, group=RUN)
    resume: bool = option(False, "continue from RUN/pretrain/ if it exists", group=RUN)
    tensorboard: bool = option(False, "also write TensorBoard events to RUN/tensorboard/", group=RUN)
    progress: bool = option(True, "no progress bars (log lines only)", group=RUN)
    threads: int | None = option(None, "torch CPU threads", group=RUN)
    expert_parallel: bool = option(
        False,
        "expert parallelism under torchrun: routed experts sharded over all ranks, EP = DP (docs/multinode.md)",
        flag="--ep",
        group=RUN,
    )

    def validate(self) -> None:
        """Clear errors, by flag, for settings out of range (configs built in Python skip argparse)."""
        check_choices(self)  # the types first: the comparisons below fail on a str
        for name in ("steps", "batch_size", "seq_len", "accumulation", "tokenizer_docs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # (written so that NaN fails too) a negative α or γ would push the routers toward imbalance
        for name in (
            "mtp_weight",
            "bias_update_speed",
            "probe_problems",
            "val_every",
            "val_batches",
            "checkpoint_every",
        ):
            if not 0 <= getattr(self, name) < math.inf:  # an infinite λ or α: every step's loss inf, skipped
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0 and finite, got {getattr(self, name)}"
                )
        if self.balance_alpha is not None and not 0 <= self.balance_alpha < math.inf:
            raise ValueError(f"--balance-alpha must be >= 0 and finite, got {self.balance_alpha}")
        # 0 or less was taken as 1 (log_every) or as every step (expert_load_every -1) without a word
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")
        if self.expert_load_every < 0:
            raise ValueError(f"--expert-load-every must be >= 0 (0 = off), got {self.expert_load_every}")
        if self.vocab_size is not None and self.vocab_size < 1:  # 0 was taken as the preset's
            raise ValueError(
                f"--vocab-size must be >= 1 (or left out for the preset's), got {self.vocab_size}"
            )
        if self.tokenizer and self.vocab_size is not None:  # the model's vocabulary is the tokenizer's
            raise ValueError(
                "vocab_size sizes a tokenizer trained here: --tokenizer brings its own vocabulary"
            )
        if not 0 <= self.multi_turn <= 1:
            raise ValueError(f"--multi-turn must be in [0, 1], got {self.multi_turn}")
        if self.threads is not None and self.threads < 1:  # 0 was ignored, -1 torch's traceback
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        self.optim_config()  # lr, schedule and clipping refused now, not after training a tokenizer
        if not 0 <= self.val_fraction < 1:  # (found now, not after training a tokenizer)
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.expert_parallel and self.precision == "fp8":
            raise ValueError("expert parallelism with precision fp8 is not supported yet (docs/multinode.md)")
        if self.tensorboard:
            from nanoseek.train.loop import require_tensorboard

            require_tensorboard()

    def optim_config(self) -> OptimConfig:
        """The Trainer's optimizer settings (its checks refuse a bad --lr, --min-lr-ratio, ...); the
        warmup at most half the run."""
        from nanoseek.train.loop import OptimConfig

        return OptimConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=min(self.warmup_steps, self.steps // 2),
            schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio,
            grad_clip=self.grad_clip,
            optimizer=self.optimizer,
        )


def resolve_precision(precision: str, device: torch.device, *, bf16_on_cpu: bool = True) -> str:
    """`auto`: bf16 where the hardware multiplies bf16 natively, else fp32. SFT, GRPO and distillation
    pass `bf16_on_cpu=False`: their recipes were tuned in fp32 on CPUs, and bf16 there moved their
    outcomes with the CPU (#15 item 6), so they take bf16 only on a GPU."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs (T4, V100) "support" bf16 only by emulation
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if bf16_on_cpu and cpu_has_bf16() else "fp32"


def _tokenizer(cfg: PretrainConfig, run: Path, vocab_size: int, is_main: bool, dist: Any) -> Any:
    """The given tokenizer, or one trained on the data (reused from RUN/tokenizer/ when resuming; a
    fresh run trains its own, not one an earlier run left there on other data or another --vocab-size)."""
    from nanoseek.tokenizer import load_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    from nanoseek.train.distributed import patient_group

    tok_dir = run / "tokenizer"
    # the others wait on a group of their own: in the process group's, a tokenizer that took rank 0
    # longer than its timeout (10 minutes) ended them in gloo's timeout
    group = patient_group(dist)
    if not (cfg.resume and (tok_dir / "tokenizer.json").exists()) and is_main:
        try:
            _train_tokenizer(cfg, run, vocab_size, dist.nodes)
        except Exception:
            _tokenizer_ready(dist, group, failed=True)
            raise
    _tokenizer_ready(dist, group)
    return load_tokenizer(tok_dir)


def _tokenizer_ready(dist: Any, group: Any, failed: bool = False) -> None:
    """Where rank 0 trained the tokenizer the others wait for: told that it failed, they leave with it
    (they waited in a barrier that ended in gloo's "Connection closed by peer" traceback, under the
    line of rank 0's error). One all-reduce on every rank, in `group` (`patient_group`'s)."""
    import torch
    import torch.distributed

    from nanoseek.train.distributed import all_reduce_, destroy_distributed

    if not dist.enabled:
        return
    failed_any = all_reduce_(torch.tensor([float(failed)]), dist, "max", group=group).item()
    torch.distributed.destroy_process_group(group)
    if failed_any:
        destroy_distributed()  # every rank here: leave together
        if not failed:
            raise ValueError("rank 0 could not train the tokenizer (its error says why)")


def _train_tokenizer(cfg: PretrainConfig, run: Path, vocab_size: int, nodes: int = 1) -> None:
    """Train a tokenizer on --tokenizer-docs documents of the data into RUN/tokenizer/. `nodes`: the
    machines waiting for it (the report's cost counts them)."""
    from nanoseek.data.corpus import tokenizer_documents
    from nanoseek.metrics import MetricsLog, progress_bar
    from nanoseek.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    docs = islice(tokenizer_documents(cfg.data, cfg.text_field, seed=cfg.seed), cfg.tokenizer_docs)
    read = 0

    def counted() -> Iterator[str]:
        # streamed, not listed: --tokenizer-docs documents of a user's corpus may not fit in memory
        nonlocal read
        with progress_bar(
            total=cfg.tokenizer_docs, desc="tokenizer", unit="doc", disable=not cfg.progress
        ) as bar:
            for doc in docs:
                read += 1
                bar.update(1)
                yield doc
            bar.total = read  # a corpus of fewer documents ends at 100%, not at 5000/20000 (25%)

    tok = train_tokenizer(counted(), vocab_size=vocab_size)
    if not read:
        raise ValueError(f"no documents in {cfg.data!r} to train a tokenizer on")
    tok.save(run / "tokenizer")
    wall = time.perf_counter() - t0
    # its time, as the speedrun's tokenizer stage logs it: the report's tokenizer row was all "–", and the
    # run's time and cost left it out
    MetricsLog(run, "tokenizer").log(
        step=None, event="end", wall_time_s=wall, vocab_size=tok.vocab_size, documents=read, nodes=nodes
    )
    print(f"tokenizer: {tok.vocab_size} tokens from {read} documents in {wall:.1f}s -> {run / 'tokenizer'}")


def pretrain(cfg: PretrainConfig, on_step: Callable[[int], None] | None = None) -> Path:
    """Train `cfg.preset` on `cfg.data`; returns the checkpoint directory RUN/pretrain/. `on_step(step)`
    runs in the training thread after every step (e.g. to take back CPU threads another job freed)."""
    from nanoseek.atomic import check_out
    from nanoseek.perf import torch_threads
    from nanoseek.train.loop import hold_stage

    try:
        cfg.validate()
    except ValueError as e:
        alike_on_every_rank(e)  # (under torchrun, before its process group is joined)
        raise
    if isinstance(cfg.data, list | tuple) and len(cfg.data) == 1:
        # one source, as the command line passes it: `data=["embedded"]` from Python was refused as "the
        # embedded corpus cannot be mixed with files" (the list read as files)
        cfg = replace(cfg, data=cfg.data[0])
    check_out(cfg.out, resume=cfg.resume)  # said now, not once a tokenizer is trained or the data read
    with torch_threads(cfg.threads), hold_stage(cfg.out, "pretrain"):
        return _pretrain(cfg, on_step)


def _pretrain(cfg: PretrainConfig, on_step: Callable[[int], None] | None) -> Path:
    import torch

    from nanoseek.checkpoint import build_model
    from nanoseek.config import resolve_config
    from nanoseek.data.corpus import PackedDataset, window_tokens
    from nanoseek.probe import KINDS
    from nanoseek.train.distributed import all_reduce_, destroy_distributed, init_distributed
    from nanoseek.train.loop import (
        StepLog,
        StepTargets,
        Trainer,
        language_model_loss,
        packed_documents,
        target_counts,
        warn_unused_bias_speed,
        warn_unused_model_flags,
    )

    dist = init_distributed()
    try:
        _check_same_settings(cfg, dist)
    except ValueError as e:
        # every rank saw the same settings, so every rank is here: leave together (a process exiting
        # with its gloo group alive while the other tears down aborted it now and then)
        destroy_distributed()
        alike_on_every_rank(e)
        raise
    run = Path(cfg.out)
    config = resolve_config(cfg.preset)
    try:  # the same settings and world size on every rank: refused alike by all, who leave together
        _check_world(cfg, config, dist.world_size)
    except ValueError as e:
        destroy_distributed()
        alike_on_every_rank(e)
        raise
    if dist.is_main:
        warn_unused_bias_speed(config, cfg)
        warn_unused_model_flags(config, cfg)  # while a left-out --balance-alpha is still None
    if cfg.balance_alpha is None:  # the preset's own α (V2's: 0.001, 0.003), as --vocab-size's default
        cfg = replace(cfg, balance_alpha=config.aux_loss_alpha)
    tok = _tokenizer(cfg, run, cfg.vocab_size or config.vocab_size, dist.is_main, dist)
    config = config.replace(
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        aux_loss_alpha=cfg.balance_alpha,
    )
    # λ = 0 never trains the MTP modules: kept, the checkpoint held their random init as if trained, and
    # `--speculative` drafted with it without a word. Built without them, the checkpoint says it has none.
    dropped_mtp = config.num_nextn_predict_layers if not cfg.mtp_weight else 0
    config = config.replace(num_nextn_predict_layers=config.num_nextn_predict_layers - dropped_mtp)
    precision = resolve_precision(cfg.precision, dist.device)

    torch.manual_seed(cfg.seed)
    model = build_model(config, device=dist.device).init_weights(cfg.seed)
    model.set_balance_alpha(config.aux_loss_alpha)  # the sequence-wise balance loss α (V3 eq. 17-20)
    if cfg.expert_parallel:
        from nanoseek.train.expert_parallel import parallelize_experts

        # Same init on every rank: each keeps its slice of the experts; the Trainer's FSDP2 skips them.
        parallelize_experts(model)
    trainer = Trainer(
        model,
        run,
        "pretrain",
        cfg.optim_config(),
        total_steps=cfg.steps,
        precision=precision,
        checkpoint_every=cfg.checkpoint_every,
        tokenizer=tok,
        bias_update_speed=cfg.bias_update_speed,
        dist=dist,
        config_extra={"pretrain": {**asdict(cfg), "precision": precision}},
        resume_settings={name: getattr(cfg, name) for name in RESUME_SETTINGS},
        flags_from=type(cfg),
    )
    per_rank = cfg.batch_size // dist.world_size
    data_kw: dict[str, Any] = dict(
        whole_documents=cfg.whole_documents,
        mask_prompts=cfg.mask_prompts,
        multi_turn=cfg.multi_turn,
        text_field=cfg.text_field,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    train_data = PackedDataset(cfg.data, tok, cfg.seq_len, per_rank, split="train", **data_kw)
    extra = trainer.resume() if cfg.resume else None
    if extra:
        train_data.load_state_dict(extra["data"])
    # a signal at a validation step saved it unvalidated (stopping promptly): validated at the resume,
    # or the run never had that point of its curve (at its last step: the report's final val loss)
    owed = bool(extra and extra.get("validation_due") and cfg.val_every and cfg.val_batches)
    # after the resume: its TensorBoard events go on from the step resumed
    log = StepLog.for_trainer(
        trainer,
        seq_len=cfg.seq_len,
        include_mtp=cfg.mtp_weight > 0,  # language_model_loss runs the MTP modules only then
        log_every=cfg.log_every,
        expert_load_every=cfg.expert_load_every,
        tensorboard=cfg.tensorboard,
        progress=cfg.progress,
    )
    if cfg.resume and trainer.global_step >= cfg.steps and not owed:
        # a finished run: its checkpoint stays as written, not validated and saved again (the report
        # adds this process's end record, no time, to the stage's)
        log.log(trainer.global_step, event="end", wall_time_s=0.0, skipped=trainer.skipped_steps)
        log.close()
        destroy_distributed()
        if dist.is_main:
            print(f"pretrain: nothing to train (--steps {cfg.steps}); checkpoint {trainer.checkpoint_dir}")
        return trainer.checkpoint_dir
    if trainer.global_step == 0 and dist.is_main:
        trainer.note_replacing()
        n_total = model.num_parameters(include_mtp=True)
        log.log(
            0,
            event="start",
            params=n_total,
            preset=str(cfg.preset),
            precision=precision,
            world_size=dist.world_size,
            nodes=dist.nodes,
            tokens_per_step=cfg.batch_size * cfg.seq_len * cfg.accumulation,
        )
        from nanoseek.accounting import count_parameters

        # the report's model table, for a run pretrained by hand (a speedrun logs its own, with the
        # decode speed it measures at the end)
        log.log_model(config)
        # the thread count a CPU run's speed depends on (--threads, OMP_NUM_THREADS, the CPUs it may use)
        threads = torch.get_num_threads()
        on_cpu = f" x {counted(threads, 'CPU thread')}" if dist.device.type == "cpu" else ""
        print(
            f"pretrain: {cfg.preset} ({count_parameters(config).described}, vocab {config.vocab_size}) on "
            f"{', '.join([cfg.data] if isinstance(cfg.data, str) else cfg.data or ['embedded'])}, {counted(cfg.steps, 'step')} x {cfg.batch_size}x{cfg.seq_len} tokens"
            f"{f' x {cfg.accumulation} micro' if cfg.accumulation > 1 else ''}, {precision}, "
            f"{dist.world_size} process{'es' if dist.world_size > 1 else ''}{on_cpu}"
            + (f"; without the preset's {dropped_mtp} MTP module(s): --mtp-weight 0" if dropped_mtp else "")
        )

    val_set = _validation_batches(cfg, tok, data_kw, per_rank) if cfg.val_every and cfg.val_batches else []
    batches = iter(train_data)

    depths = len(model.model.mtp_layers)
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []  # the step's micro-batches not yet trained on
    step_targets = StepTargets(torch.zeros(depths + 1), dist.world_size, cfg.accumulation)

    def batch_counts(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # MTP predicts nothing across a packed document's end where the mask separates documents
        return target_counts(y, depths, doc_ids=packed_documents(model, x)[0] if cfg.document_mask else None)

    def loss_fn() -> tuple[torch.Tensor, dict[str, Any]]:
        if not drawn:  # a step's first micro-batch: draw them all, and count the step's targets on every rank
            drawn.extend(next(batches) for _ in range(cfg.accumulation))
            counts = torch.stack([batch_counts(x, y) for x, y in drawn]).sum(0)
            all_reduce_(counts, dist, "sum")
            step_targets.counts = counts
        x, y = drawn.pop(0)
        # each micro-batch its share of the step's mean over every target: one process and N train alike
        return language_model_loss(
            trainer.model,
            x.to(dist.device),
            y.to(dist.device),
            mtp_weight=cfg.mtp_weight,
            document_mask=cfg.document_mask,
            step=step_targets,
            token_mask=window_tokens(x, tok.pad_token_id).to(dist.device) if cfg.whole_documents else None,
        )

    # Every rank runs the probe: its forward passes are collectives under FSDP2 (all-gathers) and
    # expert parallelism (all-to-alls), so a forward on rank 0 alone desynchronizes the ranks.
    probe = _probe(cfg, tok)

    # the validation loss is the mean over every target of the validation set, all batches and ranks:
    # its batches hold unequal numbers of targets (prompts masked, documents padded), and a batch with
    # none adds nothing rather than a zero or a NaN weighed as much as the others
    val_targets = StepTargets(torch.zeros(depths + 1), dist.world_size, max(len(val_set), 1))

    def validate() -> float:
        if not val_targets.counts.any():  # the set is fixed: counted once (a collective, on every rank)
            counts = torch.stack([batch_counts(x, y) for x, y in val_set]).sum(0)  # (never empty here)
            val_targets.counts = all_reduce_(counts, dist, "sum")
        it = iter(val_set)

        def val_loss() -> tuple[torch.Tensor, dict[str, Any]]:
            x, y = next(it)
            return language_model_loss(
                trainer.model,
                x.to(dist.device),
                y.to(dist.device),
                document_mask=cfg.document_mask,
                step=val_targets,
            )

        loss = trainer.validate(val_loss, len(val_set))
        log.log(trainer.global_step, val_loss=loss)
        log.write(f"step {trainer.global_step}: val_loss {loss:.4f}")  # a log line, bar or not
        if probe:
            from nanoseek.probe import probe_losses

            with trainer.autocast():
                losses = probe_losses(model, probe)
            log.log(trainer.global_step, **{f"probe_{k}_loss": losses[k] for k in KINDS if k in losses})
        return loss

    validated_at = -1  # the step validated last in this process

    def train_state() -> dict[str, Any]:
        step = trainer.global_step
        due = bool(val_set) and (step % cfg.val_every == 0 or step == cfg.steps)
        return {"data": train_data.state_dict(), "validation_due": due and validated_at != step}

    t0 = time.perf_counter()
    start_step, start_tokens = trainer.global_step, trainer.tokens_seen
    last: dict[str, Any] = {}
    val_loss = None
    try:
        with trainer.stop_on_signals():
            if owed:
                val_loss, validated_at = validate(), trainer.global_step
            while trainer.global_step < cfg.steps:
                metrics = trainer.step(loss_fn, cfg.accumulation)
                log.step(metrics)
                if "skipped" not in metrics:  # the summary's loss, as the report's: a skipped step's (NaN,
                    last = metrics  # a spike) is no loss of the weights saved, which it left unchanged
                step = trainer.global_step
                if trainer.stop_requested():  # a signal: save this step and stop (every rank here)
                    break
                if on_step is not None:
                    on_step(step)
                if val_set and (step % cfg.val_every == 0 or step == cfg.steps):
                    val_loss, validated_at = validate(), step
                if trainer.checkpoint_due():
                    trainer.save(train_state())
            if val_set and val_loss is None and not trainer.stop_signal:
                val_loss, validated_at = validate(), trainer.global_step
            path = trainer.save(train_state())
            trainer.stop_requested()  # one that came during the last step's save: stop all the same
    except BaseException as e:
        log.ended_by(e)
        log.close()
        destroy_distributed(failed=True)
        raise
    log.close()
    if trainer.stop_signal:
        destroy_distributed()
        raise trainer.interrupted(path)
    wall = time.perf_counter() - t0
    done = trainer.global_step - start_step
    tokens = trainer.tokens_seen - start_tokens
    if dist.is_main:
        parts = [
            f"pretrain: {counted(done, 'step')}, {human(tokens)} tokens in {wall:.0f}s ({tokens / max(wall, 1e-9):.0f} tok/s)"
        ]
        if last:
            parts.append(f"train loss {last.get('lm_loss', last['loss']):.3f}")
            if "expert_imbalance_max" in last:
                parts.append(f"expert imbalance {last['expert_imbalance_max']:.2f}")
        if val_loss is not None:
            parts.append(f"val loss {val_loss:.3f}")
        if trainer.skipped_steps:
            parts.append(f"{counted(trainer.skipped_steps, 'step')} skipped")
        print(", ".join(parts) + f"; checkpoint {path}")
        log.log(
            trainer.global_step,
            event="end",
            wall_time_s=wall,
            val_loss=val_loss,
            skipped=trainer.skipped_steps,
        )
    destroy_distributed()
    return path


def _check_world(cfg: PretrainConfig, config: Any, world_size: int) -> None:
    """The settings this model and this many ranks refuse: now, not once rank 0 has trained a tokenizer
    (and --ep in one process too, where a dense model's was ignored without a word)."""
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    if cfg.batch_size % world_size:  # global: every rank takes an equal share
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world_size} ranks")
    cfg.optim_config().check_world_size(world_size)
    if cfg.expert_parallel:
        from nanoseek.train.expert_parallel import check_expert_parallel

        check_expert_parallel(config.n_routed_experts, world_size)


def _check_same_settings(cfg: PretrainConfig, dist: Any) -> None:
    """Every rank must run the same command: ranks with other settings (a node started with another
    --steps or --seq-len) would hang in mismatched collectives or silently train something else."""
    if not dist.enabled:
        return
    import torch.distributed

    mine = {k: v for k, v in asdict(cfg).items() if k != "threads"}  # CPU threads may differ per node
    every: list[Any] = [None] * dist.world_size  # each rank's `mine`, once gathered
    torch.distributed.all_gather_object(every, mine)
    differ = sorted(k for k in mine if any(other[k] != mine[k] for other in every))
    if differ:
        shown = "; ".join(f"{k}: " + ", ".join(repr(o[k]) for o in every) for k in differ)
        raise ValueError(
            f"the ranks were started with different settings (by rank: {shown}): give every rank the same command"
        )


def _probe(cfg: PretrainConfig, tok: Any) -> list:
    """Held-out worked problems of the embedded corpus's families, scored by kind of token
    (`nanoseek.probe`); none for other corpora, whose documents are not built from tasks."""
    from nanoseek.data.corpus import embedded_tasks, is_embedded
    from nanoseek.data.tasks import BUILTIN_TASKS
    from nanoseek.probe import probe_documents

    if not cfg.probe_problems or not is_embedded(cfg.data):
        return []
    # a family named twice weights the corpus (the speedrun's sorting x2), not the probe
    tasks = list(dict.fromkeys(embedded_tasks(cfg.data) or BUILTIN_TASKS))
    return probe_documents(tok, tasks, cfg.probe_problems, seed=cfg.seed)


def _validation_batches(cfg: PretrainConfig, tok: Any, data_kw: dict[str, Any], per_rank: int) -> list:
    """A fixed held-out set (the same batches at every evaluation), up to `val_batches` batches of a
    step's sequences, each drawn as `accumulation` micro-batches: a run that splits its batch into
    micro-batches validates on the same rows as one that does not (it held out 1/accumulation of
    them, and so reported another validation loss for the same weights)."""
    from nanoseek.data.corpus import PackedDataset, is_embedded

    def say(message: str) -> None:
        if data_kw["rank"] == 0:  # every rank finds the same: said once under torchrun, not by each
            print(message)

    if cfg.val_fraction == 0 and not is_embedded(cfg.data):  # (the embedded corpus has its own split)
        say("pretrain: no validation (--val-fraction 0 holds no document out)")
        return []
    val = PackedDataset(cfg.data, tok, cfg.seq_len, per_rank, split="val", repeat=False, **data_kw)
    try:
        out = list(islice(iter(val), cfg.val_batches * cfg.accumulation))
    except ValueError as e:  # a corpus so small its validation split is empty
        say(f"pretrain: no validation ({e})")
        return []
    out = out[: len(out) - len(out) % cfg.accumulation]  # whole batches, as an unsplit run's set holds
    if not out:
        say("pretrain: validation split smaller than one batch; no validation loss")
    return out
