"""Checkpoints: the one reader and writer of model weights and training state.

A checkpoint directory is in Hugging Face's layout: config.json, model.safetensors (or shards +
model.safetensors.index.json), whatever the stage adds (tokenizer files, generation_config.json) and,
from training, train_state/ (optimizer, step, RNG, data position). What is notable here:
- The only renaming between nanoseek and the files is for routed experts and MTP: the files keep
  DeepSeek's per-expert `experts.{j}.{gate,up,down}_proj.weight`, nanoseek stacks them for grouped
  compute; the MTP modules live at index num_hidden_layers + depth, with copies of the shared
  embedding and head as DeepSeek ships them.
- DeepSeek's FP8 checkpoints (float8_e4m3fn + `weight_scale_inv` per 128x128 block) are dequantized
  on load, or, with `load_model(..., fp8=True)`, kept as they are in `FP8Linear` storage.
- One key check (`check_keys`) for every load: missing, unexpected and mis-shaped tensors are named.
- Every write is atomic (`nanoseek.atomic`), and no pickle is ever loaded but train_state's own
  (`weights_only=True`). Sharded training's DCP checkpoints are `nanoseek.train.dcp`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nanoseek.atomic import atomic_file, atomic_write, restore_directory
from nanoseek.config import ModelConfig, resolve_config
from nanoseek.model.fp8 import FP8_DTYPE, FP8Linear, dequantize_blocks, quantize_blocks, quantize_linears_fp8
from nanoseek.model.transformer import DeepSeekV3

build_model = DeepSeekV3.build  # construction lives with the model; the name stays for its callers
TRAIN_STATE = "train_state"
_MTP = "model.mtp_layers."
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # DeepSeek's copies of the main ones
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ------------------------------------------------------------- conversion
def to_hf_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """nanoseek parameter names -> DeepSeek/HF checkpoint keys (per-expert weights, MTP at index n)."""
    cfg = model.config
    n = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        if key.startswith(_MTP):
            depth, rest = key.removeprefix(_MTP).split(".", 1)
            key = f"model.layers.{n + int(depth)}.{rest}"
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            inter = value.shape[1] // 2
            for j in range(value.shape[0]):
                out[f"{prefix}.{j}.gate_proj.weight"] = value[j, :inter]
                out[f"{prefix}.{j}.up_proj.weight"] = value[j, inter:]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for j in range(value.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight"] = value[j]
        else:
            out[key] = value
    for d in range(len(model.model.mtp_layers)):
        out[f"model.layers.{n + d}.{_MTP_SHARED[0]}"] = model.model.embed_tokens.weight
        out[f"model.layers.{n + d}.{_MTP_SHARED[1]}"] = model.lm_head.weight
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(
    tensors: Mapping[str, torch.Tensor],
    config: ModelConfig,
    dtype: torch.dtype,
    fp8_modules: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """DeepSeek/HF checkpoint keys -> nanoseek parameter names, in `dtype`.

    FP8 weights are dequantized, except those of `fp8_modules` (nanoseek names of `FP8Linear`
    layers), which keep the file's bytes and scales; a higher-precision weight of one is quantized.
    """
    n, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        m = _LAYER_KEY.match(key)
        if m and int(m.group(1)) >= n:
            depth, rest = int(m.group(1)) - n, m.group(2)
            if depth >= n_mtp or rest in _MTP_SHARED:
                continue  # MTP layers this config does not use; shared tensors live in the main model
            name = f"{_MTP}{depth}.{rest}"
        else:
            name = key
        module = name.removesuffix(".weight")
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = tensors.get(key + "_scale_inv")
            if scale is None:
                raise ValueError(f"FP8 tensor {key} has no weight_scale_inv beside it")
            if module in fp8_modules and value.dtype == FP8_DTYPE:
                out[name], out[f"{module}.weight_scale_inv"] = value, scale.float()
                continue
            value = dequantize_blocks(value, scale)
        if module in fp8_modules:
            out[name], out[f"{module}.weight_scale_inv"] = quantize_blocks(value)
        elif em := _EXPERT_KEY.match(name):
            experts.setdefault(em.group(1), {}).setdefault(int(em.group(2)), {})[em.group(3)] = value
        else:
            out[name] = _cast(name, value, dtype)
    for prefix, per_expert in experts.items():
        count = len(per_expert)
        if sorted(per_expert) != list(range(count)):
            raise ValueError(f"{prefix}: expert indices are not 0..{count - 1}")
        e = [per_expert[j] for j in range(count)]
        gate_up = [torch.cat((x["gate_proj"], x["up_proj"])) for x in e]
        out[f"{prefix}.gate_up_proj"] = torch.stack(gate_up).to(dtype)
        out[f"{prefix}.down_proj"] = torch.stack([x["down_proj"] for x in e]).to(dtype)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The balancing bias stays fp32 in any dtype: its steps (γ = 0.001) vanish in bf16.
    keep = not value.is_floating_point() or "e_score_correction_bias" in key
    return value if keep else value.to(dtype)


def check_keys(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: Any) -> None:
    """The one check that `tensors` fill `model` exactly; raises naming what does not fit.

    A tied head is the embedding: it is neither needed nor in the way."""
    expected = model.state_dict()
    config = getattr(model, "config", None)
    optional = {"lm_head.weight"} if config is not None and config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected) - optional)
    for k in sorted(set(expected) & set(tensors)):
        if tuple(expected[k].shape) != tuple(tensors[k].shape):
            raise ValueError(
                f"{k}: shape {tuple(tensors[k].shape)} in {source} != {tuple(expected[k].shape)} in the "
                "model: it was written for another config.json"
            )
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return f"{keys[:5]}{'...' if len(keys) > 5 else ''} ({len(keys)} in all)"

        raise ValueError(
            f"{source} does not match the model's config.json: missing {show(missing)}, unexpected "
            f"{show(unexpected)}. A missing weight would be left as uninitialised memory; the files are "
            "incomplete or were written for another config.json"
        )


# --------------------------------------------------------------- weights
def save_model(
    model: DeepSeekV3,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write config.json and safetensors (sharded past max_shard_bytes) into `directory`.

    Each file is replaced atomically, so readers never see a half file; to replace a whole
    checkpoint atomically, write into `nanoseek.atomic.atomic_directory(...)`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    if dtype is not None:
        state = {k: _cast(k, v, dtype) for k, v in state.items()}
    # Shared tensors (tied or MTP copies) must be separate storages for safetensors.
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
    model.config.replace(torch_dtype=str(dtype or model.dtype).removeprefix("torch.")).save(out)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    if len(shards) == 1:
        names = ["model.safetensors"]
    for name, shard in zip(names, shards, strict=True):
        with atomic_file(out / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    return out


def read_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
            raise FileNotFoundError(f"no safetensors weights in {d}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[k] = f.get_tensor(k)
    return tensors


def load_model(
    path_or_preset: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    fp8: bool = False,
    act_quant: bool = False,
) -> DeepSeekV3:
    """A checkpoint directory in HF layout, or a preset name (random weights from `seed`).

    fp8=True keeps the linear layers in FP8 (`FP8Linear`, for inference; `act_quant` also quantizes
    their inputs): DeepSeek's FP8 weights are taken as they are (no dequantize/requantize round
    trip), higher-precision ones block-quantized. The embedding, head, norms, router and routed
    experts (stacked for grouped compute) load in `dtype`, dequantized where the file holds FP8.
    """
    p = Path(path_or_preset)
    config = resolve_config(path_or_preset)
    tensors = read_safetensors(p) if p.exists() else None
    n = config.num_hidden_layers
    if tensors is not None and config.num_nextn_predict_layers:
        layers = (_LAYER_KEY.match(k) for k in tensors)
        if not any(m and int(m.group(1)) >= n and m.group(2) not in _MTP_SHARED for m in layers):
            # transformers' DeepseekV3Config defaults to one MTP layer but its save_pretrained writes
            # none: the main model is whole; load it without the module (only speculative decoding
            # uses it).
            warnings.warn(  # the default filter says it once per place
                f"{p}: config.json asks for {config.num_nextn_predict_layers} MTP layer(s) but the "
                "checkpoint holds no MTP weights (transformers writes none); loading without the MTP "
                "module, so speculative decoding is off for this model",
                stacklevel=2,
            )
            config = config.replace(num_nextn_predict_layers=0)
    model = build_model(config, device=device, dtype=dtype)
    if tensors is None:
        model.init_weights(seed)
    if fp8:  # quantizes the preset's weights, or placeholders the checkpoint's then replace
        quantize_linears_fp8(model, act_quant=act_quant)
    if tensors is not None:
        fp8_modules = {name for name, m in model.named_modules() if isinstance(m, FP8Linear)}
        state = from_hf_state_dict(tensors, config, dtype, fp8_modules)
        check_keys(model, state, f"checkpoint {p}")
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    return model


# ----------------------------------------------------------- train state
def save_train_state(
    directory: str | os.PathLike, optimizer: dict[str, Any], trainer: dict[str, Any], meta: dict[str, Any]
) -> None:
    """DIR/train_state/: optimizer state and the trainer's (step, RNG, data position), as tensors and
    plain values (loadable with weights_only=True), and `meta` as readable JSON."""
    ts = Path(directory) / TRAIN_STATE
    ts.mkdir(parents=True, exist_ok=True)
    for name, state in (("optimizer.pt", optimizer), ("trainer.pt", trainer)):
        with atomic_file(ts / name) as tmp:
            torch.save(state, tmp)
    atomic_write(ts / "trainer.json", json.dumps(meta, indent=2) + "\n")


def load_train_state(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(optimizer state, trainer state) from DIR/train_state/, or None when there is none."""
    restore_directory(directory)  # a crash mid-swap left the last checkpoint aside
    ts = Path(directory) / TRAIN_STATE
    if not (ts / "trainer.pt").exists():
        return None
    return tuple(
        torch.load(ts / n, map_location="cpu", weights_only=True) for n in ("optimizer.pt", "trainer.pt")
    )  # type: ignore[return-value]
