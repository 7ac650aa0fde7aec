"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards,
any world size reads them back, and `export_hf` turns one into the usual HF-layout directory.

What is notable here:
- `save_dcp` writes the sharded state dict as it lives on the ranks (FSDP2 shards, expert-parallel
  slices, replicated tensors written once) plus `config.json`; no rank ever holds the full model,
  which is what makes it the checkpoint format past one machine's memory. The optimizer state can go
  in the same checkpoint (keyed by parameter name, so it also reshards).
- `load_dcp` reads into whatever layout the model has now: DCP's planner maps the saved chunks onto
  the requested local shards, so a save at world size 2 (EP = 2 + FSDP2) loads in one process into
  a plain model, and a single-process save loads into a sharded one. With a model built on the meta
  device and parallelized, `to_empty` + `load_dcp` is the memory-light way to start a large run.
- The directory is written under a scratch name and renamed by rank 0 once DCP's metadata is
  complete, so a crash mid-save never leaves a half checkpoint under the final name.
- `export_hf(dcp_dir, out_dir)` runs in one process (no process group needed) and writes the single
  HF-layout directory `nanoseek.load_model` and `transformers` read; tokenizer files saved beside the
  DCP checkpoint are copied along.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanoseek.atomic import atomic_directory, directory_to_read, restore_directory, scratch_dir
from nanoseek.checkpoint import save_model
from nanoseek.config import ModelConfig
from nanoseek.model.transformer import DeepSeekV3

METADATA = ".metadata"  # DCP's index file; its presence marks a complete checkpoint
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # where transformers 5 saves the template (tokenizer_config.json then has none)
    "generation_config.json",
)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when none is initialized: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA).is_file()


def save_dcp(
    model: DeepSeekV3,
    directory: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Save `model` (and `optimizer`) as a DCP checkpoint; every rank must call. Returns the path."""
    final = Path(directory)
    # Rank 0 owns the swap; every rank writes its shards into the same scratch directory first.
    swap = atomic_directory(final) if _rank() == 0 else contextlib.nullcontext(scratch_dir(final))
    with swap as tmp:
        _barrier()  # the scratch directory exists
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            stateful = {name for name, p in model.named_parameters() if p in optimizer.state}
            state["optim"] = _optimizer_state(model, optimizer, stateful)
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
        _barrier()  # every rank's shard files and rank 0's metadata are on disk
        if _rank() == 0:
            model.config.save(tmp)
    _barrier()
    return final


def load_dcp(
    model: nn.Module,
    directory: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load a DCP checkpoint into `model` (and `optimizer`) in its current layout; every rank calls.

    The model may be plain, FSDP2-sharded, expert-parallel, or materialized from the meta device with
    `to_empty`; buffers that are not saved (RoPE tables, load counters) are rebuilt.
    """
    path = Path(directory)
    if _rank() == 0:
        restore_directory(path)  # a save cut short between its two renames left it aside
    _barrier()
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a torch.distributed.checkpoint directory (no {METADATA})")
    _check_config(model, path)
    if isinstance(model, DeepSeekV3):
        model.reset_buffers()  # not saved: RoPE tables, load counters
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        # "optim.state.<parameter>.<exp_avg|step|...>": the parameters saved with a state
        stateful = {
            k.removeprefix("optim.state.").rpartition(".")[0] for k in saved if k.startswith("optim.state.")
        }
        state["optim"] = _optimizer_state(model, optimizer, stateful)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:
        # DCP's CheckpointException wraps every rank's error (with its traceback); it is a BaseException
        errors = [error for error, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        reasons = "; ".join(dict.fromkeys(f"{type(error).__name__}: {error}" for error in errors))
        raise ValueError(f"could not load DCP checkpoint {path} into this model: {reasons}") from e
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        # strict=False: parameters saved without a state (see `_drop_state`) stay without one
        set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
        _drop_state(model, optimizer, stateful)


def _optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, stateful: set[str]
) -> dict[str, Any]:
    """The optimizer's sharded state dict, holding the state of the parameters named in `stateful` only."""
    optim = get_optimizer_state_dict(model, optimizer)
    state = optim["state"]
    assert isinstance(state, dict)  # parameter name -> its state (the list is "param_groups")
    optim["state"] = {name: v for name, v in state.items() if name in stateful}
    _drop_state(model, optimizer, stateful)
    return optim


def _drop_state(model: nn.Module, optimizer: torch.optim.Optimizer, stateful: set[str]) -> None:
    """torch's state-dict helpers give every parameter of an optimizer without state a zero-gradient
    step (AdamW: step 1, zero moments), as `Trainer.save` notes. A parameter that had none (no update
    yet, or never a gradient: the MTP modules with λ = 0) gets none back: saved, its state would be
    missing from a checkpoint that has the others' and refuse to load; kept, its updates would count
    one step too many (AdamW's bias correction)."""
    for name, p in model.named_parameters():
        if name not in stateful:
            optimizer.state.pop(p, None)


def _check_config(model: nn.Module, path: Path) -> None:
    config = getattr(model, "config", None)
    if config is None or not (path / "config.json").exists():
        return
    mine, theirs = config.to_dict(), ModelConfig.load(path).to_dict()
    shape = ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts", "num_nextn_predict_layers")
    diff = {k: (theirs.get(k), mine.get(k)) for k in shape if theirs.get(k) != mine.get(k)}
    if diff:
        raise ValueError(f"DCP checkpoint {path} was saved from another model shape: (saved, model) {diff}")


def export_hf(
    dcp_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the HF-layout directory (config.json + safetensors) of a DCP checkpoint; one process.

    Reads `config.json` saved beside the shards, gathers every shard into a plain model on the CPU and
    writes it atomically with `nanoseek.checkpoint.save_model`; tokenizer files found in `dcp_dir`
    are copied along.
    """
    # a reader: a copy a save left aside mid-swap is read where it lies (moved back, the writer's
    # second rename would fail)
    src = directory_to_read(dcp_dir)
    if not is_dcp_checkpoint(src):
        raise FileNotFoundError(f"{src} is not a torch.distributed.checkpoint directory (no {METADATA})")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} has no config.json: it was not written by nanoseek's save_dcp")
    # out_dir == dcp_dir replaced the DCP checkpoint, and the optimizer state a --resume reads, with
    # the HF copy; a directory holding it (the run's own, `export_hf("runs/x/dcp", "runs/x")`) was
    # replaced whole, the DCP checkpoint and the rest of the run with it
    target, sources = Path(out_dir).resolve(), (src.resolve(), Path(dcp_dir).resolve())
    if any(d.is_relative_to(target) for d in sources):
        what = "the" if target in sources else "a directory holding the"
        raise ValueError(
            f"export_hf: out_dir {out_dir} is {what} DCP checkpoint being exported, which the export "
            "would replace (its optimizer state with it): name another directory"
        )
    config = ModelConfig.load(src)
    model = DeepSeekV3.build(config)
    state = model.state_dict()
    with _single_process_quiet():
        dcp.load({"model": state}, checkpoint_id=str(src), no_dist=True)
    model.load_state_dict(state)
    with atomic_directory(out_dir) as tmp:
        save_model(model, tmp, dtype=dtype)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
    return Path(out_dir)
