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
- One key check (`check_keys`) for every load: missing, unexpected and mis-shaped tensors are named
  (with the file they are in), from the files' headers before any data is read.
- `load_model` streams the files tensor by tensor into a model built on the meta device: each weight
  is materialised once, in its final dtype or quantized storage (memory: docs/checkpoints.md).
- A Hugging Face Hub name resolves through `huggingface_hub` (`resolve_checkpoint`, used by every
  command); a broken directory (a missing shard, a truncated file) gets one error naming the file.
- Every write is atomic (`nanoseek.atomic`), and no pickle is ever loaded but train_state's own
  (`weights_only=True`). Sharded training's DCP checkpoints are `nanoseek.train.dcp`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
import struct
import warnings
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nanoseek.atomic import atomic_file, atomic_write, directory_to_read, fsync, restore_directory
from nanoseek.config import ModelConfig, read_json_object, resolve_config
from nanoseek.model.fp8 import (
    FP8_DTYPE,
    QUANTIZATION_CONFIG,
    FP8Linear,
    dequantize_blocks,
    quantize_blocks,
    quantize_linears_fp8,
    quantize_state_dict_fp8,
    ue8m0_scales,
)
from nanoseek.model.transformer import DeepSeekV3, check_model

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


def _model_name(key: str, config: ModelConfig, shape: Collection[int]) -> str | None:
    """The nanoseek name of checkpoint key `key` (of `shape`; routed experts still per expert), or None
    for what the model does not hold: FP8 scales (read beside their weight), MTP layers the config does
    not use, the MTP modules' copies of the shared embedding and head, and empty tensors (transformers
    writes a shared expert of width 0 where n_shared_experts is 0; no layer here is empty, so a weight
    the model needs that a file holds empty is reported missing). Layers past the main ones are MTP
    layers only where there can be some (V3 files, a config with MTP): in a Qwen2, Llama or V2
    checkpoint they are layers config.json does not count, which the key check reports."""
    if key.endswith("_scale_inv") or 0 in shape:
        return None
    m = _LAYER_KEY.match(key)
    mtp = config.num_nextn_predict_layers > 0 or config.model_type == "deepseek_v3"
    if m and mtp and int(m.group(1)) >= config.num_hidden_layers:
        depth, rest = int(m.group(1)) - config.num_hidden_layers, m.group(2)
        if depth >= config.num_nextn_predict_layers or rest in _MTP_SHARED:
            return None
        return f"{_MTP}{depth}.{rest}"
    return key


def _convert(
    key: str,
    name: str,
    value: torch.Tensor,
    scale: torch.Tensor | None,
    dtype: torch.dtype,
    fp8_modules: Collection[str],
    pow2: bool = False,
) -> dict[str, torch.Tensor]:
    """One checkpoint tensor -> the model's tensor(s) of it, in `dtype` (or FP8 + block scales for an
    `FP8Linear`, power-of-two ones with `pow2` as the checkpoint's own); a routed expert's stays under
    its per-expert name, for the caller to stack."""
    module = name.removesuffix(".weight")
    if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if scale is None:
            raise ValueError(f"FP8 tensor {key} has no weight_scale_inv beside it")
        _check_block_scales(key, tuple(value.shape), tuple(scale.shape))
        if module in fp8_modules and value.dtype == FP8_DTYPE:
            return {name: value, f"{module}.weight_scale_inv": scale.float()}
        value = dequantize_blocks(value, scale)
    if module in fp8_modules:
        q, s = quantize_blocks(value, pow2)
        return {name: q, f"{module}.weight_scale_inv": s}
    return {name: _cast(name, value, dtype)}


def _block_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one scale per 128x128 block of a weight of `shape`."""
    return tuple(-(-d // 128) for d in shape)


def _check_block_scales(key: str, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> None:
    """FP8 weight `key`'s `weight_scale_inv` must be DeepSeek's: one scale per 128x128 block."""
    if scale_shape != _block_shape(shape):
        raise ValueError(
            f"{key}_scale_inv: shape {scale_shape} is not one scale per 128x128 block of "
            f"{shape} {_block_shape(shape)}: nanoseek reads DeepSeek's 128x128 block scales only"
        )


def from_hf_state_dict(
    tensors: Mapping[str, torch.Tensor],
    config: ModelConfig,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """DeepSeek/HF checkpoint keys -> nanoseek parameter names, in `dtype`, all in memory at once
    (for tensors already there; `load_model` streams files instead). FP8 weights are dequantized."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        name = _model_name(key, config, value.shape)
        if name is None:
            continue
        scale = tensors.get(key + "_scale_inv")
        for k, v in _convert(key, name, value, scale, dtype, ()).items():
            if em := _EXPERT_KEY.match(k):
                experts.setdefault(em.group(1), {}).setdefault(int(em.group(2)), {})[em.group(3)] = v
            else:
                out[k] = v
    for prefix, per_expert in experts.items():
        # an expert without one of its projections was a KeyError ('gate_proj'), one of another shape
        # torch.stack's "expects each tensor to be equal size": a resume's reader names them as a load does
        shapes = {j: {part: tuple(v.shape) for part, v in x.items()} for j, x in per_expert.items()}
        _check_experts(prefix, shapes, "")
        e = [per_expert[j] for j in range(len(per_expert))]
        gate_up = [torch.cat((x["gate_proj"], x["up_proj"])) for x in e]
        out[f"{prefix}.gate_up_proj"] = torch.stack(gate_up).to(dtype)
        out[f"{prefix}.down_proj"] = torch.stack([x["down_proj"] for x in e]).to(dtype)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _check_experts(prefix: str, per_expert: Mapping[int, Mapping[str, tuple[int, ...]]], where: str) -> None:
    """The routed experts `prefix`.0.. (their projections' shapes) make one stacked weight: indices
    0..E-1, each with gate, up and down projections of expert 0's shapes (gate's that of up)."""
    count = len(per_expert)
    if sorted(per_expert) != list(range(count)):
        raise ValueError(f"{prefix}: expert indices{where} are not 0..{count - 1}")
    for j in range(count):
        parts = per_expert[j]
        if len(parts) < 3 or parts != per_expert[0] or parts["gate_proj"] != parts["up_proj"]:
            raise ValueError(
                f"{prefix}.{j}: its gate/up/down projections{where} are incomplete or differ in "
                f"shape from expert 0's: {dict(parts)} vs {dict(per_expert[0])}"
            )


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The balancing bias is fp32 in any dtype, a file's bf16 one too (as transformers keeps it): its
    # steps (γ = 0.001) vanish in bf16.
    if "e_score_correction_bias" in key:
        return value.float()
    # FP8 weights and their scales are one value together: casting either alone would change it.
    keep = not value.is_floating_point() or value.dtype == FP8_DTYPE or key.endswith("_scale_inv")
    return value if keep else value.to(dtype)


def check_keys(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    source: Any,
    files: Mapping[str, Any] | None = None,
) -> None:
    """The one check that `tensors` fill `model` exactly; raises naming what does not fit (and, with
    `files`, which file each tensor came from).

    A tied head is the embedding: it is neither needed nor in the way."""
    expected = model.state_dict()
    config = getattr(model, "config", None)
    optional = {"lm_head.weight"} if config is not None and config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected) - optional)
    for k in sorted(set(expected) & set(tensors)):
        if tuple(expected[k].shape) != tuple(tensors[k].shape):
            where = files.get(k, source) if files else source
            raise ValueError(
                f"{k}: shape {tuple(tensors[k].shape)} in {where} != {tuple(expected[k].shape)} in the "
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
def transformers_differences(config: ModelConfig) -> list[str]:
    """Settings of a DeepSeek config that transformers' DeepseekV2/V3 classes ignore: they load such a
    checkpoint and compute other logits than nanoseek does, without a word (V3 always routes by sigmoid
    scores plus the balancing bias, V2 always by softmax over interleaved RoPE dims, and both make every
    layer past first_k_dense_replace an MoE layer)."""
    mt = config.model_type
    out: list[str] = []
    if mt not in ("deepseek_v2", "deepseek_v3") or config.attention_variant != "mla":
        return out
    scoring, freq = (
        ("sigmoid" if mt == "deepseek_v3" else "softmax"),
        int(config.extra.get("moe_layer_freq", 1)),
    )
    if config.is_moe and config.scoring_func != scoring:
        out.append(f"scoring_func={config.scoring_func!r} (its {mt} routes by {scoring} scores)")
    if config.is_moe and mt == "deepseek_v3" and config.topk_method != "noaux_tc":
        out.append(f"topk_method={config.topk_method!r} (its deepseek_v3 routes as noaux_tc)")
    if config.is_moe and mt == "deepseek_v2" and config.topk_method == "noaux_tc":
        out.append(
            "topk_method='noaux_tc' (its deepseek_v2 has only greedy and group_limited_greedy: it fails)"
        )
    if (
        config.is_moe
        and mt == "deepseek_v2"
        and config.norm_topk_prob
        and (config.num_experts_per_tok or 0) > 1
    ):
        out.append("norm_topk_prob=True (its deepseek_v2 scales the weights instead, as DeepSeek does not)")
    if mt == "deepseek_v2" and not config.rope_interleave:
        out.append("rope_interleave=False (its deepseek_v2 reads RoPE dims interleaved)")
    if config.is_moe and freq != 1:
        out.append(f"moe_layer_freq={freq} (it makes every layer past first_k_dense_replace an MoE layer)")
    if mt == "deepseek_v2" and config.hidden_size % config.num_attention_heads:  # (MLA needs no such fit)
        out.append(
            f"hidden_size={config.hidden_size} not a multiple of num_attention_heads="
            f"{config.num_attention_heads} (its DeepseekV2Config refuses the file)"
        )
    return out


def save_model(
    model: DeepSeekV3,
    directory: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write config.json and safetensors (sharded past max_shard_bytes) into `directory`.

    Each file is replaced atomically, so readers never see a half file; to replace a whole
    checkpoint atomically, write into `nanoseek.atomic.atomic_directory(...)`.
    """
    from nanoseek.engine.packed import is_packed
    from nanoseek.engine.quantize import is_quantized

    check_model(model, "save_model")  # before the directory is made: a refused save leaves no empty one
    if is_quantized(model):  # its qweight/scale tensors are no checkpoint's keys: nothing could load them
        raise ValueError(
            "save_model: the model holds the engine's quantized storage (quantize='int8'/'fp8'/'w8a8'), "
            "which no checkpoint reader loads; save it loaded without quantize= (or with fp8=True, "
            "DeepSeek's FP8 format) and quantize when loading it"
        )
    # packed weights are no state_dict entries: the files lacked them, and no load took them
    if is_packed(model):
        raise ValueError(
            "save_model: an Engine packed this model's large weights into oneDNN's layout (pack_weights=True), "
            "which a checkpoint cannot hold; save it before building that Engine, or save a model loaded again"
        )
    if ignored := transformers_differences(model.config):
        warnings.warn(
            f"transformers loads this checkpoint but ignores {'; '.join(ignored)}: its logits will not "
            "be this model's (nanoseek.load_model reads it as saved)",
            stacklevel=2,
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    fp8 = any(k.endswith("_scale_inv") for k in state)
    quantization = model.config.extra.get("quantization_config", QUANTIZATION_CONFIG)
    if fp8:  # FP8Linear storage: written whole in DeepSeek's FP8 layout, the routed experts block-quantized
        # (with the checkpoint's own kind of scale: UE8M0 experts, dequantized on load, requantize exactly)
        state = quantize_state_dict_fp8(state, pow2=ue8m0_scales(quantization))
    if dtype is not None:  # the higher-precision tensors; FP8 weights and their fp32 scales stay
        dtype = resolve_dtype(dtype, model.config, model.device)
        state = {k: _cast(k, v, dtype) for k, v in state.items()}
    # Shared tensors (tied or MTP copies) must be separate storages for safetensors.
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
    config = model.config.replace(torch_dtype=str(dtype or model.dtype).removeprefix("torch."))
    # Loaded from an FP8 checkpoint but written in higher precision: the files are no longer quantized,
    # and transformers would read them as FP8 (expecting weight_scale_inv). Written in FP8 (perhaps from
    # a higher-precision checkpoint): without the entry, readers would take the FP8 values unscaled.
    extra = {k: v for k, v in config.extra.items() if k != "quantization_config"}
    if fp8:
        extra["quantization_config"] = quantization
    config = config.replace(extra=extra)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    if len(shards) == 1:
        names = ["model.safetensors"]
    # Every file written and on disk (fsynced: a file system may report a full disk or a failed write only
    # there) before any replaces its namesake: a sharded checkpoint saved here before with as many shards
    # has the same names, and an error at shard 2 (its write or its fsync), at the index or at config.json
    # left new files beside old ones: one model of two checkpoints that loaded without a word, or
    # neither model loadable. The stack then replaces them in turn: the shards, the index, config.json.
    index_file = out / "model.safetensors.index.json"
    with contextlib.ExitStack() as written:
        config_tmp = written.enter_context(atomic_file(out / "config.json"))
        index_tmp = written.enter_context(atomic_file(index_file)) if len(shards) > 1 else None
        for name, shard in zip(names, shards, strict=True):
            tmp = written.enter_context(atomic_file(out / name))
            save_file(shard, str(tmp), metadata={"format": "pt"})
            fsync(tmp)
        if index_tmp is not None:
            weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            index_tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
            fsync(index_tmp)
        config_tmp.write_text(config.to_json(), encoding="utf-8")
        fsync(config_tmp)
    # A checkpoint saved here before goes only now (the old index before its shards: a reader meanwhile
    # reads the old checkpoint or the new one).
    stale = [*([index_file] if len(shards) == 1 else []), *out.glob("model*.safetensors")]
    for old in stale:
        if old.name not in names:
            old.unlink(missing_ok=True)
    return out


def _weight_files(d: Path) -> dict[str, Path]:
    """Which file holds each tensor of checkpoint directory `d` (from its index, or the files' own
    headers), with one clear error for a missing shard or a file that is not whole."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} is not a safetensors index (no weight_map of tensor -> file name)")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (d / f).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{index} names {len(absent)} shard(s) that {d} does not hold: {', '.join(absent[:3])}"
                f"{'...' if len(absent) > 3 else ''}. The download or copy is incomplete; fetch the "
                "missing files again"
            )
    elif (d / "model.safetensors").exists():
        files, weight_map = ["model.safetensors"], None
    else:
        files, weight_map = sorted(p.name for p in d.glob("*.safetensors")), None
        if not files:
            pickles = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
            # the Hub's cache (HUB_CACHE/models--owner--name/snapshots/REV) offline: a download cut short,
            # or `inspect`'s config.json alone; a repo id never holds "--", so the name reads back whole
            cached = d.resolve().parent
            if cached.name == "snapshots" and cached.parent.name.startswith("models--"):
                repo = "/".join(cached.parent.name.split("--")[1:])
                hint += (
                    f": the Hugging Face Hub's cached snapshot of {repo} is incomplete (a download that did "
                    f"not finish, or config.json alone); on a machine with a network, `hf download {repo}`"
                )
            raise FileNotFoundError(f"no safetensors weights in {d}{hint}")
    where: dict[str, Path] = {}  # file by file, each in its own (sorted) order: the same on every rank
    for name in files:
        with _open_safetensors(d / name) as f:
            held = list(f.keys())
        if weight_map is not None:
            lost = {k for k, v in weight_map.items() if v == name} - set(held)
            if lost:
                raise ValueError(
                    f"{d / name} lacks {len(lost)} tensor(s) that {index.name} says it holds "
                    f"({min(lost)}, ...): the file does not belong to this checkpoint"
                )
            held = [k for k in held if weight_map.get(k) == name]
        where.update(dict.fromkeys(held, d / name))
    return where


def _open_safetensors(path: Path) -> Any:
    """safe_open, with a damaged file (most often truncated by an interrupted download or copy)
    reported by name and size rather than as safetensors' own header error."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}; {path.stat().st_size} bytes on disk): it "
            "is truncated or damaged, most likely by an interrupted download or copy; fetch it again"
        ) from None
    except OSError as e:
        if e.filename is not None:
            raise
        # safetensors' own OSError names no file: a directory in the file's place read as "No such device"
        why = "it is a directory" if path.is_dir() else e.strerror or str(e)
        raise ValueError(f"{path} is not a readable safetensors file: {why}") from None


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of `state`'s floating tensors that hold NaN or inf. Left out: FP8 values (one byte, no
    min/max kernel; their fp32 scales are checked), tensors on the meta device (no values yet), empty
    ones, and sharded ones (DTensor: each rank holds a part)."""
    named = [
        (k, t)
        for k, t in state.items()
        if t.is_floating_point()
        and t.element_size() > 1
        and t.numel()
        and not t.is_meta
        and not hasattr(t, "full_tensor")
    ]
    if not named:
        return []
    device = named[0][1].device
    # min and max carry a NaN through and show an inf, in one pass with no tensor of flags as large
    # as the weight (`isfinite().all()` made one: 40x slower on a bf16 LM head); one sync for them all
    ok = torch.stack([torch.stack(torch.aminmax(t)).isfinite().all().to(device) for _, t in named]).tolist()
    return [k for (k, _), good in zip(named, ok, strict=True) if not good]


def _check_stored_dtype(key: str, code: str, path: Path) -> None:
    """Every weight is stored in a floating-point dtype (FP8 too): an integer or bool one is a damaged
    or hand-edited header, whose bytes would load as other numbers (or fail deep inside torch)."""
    if code not in _STORED and not code.startswith("F8"):
        raise ValueError(
            f"{key} in {path} is stored as {code}, not a floating-point dtype: the file's header is "
            "damaged or was edited; fetch or write the checkpoint again"
        )


class _ShardReader:
    """Tensors by key from a checkpoint's files, one at a time.

    safe_open's tensors are views of the file's memory map, whose pages stay resident (and count in
    the process's RSS) until the file is closed, so each file is reopened after `remap_bytes` read:
    at most that much of the files is resident besides the weights already copied out."""

    def __init__(self, where: Mapping[str, Path], remap_bytes: int = 256 * 1024**2) -> None:
        self.where, self.remap_bytes = where, remap_bytes
        self._path: Path | None = None
        self._file: Any = None
        self._read = 0

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def stored_dtype(self, key: str) -> str:
        """The file's dtype code of tensor `key` ("BF16", "F32", "F8_E4M3", ...)."""
        return self._handle(key).get_slice(key).get_dtype()

    def is_fp8(self, key: str) -> bool:
        return self.stored_dtype(key).startswith("F8")

    def get(self, key: str) -> torch.Tensor:
        t = self._handle(key).get_tensor(key)
        self._read += t.numel() * t.element_size()
        return t

    def _handle(self, key: str) -> Any:
        path = self.where[key]
        if path != self._path or self._read > self.remap_bytes:
            self.close()
            self._file = _open_safetensors(path).__enter__()
            self._path, self._read = path, 0
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
        self._path = self._file = None


def read_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index), as views of the
    files' memory maps (`load_model` streams them instead)."""
    by_file: dict[Path, list[str]] = {}
    for key, path in _weight_files(Path(directory)).items():
        by_file.setdefault(path, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with _open_safetensors(path) as f:
            for k in keys:
                _check_stored_dtype(k, f.get_slice(k).get_dtype(), path)
                tensors[k] = f.get_tensor(k)
    return tensors


# ------------------------------------------------------------------ hub names
# config, weights, tokenizer and its chat template (recent transformers versions save it in
# chat_template.jinja): all a load reads
HUB_FILES = ("*.json", "*.safetensors", "tokenizer*", "chat_template.jinja")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_name(name_or_path: str | os.PathLike) -> bool:
    """Whether `resolve_checkpoint` reads `name_or_path` as a Hugging Face Hub name (owner/name): no
    such local path (nor a checkpoint a crash mid-save left aside: `runs/pretrain` has a Hub name's
    shape), and the shape of one."""
    local = directory_to_read(Path(name_or_path).expanduser())
    return not local.exists() and bool(_HUB_NAME.fullmatch(str(name_or_path)))


# `nanoseek export`'s output given where a checkpoint goes (generate, chat, serve, eval, --init, inspect, cost)
GGUF_FILE = (
    "a GGUF file, for llama.cpp and ollama: nanoseek loads HF-layout checkpoint directories (config.json)"
)


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"  # the format's magic
    except OSError:  # a directory, missing, unreadable: not a GGUF file that can be named as one
        return False


def resolve_checkpoint(name_or_path: str | os.PathLike, tokenizer: bool = False, flag: str = "") -> Path:
    """A checkpoint directory: `name_or_path` itself when it is a local path, else a Hugging Face Hub
    name (`deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B`) fetched with `huggingface_hub.snapshot_download`
    into its cache (its progress bars; only the files a load reads). `tokenizer=True` also requires
    tokenizer.json; `flag` ("--init") prefixes the error messages."""
    p = Path(name_or_path).expanduser()
    label = f"{flag} {name_or_path}" if flag else str(name_or_path)
    if is_hub_name(name_or_path):
        p = _download(str(name_or_path), label)
        label += f" (the Hub's cached snapshot {p})"  # what is missing is missing there
    else:
        p = directory_to_read(p)  # a crash mid-save left the last checkpoint aside
    if not p.is_dir():
        if _is_gguf(p):
            raise FileNotFoundError(
                f"{label} is {GGUF_FILE}: give the checkpoint directory it was exported from"
            )
        raise FileNotFoundError(
            f"{label} is not a checkpoint directory (no config.json): "
            + ("it is a file" if p.exists() else "no such directory, nor a Hub name (owner/name)")
        )
    if not (p / "config.json").exists():
        shadows = _HUB_NAME.fullmatch(str(name_or_path)) and not is_hub_name(name_or_path)
        # a run directory: name the stages' checkpoints inside it (RUN/pretrain, RUN/final), the ones to pass
        try:
            inside = sorted(str(x) for x in p.iterdir() if (x / "config.json").is_file())
        except OSError:  # a directory it may not list: the error below stands alone
            inside = []
        raise FileNotFoundError(
            f"{label} is not a checkpoint directory (no config.json)"
            + (f"; the checkpoints inside it: {', '.join(inside)}" if inside else "")
            + ("; a local directory is read before the Hub model of that name" if shadows else "")
        )
    if (p / ".metadata").is_file() and not any(p.glob("*.safetensors")):
        # `nanoseek.train.dcp.save_dcp`'s shards (and its config.json): said as such, not as a
        # checkpoint without its tokenizer or weights
        raise FileNotFoundError(
            f"{label} is a torch.distributed.checkpoint (DCP) directory: write its HF-layout copy with "
            f"nanoseek.train.dcp.export_hf({str(p)!r}, OUT) and use OUT (docs/multinode.md)"
        )
    if tokenizer and not (p / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{label} has no tokenizer.json: this command needs the checkpoint's tokenizer"
        )
    return p


def _download(repo_id: str, label: str, patterns: tuple[str, ...] = HUB_FILES) -> Path:
    # the error classes from huggingface_hub.utils: 0.24 (the declared minimum) has no huggingface_hub.errors
    # versions of them, and later releases still export them there
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from nanoseek.options import shell_quoted

    # only the files this caller reads: inspect's config.json alone, not DeepSeek-V3's 700 GB of weights
    include = "" if patterns == HUB_FILES else "".join(f" --include {shell_quoted(p)}" for p in patterns)
    local = "pass a local checkpoint directory instead (on a machine with a network: `hf download "
    local += f"{repo_id}{include} --local-dir DIR`, then copy DIR here)"
    unreachable = _hub_unreachable(repo_id)
    offline = unreachable or "offline (no network, the Hub unreachable, or HF_HUB_OFFLINE set)"
    token = "a token with access to it in HF_TOKEN (or `hf auth login`)"
    try:
        # the Hub unreachable: the cache alone, as snapshot_download reads it offline
        cached = {"local_files_only": True} if unreachable else {}
        # (mypy checks an unpacked dict's values against every parameter: a bool might be dry_run's)
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), **cached))  # type: ignore[call-overload]
    except LocalEntryNotFoundError as e:
        # Raised offline (HF_HUB_OFFLINE, no network, the Hub unreachable) when the cache lacks it, or
        # (a recent huggingface_hub's IncompleteSnapshotError, with its path) holds only part of it.
        partial = getattr(e, "snapshot_path", None)
        where = (
            f"its cached snapshot {partial} is incomplete (a download that did not finish)"
            if partial
            else f"not in the Hub's cache {constants.HF_HUB_CACHE} (HF_HUB_CACHE, or HF_HOME/hub)"
        )
        raise FileNotFoundError(
            f"{label} is not a local directory and cannot be downloaded from the Hugging Face Hub: "
            f"{offline} and {where}; {local}"
        ) from None
    except GatedRepoError:  # a RepositoryNotFoundError too, but the model is there: its access is not
        raise FileNotFoundError(
            f"{label} is a gated model on the Hugging Face Hub: accept its terms on "
            f"{constants.ENDPOINT}/{repo_id} and give {token}"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{label} is not a local directory, nor a model on the Hugging Face Hub (or it is private: "
            f"give {token})"
        ) from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(
            f"{label}: downloading from the Hugging Face Hub failed ({e}); {local}"
        ) from None
    except HFValidationError as e:
        # `ckpt/run--2` (a local directory not there) has a Hub name's shape, but is no name the Hub takes
        raise FileNotFoundError(f"{label} is not a local directory, nor a Hub name ({e})") from None


def _hub_unreachable(repo_id: str) -> str:
    """Why the Hub did not answer a question about `repo_id` within huggingface_hub's metadata timeout
    (HF_HUB_ETAG_TIMEOUT), or "" where it answered (an HTTP error is an answer) or HF_HUB_OFFLINE is set.
    snapshot_download asks it with no time limit: a proxy or firewall that takes the connection and
    never answers would hang a load, a cached model's too, where a refused one fails at once."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError

    if constants.HF_HUB_OFFLINE:
        return ""
    try:
        HfApi().repo_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (HfHubHTTPError, HFValidationError):
        return ""  # snapshot_download asks again and says what the Hub answered
    except Exception as e:  # the transport's own errors (requests' or httpx's, by version)
        reason = str(e).splitlines()[0] if str(e) else ""
        return f"offline (the Hub unreachable: {type(e).__name__}{': ' + reason if reason else ''})"
    return ""


# --------------------------------------------------------------- loading
def resolve_dtype(dtype: torch.dtype | str, config: ModelConfig, device: str | torch.device) -> torch.dtype:
    """`dtype`, a torch dtype or its name; "auto" is the checkpoint's own (config.json's torch_dtype),
    as transformers' torch_dtype="auto" reads it, where it runs fast: a 16-bit checkpoint runs in bf16
    on a CPU that multiplies bf16 natively and in fp32 on one that does not (AVX2: PyTorch's bf16
    matmuls ~20x slower than fp32), an fp32 one in fp32; on a CUDA GPU, bf16 (the grouped expert GEMM's
    fast kernel is bf16), or fp16 on one without bf16 units (T4, V100: emulated bf16), as vLLM falls
    back; on an Apple GPU (mps), fp32."""
    if dtype == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return (
                torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
            )
        from nanoseek.perf import cpu_has_bf16

        sixteen = config.torch_dtype in ("bfloat16", "float16")
        return torch.bfloat16 if sixteen and kind == "cpu" and cpu_has_bf16() else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    # 8-bit storage is a quantization (fp8=True, quantize=...), not a dtype the model computes in
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point or resolved.itemsize < 2:
        raise ValueError(
            f"dtype {dtype!r}: use auto, float32, bfloat16 or float16 "
            "(8-bit weights: fp8=True or quantize='int8'/'fp8'/'w8a8')"
        )
    return resolved


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, with a ValueError where torch cannot parse it or run on it here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ValueError(f"device {device!r} is not available (this machine has {count} CUDA devices)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available on this machine")
    return resolved


def load_model(
    path_or_preset: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    fp8: bool = False,
    act_quant: bool = False,
    quantize: str | None = None,
) -> DeepSeekV3:
    """A checkpoint directory in HF layout, a Hugging Face Hub name (see `resolve_checkpoint`), or a
    preset name (random weights from `seed`).

    The files are streamed tensor by tensor into a model built on the meta device: each weight is
    materialised once, in its final dtype and storage, so memory peaks near the weights' own size.
    fp8=True keeps the linear layers in FP8 (`FP8Linear`, for inference; `act_quant` also quantizes
    their inputs): DeepSeek's FP8 weights are taken as they are (no dequantize/requantize round
    trip), higher-precision ones block-quantized. The embedding, head, norms, router and routed
    experts (stacked for grouped compute) load in `dtype`, dequantized where the file holds FP8.
    quantize="int8"|"fp8"|"w8a8" gives the engine's quantized storage (`nanoseek.engine.quantize`), each
    weight quantized from `dtype` as it arrives, as `Engine(quantize=...)` would after loading.
    dtype="auto" picks by the checkpoint and the machine (`resolve_dtype`); serve, generate, chat and
    eval default to it.
    """
    if fp8 and quantize:
        raise ValueError(f"fp8=True and quantize={quantize!r} are two weight storages: choose one")
    device = resolve_device(device)
    if quantize:
        from nanoseek.engine.quantize import check_quantize_device

        check_quantize_device(quantize, device)
    local = directory_to_read(Path(path_or_preset).expanduser())  # `~` as resolve_checkpoint reads it
    if not local.exists() and not _HUB_NAME.fullmatch(str(path_or_preset)):
        # A preset (no preset name has a slash); resolve_config names the choices for anything else. Read
        # as `local`: `~/x` is no checkpoint, even beside a directory named `~` (random weights from its config)
        config = resolve_config(local)
        dtype = resolve_dtype(dtype, config, device)
        model = build_model(config, device=device, dtype=dtype).init_weights(seed)
        if fp8:
            quantize_linears_fp8(model, act_quant=act_quant)
        if quantize:
            from nanoseek.engine.quantize import quantize_model

            quantize_model(model, quantize)
        return model
    # Files are opened by name as the stream reaches them (each shard, and a file again past
    # remap_bytes): a checkpoint replaced meanwhile (a run saving its next one, `atomic_directory`)
    # would give a model of two checkpoints. A load that saw the files change is started again, from
    # the path: one that found the old checkpoint aside mid-swap finds the new one in its place.
    for _ in range(_LOAD_TRIES):
        p = resolve_checkpoint(path_or_preset)
        before = _files_identity(p)
        try:
            config = resolve_config(p)
            where = _weight_files(p)
            # here, not in `_stream`, whose torch.no_grad wrapper is one more frame: the warning named
            # this module's line instead of the caller's
            config = held_config(p, config, where, stacklevel=3)
            reader = _ShardReader(where)
            if dtype == "auto" and not _names_dtype(p):  # "auto" is then the dtype the weights are in
                config = dataclasses.replace(config, torch_dtype=_stored_dtype(where, reader))
            resolved = resolve_dtype(dtype, config, device)
            try:
                model = _stream(p, config, where, reader, resolved, device, fp8, act_quant, quantize)
            finally:
                reader.close()
        except Exception:
            if _files_identity(p) == before:
                raise
            continue
        if _files_identity(p) == before:
            return model
    raise ValueError(
        f"{p} was replaced {_LOAD_TRIES} times while it loaded (a run saving into it?): load it again, "
        "or load a copy"
    )


_LOAD_TRIES = 3
_STORED = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _names_dtype(d: Path) -> bool:
    """Does `d`'s config.json say what dtype its weights are in (torch_dtype, or transformers 5's dtype)?"""
    try:
        raw = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return True  # a preset or an unreadable file: resolve_config has said what it holds
    return bool(raw.get("torch_dtype") or raw.get("dtype"))


def _stored_dtype(where: Mapping[str, Path], reader: _ShardReader) -> str:
    """The dtype the checkpoint's weights are stored in (the embedding's, else the first tensor's)."""
    key = "model.embed_tokens.weight" if "model.embed_tokens.weight" in where else next(iter(where))
    return _STORED.get(reader.stored_dtype(key), "bfloat16")


def exact_dtype(directory: str | os.PathLike) -> torch.dtype:
    """The narrowest dtype that holds every weight of checkpoint `directory` exactly, from the files'
    headers: the 16-bit dtype they are all stored in (the balancing bias aside: it loads in fp32 in any
    dtype), else fp32 (mixed dtypes, fp32 weights, or FP8 ones with their scales)."""
    where = _weight_files(Path(directory))
    reader = _ShardReader(where)
    try:
        codes = {reader.stored_dtype(k) for k in where if "e_score_correction_bias" not in k}
    finally:
        reader.close()
    name = _STORED.get(codes.pop()) if len(codes) == 1 else None
    return getattr(torch, name) if name in ("bfloat16", "float16") else torch.float32


def _files_identity(d: Path) -> tuple[Any, ...] | None:
    """What changes when checkpoint directory `d` or one of the files a load reads is replaced (None
    while `d` is absent: between `atomic_directory`'s two renames)."""
    try:
        with os.scandir(d) as entries:
            files = [
                (e.name, e.inode(), e.stat().st_mtime_ns, e.stat().st_size)
                for e in entries
                if e.name == "config.json" or e.name.endswith((".safetensors", ".safetensors.index.json"))
            ]
        return (os.stat(d).st_ino, *sorted(files))
    except FileNotFoundError:
        return None


def held_config(p: Path, config: ModelConfig, keys: Iterable[str], stacklevel: int = 2) -> ModelConfig:
    """`config` as the checkpoint's tensors (`keys`) hold it: without the MTP layers it asks for when
    the files have none. transformers' DeepseekV3Config defaults to one MTP layer but its
    save_pretrained writes none: the main model is whole, and only speculative decoding needs them.
    A config.json asking for layers past every one the files hold (a typo: `num_hidden_layers: 1000000`)
    is refused here, from the keys alone: building that model first, for the key check, took minutes."""
    n = config.num_hidden_layers
    keys = list(keys)
    layers = [m for m in map(_LAYER_KEY.match, keys) if m]
    held = 1 + max((int(m.group(1)) for m in layers), default=-1)
    if n and keys and not any(k.startswith("model.") for k in keys):
        # no key in the layout at all (a wrapper's `_orig_mod.` or `module.` prefix, an adapter's
        # `base_model.model.`): the names are the fault, which "config.json from another model" hid
        raise ValueError(
            f"the weights in {p} name no tensor model.* (as {min(keys)!r}): not weights in Hugging "
            "Face's layout, such as a wrapper's prefixed names or an adapter's"
        )
    if n > held:
        raise ValueError(
            f"{p / 'config.json'} says num_hidden_layers={n} but the weights in {p} hold "
            f"{'no layers' if not held else f'layers 0..{held - 1}'}: a config.json from another model, "
            "or an edited one"
        )
    if not config.num_nextn_predict_layers:
        return config
    if any(int(m.group(1)) >= n and m.group(2) not in _MTP_SHARED for m in layers):
        return config
    warnings.warn(  # the default filter says it once per place
        f"{p}: config.json asks for {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
        "holds no MTP weights (transformers writes none); loading without the MTP module, so "
        "speculative decoding is off for this model",
        stacklevel=stacklevel,
    )
    return config.replace(num_nextn_predict_layers=0)


def accounting_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """The config `inspect` and `cost` count: a checkpoint directory's as its weights hold it (no MTP
    module counted that the files lack), a Hub model's config.json alone (no weights fetched: DeepSeek-V3's
    are 700 GB), else a preset's or a config.json file's."""
    local = directory_to_read(Path(name_or_path).expanduser())
    if local.is_dir() and (local / "config.json").exists():  # (else a preset's name, as resolve_config)
        return checkpoint_config(local)
    if local.is_file() and local.suffix.lower() != ".json":
        # a GGUF export or a weights file, read as a config.json, said "not valid JSON: 'utf-8' codec
        # can't decode byte ..."; a config.json under another name (it starts with "{") is read
        with local.open("rb") as f:
            head = f.read(64)
        if not head.lstrip().startswith(b"{"):
            kind = GGUF_FILE if _is_gguf(local) else "not a config.json"
            raise ValueError(
                f"{name_or_path} is {kind}: give the checkpoint directory it came from (the one with "
                "config.json), a config.json, a preset or a Hub name"
            )
    if is_hub_name(name_or_path):
        return ModelConfig.load(_download(str(name_or_path), str(name_or_path), ("config.json",)))
    return resolve_config(name_or_path)


def checkpoint_config(directory: str | os.PathLike) -> ModelConfig:
    """A checkpoint directory's config as its weights hold it (`held_config`); config.json alone
    where the directory has no weights."""
    p = Path(directory)
    config = ModelConfig.load(p)
    try:
        keys = _weight_files(p)
    except FileNotFoundError:
        return config
    return held_config(p, config, keys, stacklevel=3)


@torch.no_grad()
def _stream(
    p: Path,
    config: ModelConfig,
    where: Mapping[str, Path],
    reader: _ShardReader,
    dtype: torch.dtype,
    device: torch.device,
    fp8: bool,
    act_quant: bool,
    quantize: str | None,
) -> DeepSeekV3:
    model = build_model(config, device="meta").to(dtype)
    # Buffers are small and none but the balancing bias is in the files: make them real now, so that
    # reset_buffers computes RoPE tables and zeroes router state, before the bias is streamed over.
    for owner in model.modules():
        for buf_name, buf in list(owner.named_buffers(recurse=False)):
            owner._buffers[buf_name] = torch.empty_like(buf, device=device)
    model.reset_buffers()
    quantization = config.extra.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if quantization and method != "fp8":
        # GPTQ, AWQ, bitsandbytes: packed integer tensors (qweight, qzeros), which the dtype check below
        # called a damaged header to fetch again
        raise ValueError(
            f"{p / 'config.json'}: quantization_config's quant_method {method!r} is not read here: nanoseek "
            "loads DeepSeek's FP8 checkpoints (quant_method fp8) and 16/32-bit ones; load such a one and "
            "quantize it as it loads (load_model(..., quantize='int8'), --quantize)"
        )
    pow2 = ue8m0_scales(quantization)
    if fp8:  # FP8Linear placeholders on the meta device; the stream fills them (inputs quantized with
        # the kind of scale the checkpoint's weights have, as DeepSeek's inference code does)
        quantize_linears_fp8(model, act_quant=act_quant, pow2=pow2)
    fp8_modules = {name for name, m in model.named_modules() if isinstance(m, FP8Linear)}

    # The one key check, on shapes from the files' headers, before any data is read.
    shapes: dict[str, tuple[int, ...]] = {}
    files: dict[str, Path] = {}
    experts: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    for key, path in where.items():
        shape = reader.shape(key)
        name = _model_name(key, config, shape)
        if name is None:
            continue
        _check_stored_dtype(key, reader.stored_dtype(key), path)
        if reader.is_fp8(key):
            if key + "_scale_inv" not in where:
                raise ValueError(f"FP8 tensor {key} in {path} has no weight_scale_inv beside it")
            _check_block_scales(key, shape, reader.shape(key + "_scale_inv"))
        module = name.removesuffix(".weight")
        if module in fp8_modules:  # the file's scales (checked above), or those its quantization makes
            shapes[f"{module}.weight_scale_inv"] = _block_shape(shape)
        if em := _EXPERT_KEY.match(name):
            experts.setdefault(em.group(1), {}).setdefault(int(em.group(2)), {})[em.group(3)] = shape
            files[f"{em.group(1)}.{'down_proj' if em.group(3) == 'down_proj' else 'gate_up_proj'}"] = path
        else:
            shapes[name], files[name] = shape, path
    for prefix, per_expert in experts.items():
        _check_experts(prefix, per_expert, f" in {p}")
        count = len(per_expert)
        rows, cols = per_expert[0]["gate_proj"]
        shapes[f"{prefix}.gate_up_proj"] = (count, 2 * rows, cols)
        shapes[f"{prefix}.down_proj"] = (count, *per_expert[0]["down_proj"])
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    check_keys(model, meta, f"checkpoint {p}", files)

    if quantize:  # the engine's storage, as meta placeholders; the stream quantizes into them
        from nanoseek.engine.quantize import quantize_model

        quantize_model(model, quantize, device=device)  # the placeholders are on meta, not `device`
    for key in where:
        name = _model_name(key, config, reader.shape(key))
        if name is None or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        value = reader.get(key).to(device)
        scale = reader.get(key + "_scale_inv").to(device) if key + "_scale_inv" in where else None
        if broken := non_finite(
            {key: value, f"{key}_scale_inv": scale} if scale is not None else {key: value}
        ):
            # a diverged run's weights: every output that uses one is NaN, and generation wrote garbage
            # (argmax of NaN logits) without a word
            raise ValueError(
                f"{where[key]}: {broken[0]} holds NaN or inf values: a model loaded from it computes NaN "
                "(the run that wrote it diverged?); load a checkpoint saved before that"
            )
        for k, v in _convert(key, name, value, scale, dtype, fp8_modules, pow2).items():
            _place(model, k, v, (value, scale))
    model.tie_weights()
    return model


def _place(model: nn.Module, name: str, value: torch.Tensor, read: tuple[torch.Tensor | None, ...]) -> None:
    """Put one converted tensor into the model: a routed expert's into its slice of the stacked
    weights (allocated at the first expert), a weight of an engine-quantized layer quantized."""
    from nanoseek.engine.quantize import QuantLinear, QuantRoutedExperts, quantize_tensor

    if em := _EXPERT_KEY.match(name):
        experts = model.get_submodule(em.group(1))
        j, part = int(em.group(2)), em.group(3)
        rows = slice(0, value.shape[0]) if part == "gate_proj" else slice(value.shape[0], None)
        if part == "down_proj":
            rows = slice(None)
        if isinstance(experts, QuantRoutedExperts):
            q, s = quantize_tensor(value, experts.fmt)
            qn, sn = ("q_down", "s_down") if part == "down_proj" else ("q_gate_up", "s_gate_up")
            _fill(experts, qn, j, rows, q)
            _fill(experts, sn, j, rows, s)
        else:
            _fill(experts, "down_proj" if part == "down_proj" else "gate_up_proj", j, rows, value)
        return
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, QuantLinear) and leaf == "weight":
        q, s = quantize_tensor(value, module.fmt)
        module.qweight, module.scale = q, s.to(module.compute_dtype)
        return
    if any(
        r is not None and value.untyped_storage().data_ptr() == r.untyped_storage().data_ptr() for r in read
    ):
        value = value.clone()  # memory of its own, not a view of the file's map
    old = module._parameters.get(leaf)
    if old is not None:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def _fill(module: nn.Module, attr: str, j: int, rows: slice, value: torch.Tensor) -> None:
    """Copy one expert's tensor into `module.attr[j, rows]`, materialising the stack at the first."""
    stack = getattr(module, attr)
    if stack.is_meta:
        dtype = value.dtype if attr.startswith("q_") else stack.dtype
        real = torch.empty(stack.shape, dtype=dtype, device=value.device)
        if isinstance(stack, nn.Parameter):
            module._parameters[attr] = nn.Parameter(real, requires_grad=stack.requires_grad)
        else:
            module._buffers[attr] = real
        stack = real
    stack[j, rows] = value


# ----------------------------------------------------------- train state
def save_train_state(
    directory: str | os.PathLike, optimizer: dict[str, Any], trainer: dict[str, Any], meta: dict[str, Any]
) -> None:
    """DIR/train_state/: optimizer state and the trainer's (step, RNG, data position), as tensors and
    plain values (loadable with weights_only=True), and `meta` as readable JSON."""
    ts = Path(directory) / TRAIN_STATE
    ts.mkdir(parents=True, exist_ok=True)
    for name, state in (("optimizer.pt", optimizer), ("trainer.pt", trainer)):
        with atomic_file(ts / name) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as e:
                # torch's writer reports a failed write (a full disk) as "unexpected pos" (or, given a
                # path, "iostream error"); the OSError it met says what happened
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
    # a Python caller's settings may hold paths (`data=Path(...)`): their text, not a TypeError after
    # the whole run had trained
    atomic_write(ts / "trainer.json", json.dumps(meta, indent=2, default=os.fspath) + "\n")


def load_train_state(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(optimizer state, trainer state) from DIR/train_state/, or None when there is none (no
    checkpoint yet). A checkpoint whose train state is missing, incomplete or damaged is refused: read
    as none, the resumed run started over and replaced it at its first save."""
    restore_directory(directory)  # a crash mid-swap left the last checkpoint aside
    ts = Path(directory) / TRAIN_STATE
    again = "run without --resume to train from the start (replacing it), or choose another --out"
    if not ts.exists():
        if (Path(directory) / "config.json").exists():
            raise ValueError(f"cannot resume {directory}: it holds weights but no {TRAIN_STATE}/; {again}")
        return None
    files = [ts / n for n in ("optimizer.pt", "trainer.pt")]
    if absent := [f.name for f in files if not f.is_file()]:
        raise ValueError(f"cannot resume {directory}: {ts} lacks {', '.join(absent)}; {again}")
    loaded = []
    for f in files:
        try:
            loaded.append(torch.load(f, map_location="cpu", weights_only=True))
        except (RuntimeError, EOFError, pickle.UnpicklingError, struct.error) as e:
            # torch's reader of a truncated file: "PytorchStreamReader failed reading zip archive..."
            # (an empty one: a bare EOFError; one not a zip: the legacy reader's struct.error)
            why = " ".join(filter(None, [str(e).split(". ")[0], f"({f.stat().st_size} bytes on disk)"]))
            raise ValueError(
                f"cannot resume {directory}: {f} is truncated or damaged: {why}; {again}"
            ) from None
    return tuple(loaded)
