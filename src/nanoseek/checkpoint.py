"""Checkpoints in Hugging Face's layout: safetensors only, DeepSeek's key names, atomic writes.

A checkpoint directory holds config.json, model.safetensors (or shards + model.safetensors.index.json),
and whatever the stage adds (tokenizer files, generation_config.json, train_state/). The only
renaming between nanoseek and the files is for routed experts: the files keep DeepSeek's per-expert
`experts.{j}.{gate,up,down}_proj.weight`, nanoseek stacks them for grouped compute; the MTP modules
live at index num_hidden_layers + depth, with copies of the shared embedding and head as DeepSeek
ships them. DeepSeek's FP8 checkpoints (float8_e4m3fn + `weight_scale_inv` per 128x128 block) are
dequantized on load. No pickle is ever loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig, resolve_config
from nanoseek.model.transformer import DeepSeekV3

FP8_BLOCK = 128
_EXPERT_KEY = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


# ------------------------------------------------------------------ atomic
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch directory that replaces `path` only once the block finishes without error.

    A crash or kill mid-write leaves the previous `path` as it was (plus a stray scratch dir that the
    next write removes).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


# ------------------------------------------------------------- conversion
def to_hf_state_dict(model: DeepSeekV3, include_mtp: bool = True) -> dict[str, torch.Tensor]:
    """nanoseek parameter names -> DeepSeek/HF checkpoint keys (per-expert weights, MTP at index n)."""
    cfg = model.config
    n = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        if key.startswith("model.mtp_layers."):
            if not include_mtp:
                continue
            depth, rest = key[len("model.mtp_layers.") :].split(".", 1)
            key = f"model.layers.{n + int(depth)}.{rest}"
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            inter = value.shape[1] // 2
            for j in range(value.shape[0]):
                out[f"{prefix}.{j}.gate_proj.weight"] = value[j, :inter]
                out[f"{prefix}.{j}.up_proj.weight"] = value[j, inter:]
            continue
        if key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for j in range(value.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight"] = value[j]
            continue
        out[key] = value
    if include_mtp:
        # DeepSeek's files carry the shared embedding and head in each MTP layer too.
        for d in range(len(model.model.mtp_layers)):
            out[f"model.layers.{n + d}.embed_tokens.weight"] = model.model.embed_tokens.weight
            out[f"model.layers.{n + d}.shared_head.head.weight"] = model.lm_head.weight
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(
    tensors: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """DeepSeek/HF checkpoint keys -> nanoseek parameter names; dequantizes FP8 blocks."""
    n = config.num_hidden_layers
    n_mtp = config.num_nextn_predict_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = tensors.get(
                key + "_scale_inv", tensors.get(key.removesuffix(".weight") + ".weight_scale_inv")
            )
            if scale is None:
                raise ValueError(f"FP8 tensor {key} has no weight_scale_inv beside it")
            value = dequantize_fp8_blocks(value, scale)
        m = _LAYER_KEY.match(key)
        if m and int(m.group(1)) >= n:
            depth = int(m.group(1)) - n
            rest = m.group(2)
            if depth >= n_mtp or rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # MTP layers this config does not use; shared tensors live in the main model
            key = f"model.mtp_layers.{depth}.{rest}"
        em = _EXPERT_KEY.match(key) or re.match(
            r"^(model\.mtp_layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key
        )
        if em:
            experts.setdefault(em.group(1), {}).setdefault(int(em.group(2)), {})[em.group(3)] = value
            continue
        out[key] = (
            value.to(dtype) if value.is_floating_point() and "e_score_correction_bias" not in key else value
        )
    for prefix, per_expert in experts.items():
        count = len(per_expert)
        if sorted(per_expert) != list(range(count)):
            raise ValueError(f"{prefix}: expert indices are not 0..{count - 1}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((per_expert[j]["gate_proj"], per_expert[j]["up_proj"]), dim=0) for j in range(count)]
        ).to(dtype)
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[j]["down_proj"] for j in range(count)]).to(dtype)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK
) -> torch.Tensor:
    """W = W_fp8 · s for each block x block tile (DeepSeek-V3's `weight_dequant`), in fp32."""
    rows, cols = weight.shape
    s = scale_inv.float().repeat_interleave(block, dim=0)[:rows].repeat_interleave(block, dim=1)[:, :cols]
    return weight.float() * s


# -------------------------------------------------------------- save/load
def save_model(
    model: DeepSeekV3,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write config.json and safetensors (sharded past max_shard_bytes) into `directory`.

    Each file is written under a temporary name and renamed, so readers never see a half file. To
    replace a whole checkpoint atomically, write into `atomic_directory(...)`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    if dtype is not None:
        state = {
            k: v.to(dtype) if v.is_floating_point() and "e_score_correction_bias" not in k else v
            for k, v in state.items()
        }
    # Shared tensors (tied or MTP copies) must be separate storages for safetensors.
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
    cfg = model.config
    if dtype is not None:
        cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch."))
    else:
        cfg = cfg.replace(torch_dtype=str(model.dtype).removeprefix("torch."))
    cfg.save(out)
    shards = _shard(state, max_shard_bytes)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save_file(shards[0], out / "model.safetensors", metadata)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_file(shard, out / name, metadata)
            for k, v in shard.items():
                weight_map[k] = name
                total += v.numel() * v.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    return out


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


def read_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in d.glob("*.safetensors"))
        if not found:
            pickles = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
            raise FileNotFoundError(f"no safetensors weights in {d}{hint}")
        files = found
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[k] = f.get_tensor(k)
    return tensors


def build_model(
    config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DeepSeekV3:
    """An uninitialized model (meta device when device='meta'); buffers are valid on real devices."""
    with torch.device("meta"):
        model = DeepSeekV3(config)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # to_empty gives the head and the embedding separate storage again
    reset_buffers(model)
    return model


def reset_buffers(model: DeepSeekV3) -> None:
    """Recompute the non-persistent buffers (RoPE tables, fp32 balancing state) after `to_empty`."""
    from nanoseek.model.attention import RotaryEmbedding, rope_inverse_frequencies
    from nanoseek.model.moe import Router

    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            inv, m.attention_factor = rope_inverse_frequencies(model.config)
            m.inv_freq = inv.to(m.inv_freq.device)
            m._cos = m._sin = None
            m._cache_len = 0
        elif isinstance(m, Router):
            # Balancing state stays fp32 whatever the weights' dtype: bias steps are tiny.
            m.expert_load = torch.zeros_like(m.expert_load, dtype=torch.float32)
            m.e_score_correction_bias = torch.zeros_like(m.e_score_correction_bias, dtype=torch.float32)


def load_model(
    path_or_preset: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    strict: bool = True,
) -> DeepSeekV3:
    """A checkpoint directory in HF layout, or a preset name (random weights from `seed`)."""
    p = Path(path_or_preset)
    config = resolve_config(path_or_preset)
    if not p.exists():
        return build_model(config, device=device, dtype=dtype).init_weights(seed)
    tensors = from_hf_state_dict(read_safetensors(p), config, dtype)
    if config.num_nextn_predict_layers and not any(k.startswith("model.mtp_layers.") for k in tensors):
        # transformers' DeepseekV3Config defaults to one MTP layer but its save_pretrained writes none:
        # every checkpoint it makes says MTP and holds no MTP weight. The main model is whole; load it
        # without the module (it predicts nothing the main head needs; only speculative decoding uses it).
        _say_once(
            f"{p}: config.json asks for {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
            "holds no MTP weights (transformers writes none); loading without the MTP module, so "
            "speculative decoding is off for this model"
        )
        config = config.replace(num_nextn_predict_layers=0)
    model = build_model(config, device=device, dtype=dtype)
    missing, unexpected = _check_keys(model, tensors)
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {p} does not match its config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all). "
            "A missing weight would be left as uninitialised memory; the files are incomplete or were "
            "written for another config.json"
        )
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, stacklevel=3)


def _check_keys(model: DeepSeekV3, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    for k in set(expected) & set(tensors):
        if tuple(expected[k].shape) != tuple(tensors[k].shape):
            raise ValueError(
                f"{k}: checkpoint shape {tuple(tensors[k].shape)} != model shape {tuple(expected[k].shape)}"
            )
    return missing, unexpected
