"""Checkpoint files: DeepSeek FP8 block dequantization, atomic replacement, no pickle, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tests.model_configs import mla_configs, small_config

import nanoseek
from nanoseek.atomic import FILE_MODE, atomic_directory, atomic_file, atomic_write
from nanoseek.checkpoint import build_model, read_safetensors, save_model
from nanoseek.config import ModelConfig
from nanoseek.model.fp8 import dequantize_blocks


def config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=64,
        hidden_size=144,  # > 128 and not a multiple: partial FP8 blocks on both axes
        intermediate_size=200,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        torch_dtype="float32",
    )
    base.update(changes)
    return ModelConfig(**base)


def direct_dequant(w8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(w8.shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = w8[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] = tile * scale_inv[i, j]
    return out


def quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantization to float8_e4m3fn, as DeepSeek's checkpoints are made."""
    rows, cols = w.shape
    nb_r, nb_c = -(-rows // block), -(-cols // block)
    scale_inv = torch.empty(nb_r, nb_c)
    w8 = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(nb_r):
        for j in range(nb_c):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale_inv[i, j] = s
            w8[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return w8, scale_inv


def test_dequantize_blocks_matches_direct_computation():
    w = torch.randn(200, 300)
    w8, s = quantize(w)
    assert s.shape == (2, 3)
    got = dequantize_blocks(w8, s)
    torch.testing.assert_close(got, direct_dequant(w8, s), rtol=0, atol=0)
    assert (got - w).abs().max() < 0.1 * w.abs().max()  # and it is a quantization of w


def test_fp8_checkpoint_loads_dequantized(tmp_path):
    cfg = config()
    model = build_model(cfg).init_weights(0)
    save_model(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    expected = {}
    for key in [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]:
        w = tensors[key] * 50  # a spread of magnitudes across blocks
        w8, s = quantize(w)
        tensors[key] = w8
        tensors[key.removesuffix(".weight") + ".weight_scale_inv"] = s
        expected[key] = direct_dequant(w8, s)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = nanoseek.load_model(tmp_path)
    sd = loaded.state_dict()
    torch.testing.assert_close(
        sd["model.layers.0.mlp.gate_proj.weight"], expected["model.layers.0.mlp.gate_proj.weight"]
    )
    torch.testing.assert_close(
        sd["model.layers.0.mlp.down_proj.weight"], expected["model.layers.0.mlp.down_proj.weight"]
    )
    torch.testing.assert_close(
        sd["model.layers.1.self_attn.q_proj.weight"], expected["model.layers.1.self_attn.q_proj.weight"]
    )
    up3 = sd["model.layers.1.mlp.experts.gate_up_proj"][3, cfg.moe_intermediate_size :]
    torch.testing.assert_close(up3, expected["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())


def test_fp8_weight_without_scale_is_refused(tmp_path):
    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.gate_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="weight_scale_inv"):
        nanoseek.load_model(tmp_path)


def _fp8_checkpoint(tmp_path, block: int = 128) -> None:
    """DeepSeek-V3's layout: FP8 linear weights, weight_scale_inv per block, quantization_config."""
    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for key in ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.o_proj.weight"]:
        w8, s = quantize(tensors[key] * 50, block)
        tensors[key], tensors[key.removesuffix(".weight") + ".weight_scale_inv"] = w8, s
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [block, block],
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("fp8", [False, True])
def test_fp8_scales_of_another_block_size_are_refused(tmp_path, fp8):
    # 64x64 scales ([4, 3] for a [200, 144] weight) were read as 128x128 ones: wrong weights, silently
    _fp8_checkpoint(tmp_path, block=64)
    with pytest.raises(ValueError, match="128x128|another config"):
        nanoseek.load_model(tmp_path, fp8=fp8)


def test_a_ue8m0_checkpoint_loads_into_power_of_two_fp8_linears(tmp_path):
    """DeepSeek-V3.1's quantization_config "scale_fmt": "ue8m0": with fp8=True its inputs are quantized
    with power-of-two scales, as its weights were (DeepSeek's inference code reads scale_fmt so)."""
    from nanoseek.model.fp8 import FP8Linear

    _fp8_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = nanoseek.load_model(tmp_path, fp8=True)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert linears and all(m.pow2 for m in linears.values())
    # a weight the file holds in higher precision is quantized with the file's kind of scale too
    in_file_fp8 = {"model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.o_proj"}
    for name, m in linears.items():
        if name not in in_file_fp8:
            assert torch.equal(m.weight_scale_inv.log2().round().exp2(), m.weight_scale_inv), name


def test_fp8_storage_is_saved_in_deepseek_fp8_layout(tmp_path):
    """A model loaded with fp8=True (here from an fp32 checkpoint) is written as DeepSeek's FP8 files:
    FP8 weights and fp32 scales untouched by dtype=, the routed experts block-quantized too, and
    quantization_config, without which transformers read the FP8 values unscaled (weights up to 448)."""
    save_model(build_model(config()).init_weights(0), tmp_path / "fp32")
    kept = nanoseek.load_model(tmp_path / "fp32", fp8=True)
    save_model(kept, tmp_path / "fp8", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    for key in ["model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"]:
        assert tensors[key].dtype == torch.float8_e4m3fn
        assert tensors[key.removesuffix(".weight") + ".weight_scale_inv"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    o_proj = nanoseek.load_model(tmp_path / "fp8").model.layers[1].self_attn.o_proj.weight
    torch.testing.assert_close(o_proj, kept.model.layers[1].self_attn.o_proj.dequantize(), rtol=0, atol=0)


def test_resaving_a_dequantized_fp8_checkpoint_drops_quantization_config(tmp_path):
    _fp8_checkpoint(tmp_path / "fp8")
    save_model(nanoseek.load_model(tmp_path / "fp8"), tmp_path / "plain")  # weights now fp32
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    kept = nanoseek.load_model(tmp_path / "fp8", fp8=True)  # FP8 storage: written as FP8, config kept
    save_model(kept, tmp_path / "kept")
    assert "quantization_config" in json.loads((tmp_path / "kept" / "config.json").read_text())
    assert (
        load_file(str(tmp_path / "kept" / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"].dtype
        == torch.float8_e4m3fn
    )


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_an_engine_quantized_model_is_not_saved_as_a_checkpoint(tmp_path, fmt):
    """Its qweight/scale tensors would make a directory neither nanoseek nor transformers loads."""
    save_model(build_model(config()).init_weights(0), tmp_path / "ckpt")
    model = nanoseek.load_model(tmp_path / "ckpt", quantize=fmt)
    with pytest.raises(ValueError, match="quantized storage .* loaded without quantize="):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_engine_packed_model_is_not_saved_as_a_checkpoint(tmp_path, monkeypatch):
    """Engine(pack_weights=True) moves the large weights out of the state_dict: save_model wrote a
    directory without them, which no load took ("missing ['lm_head.weight', ...]")."""
    from nanoseek.engine import Engine, packed

    monkeypatch.setattr(packed, "PACK_MIN_ELEMENTS", 0)  # this model's matrices are all small
    model = build_model(config()).init_weights(0)
    if not packed.packable(model):
        pytest.skip("this PyTorch's oneDNN does not pack these weights")
    Engine(model, pack_weights=True)
    with pytest.raises(ValueError, match="packed this model's large weights.*save it before"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_directory_given_as_a_checkpoint_names_the_checkpoints_inside(tmp_path):
    """load_model("runs/x") said only "not a checkpoint directory (no config.json)" of a run whose
    checkpoints are its stages' folders (RUN/pretrain, RUN/final)."""
    save_model(build_model(config()).init_weights(0), tmp_path / "run" / "pretrain")
    with pytest.raises(
        FileNotFoundError, match=r"no config.json\); the checkpoints inside it: .*run/pretrain$"
    ):
        nanoseek.load_model(tmp_path / "run")


def test_atomic_directory_keeps_old_checkpoint_on_failure(tmp_path):
    target = tmp_path / "run" / "pretrain"
    model = build_model(config()).init_weights(0)
    with atomic_directory(target) as tmp:
        save_model(model, tmp)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = build_model(config()).init_weights(1)
    with pytest.raises(RuntimeError, match="injected"), atomic_directory(target) as tmp:
        save_model(other, tmp)
        assert (tmp / "model.safetensors").exists()
        raise RuntimeError("injected failure mid-checkpoint")
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before
    assert [p.name for p in target.parent.iterdir()] == ["pretrain"], "scratch dirs are cleaned up"
    # A successful write does replace it.
    with atomic_directory(target) as tmp:
        save_model(other, tmp)
    assert (target / "model.safetensors").read_bytes() != before["model.safetensors"]
    # every file readable as the user's umask says (safetensors alone writes its files owner-only)
    assert {f.stat().st_mode & 0o777 for f in target.iterdir()} == {FILE_MODE}


def test_a_symlinked_checkpoint_is_written_where_it_points_and_stays_linked(tmp_path):
    """RUN/pretrain (or RUN/final) linked to another disk: each save lands there, the link stays, and
    nothing is left beside it. The swap used to rename a directory over the link (on the link's disk),
    leave the link aside as `.pretrain.tmp-old`, and fail the next save or resume on it."""
    from nanoseek.checkpoint import load_train_state

    (tmp_path / "big").mkdir()
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "pretrain"
    link.symlink_to(tmp_path / "big" / "pretrain", target_is_directory=True)
    for step in ("1", "2"):
        with atomic_directory(link) as tmp:
            (tmp / "weights").write_text(step)
        assert link.is_symlink() and (tmp_path / "big" / "pretrain" / "weights").read_text() == step
        assert load_train_state(link) is None
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["pretrain"]
    assert [p.name for p in (tmp_path / "big").iterdir()] == ["pretrain"]
    # a file too: `--gguf model.gguf` linked to another disk
    (tmp_path / "big" / "model.gguf").write_text("old")
    (tmp_path / "run" / "model.gguf").symlink_to(tmp_path / "big" / "model.gguf")
    atomic_write(tmp_path / "run" / "model.gguf", "new")
    assert (tmp_path / "run" / "model.gguf").is_symlink()
    assert (tmp_path / "big" / "model.gguf").read_text() == "new"


def test_a_failed_atomic_write_names_the_users_path_and_keeps_the_old_file(tmp_path):
    """A full disk mid-write: the error names the file asked for (not the hidden temporary one), the
    old file is whole, and no temporary file is left beside it."""
    import errno

    target = tmp_path / "report.json"
    atomic_write(target, "old")
    with pytest.raises(OSError, match="No space left") as e, atomic_file(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_full_disk_under_safetensors_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors' Rust writer reports a full disk as a bare SafetensorError (its message below, as a
    full tmpfs gives it): a save ended in a traceback, not the CLI's one line naming the file."""
    import errno

    from safetensors import SafetensorError

    import nanoseek.checkpoint as ck

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        save_model(build_model(config()).init_weights(0), tmp_path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_save_cut_short_by_a_full_disk_keeps_the_checkpoint_saved_there_before(tmp_path, monkeypatch):
    """`save_model` deleted the weights a directory held before it wrote the new ones, and replaced their
    config first: a full disk mid-write left config.json alone, the model saved there before lost."""
    from safetensors import SafetensorError

    import nanoseek.checkpoint as ck

    before = build_model(config()).init_weights(0)
    save_model(before, tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError, match="No space left on device"):
        save_model(build_model(config(num_hidden_layers=3)).init_weights(1), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved
    monkeypatch.undo()
    loaded = nanoseek.load_model(tmp_path)
    want = before.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())


def test_a_sharded_save_writes_transformers_index(tmp_path):
    """The index is what transformers and the Hub read for a sharded checkpoint: every tensor mapped to
    the shard that holds it, and metadata.total_size the bytes of all tensors (the Hub shows it as
    the model's size)."""
    save_model(build_model(config()).init_weights(0), tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = {p.name: load_file(str(p)) for p in tmp_path.glob("model-*.safetensors")}
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    n = len(shards)  # numbered from 1, as transformers' and the Hub's shards are
    assert sorted(shards) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    held = {k: name for name, tensors in shards.items() for k in tensors}
    assert index["weight_map"] == held
    nbytes = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    assert index["metadata"]["total_size"] == nbytes


def test_a_checkpoint_of_exactly_max_shard_bytes_is_one_file(tmp_path):
    """max_shard_bytes is the most a shard holds (as huggingface_hub's split_torch_state_dict_into_shards):
    weights of exactly that many bytes are one model.safetensors, one byte fewer allowed is two shards."""
    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path / "whole")
    nbytes = sum(
        t.numel() * t.element_size() for t in load_file(str(tmp_path / "whole/model.safetensors")).values()
    )
    save_model(model, tmp_path / "exact", max_shard_bytes=nbytes)
    assert sorted(p.name for p in (tmp_path / "exact").glob("model*")) == ["model.safetensors"]
    save_model(model, tmp_path / "less", max_shard_bytes=nbytes - 1)
    assert len(list((tmp_path / "less").glob("model-*-of-00002.safetensors"))) == 2


def test_a_save_over_a_sharded_checkpoint_leaves_none_of_its_files(tmp_path):
    """Saved as one file where a sharded checkpoint was, the old index and shards must go: a reader
    takes the index first, and would load the old model's weights under the new config."""
    save_model(build_model(config()).init_weights(0), tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    new = build_model(config()).init_weights(1)
    save_model(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = nanoseek.load_model(tmp_path)
    for k, v in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_sharded_save_cut_short_never_mixes_two_checkpoints(tmp_path, monkeypatch):
    """Saved over a sharded checkpoint of as many shards (the same names), a full disk at the second
    shard left the new first shard beside the old index and second shard: one model of two checkpoints,
    loaded without a word. Every shard is written before any replaces its namesake."""
    from safetensors import SafetensorError

    import nanoseek.checkpoint as ck

    before = build_model(config()).init_weights(0)
    save_model(before, tmp_path, max_shard_bytes=20_000)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len([n for n in saved if n.endswith(".safetensors")]) > 1
    real, calls = ck.save_file, []

    def full_at_the_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_at_the_second)
    with pytest.raises(OSError, match="No space left on device"):
        save_model(build_model(config()).init_weights(1), tmp_path, max_shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved


@pytest.mark.skipif(
    not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode),
    reason="needs /dev/full (a device that is always full)",
)
def test_a_short_write_without_errno_says_the_disk_is_full(tmp_path, monkeypatch):
    """numpy's tofile (under the GGUF writer) reports a full disk as OSError("65536 requested and 61152
    written") with no errno: named the file, it printed as "[Errno None] None: 'model.gguf' -> None"."""
    import errno
    import types

    np = pytest.importorskip("numpy")
    target = tmp_path / "model.gguf"

    def write(full: bool) -> OSError:
        monkeypatch.setattr(os, "statvfs", lambda d: types.SimpleNamespace(f_bavail=0 if full else 9))
        (tmp_path / ".model.gguf.tmp").symlink_to("/dev/full")  # where it writes: a disk with no space left
        with pytest.raises(OSError) as e, atomic_file(target) as tmp, open(tmp, "wb") as f:
            np.zeros(1 << 17).tofile(f)
        return e.value

    e = write(full=True)
    assert (e.errno, e.filename) == (errno.ENOSPC, str(target)) and "No space left" in str(e)
    e = write(full=False)  # some other short write: its own words, and the file
    assert e.filename == str(target) and "requested and 0 written" in str(e) and "None" not in str(e)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode),
    reason="needs /dev/full (a device that is always full)",
)
def test_an_out_on_a_full_disk_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    """A full disk still makes an empty file: `check_out` passed it, and the stage trained its tokenizer and
    read its data before its first write said "No space left on device", naming no file."""
    import tempfile

    from nanoseek.atomic import check_out

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: open("/dev/full", "wb"))  # noqa: SIM115
    with pytest.raises(ValueError, match=f"cannot write --out {tmp_path} .*No space left on device"):
        check_out(tmp_path)


def test_a_failed_directory_save_names_the_users_path(tmp_path):
    """A full disk in a checkpoint's save named the scratch copy (RUN/.pretrain.tmp-new/...), gone by
    the time the user reads it, not RUN/pretrain/..."""
    import errno

    save = tmp_path / "pretrain"
    with (
        pytest.raises(OSError) as e,
        atomic_directory(save) as tmp,
        atomic_file(tmp / "train_state" / "o.pt"),
    ):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.filename == str(save / "train_state" / "o.pt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_take_the_longest_legal_names(tmp_path):
    """A name of 251-255 bytes is legal, but its temporary name (`.NAME.tmp`) passed the 255-byte
    limit: the write failed with "File name too long". Two-byte characters too (never cut in half)."""
    for name in ("r" * 250 + ".json", "é" * 125 + ".json"):  # 255 bytes each
        atomic_write(tmp_path / name, "old")
        atomic_write(tmp_path / name, "new")
        assert (tmp_path / name).read_text() == "new"
        for _ in range(2):  # a new directory, then one swapped over the old
            with atomic_directory(tmp_path / name[:-5]) as tmp:
                (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cut_name_keeps_a_name_that_fits_and_cuts_one_byte_longer_to_head_and_digest():
    """A name of exactly `room` bytes stays as it is (a task's report keeps its readable name); one
    byte more becomes its head, a dot and the first 16 hex digits of its SHA-256: `room` bytes."""
    import hashlib

    from nanoseek.atomic import cut_name

    fits = "a" * 200
    assert cut_name(fits, 200) == fits
    longer = "é" * 100 + "b"  # 201 bytes
    digest = hashlib.sha256(longer.encode()).hexdigest()[:16]
    # 200 - 17 = 183 bytes of head: 91 two-byte characters, the 92nd would be cut in half
    assert cut_name(longer, 200) == "é" * 91 + "." + digest


def test_a_lock_in_a_directory_holding_more_stays_and_one_made_for_it_alone_goes(tmp_path):
    """`exclusive` removes only what it made for the lock alone: its lock file stays in a directory that
    holds anything else (the run it guarded wrote there), and a directory it made that holds only the
    lock goes with it, its parents made with it too."""
    from nanoseek.atomic import exclusive

    lock = tmp_path / "run" / "pretrain" / ".lock"
    with exclusive(lock, "held by {holder}"):
        assert lock.read_text() == f"pid {os.getpid()}"
        (lock.parent / "metrics.jsonl").write_text("{}\n")
    assert lock.exists() and (lock.parent / "metrics.jsonl").exists()
    fresh = tmp_path / "fresh" / "sub" / ".lock"
    with exclusive(fresh, "held by {holder}"):
        pass
    assert not (tmp_path / "fresh").exists()


def test_an_atomic_write_on_a_read_only_filesystem_names_the_users_path(tmp_path, monkeypatch):
    """A read-only mount refuses even to unlink a file that is not there (EROFS, not ENOENT): the
    clean-up of the temporary file must not replace the error, which then named `.report.json.tmp`."""
    import errno
    from pathlib import Path

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".report.json.tmp"))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError, match="Read-only") as e:
        atomic_write(tmp_path / "report.json", "new")
    assert e.value.filename == str(tmp_path / "report.json")


def test_a_directory_write_on_a_read_only_filesystem_names_the_users_path(tmp_path, monkeypatch):
    """A checkpoint saved into a run directory gone read-only failed at its scratch directory, and the
    error named that hidden `.pretrain.tmp-new`, not the checkpoint the user knows."""
    import errno

    made = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".tmp-new"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return made(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OSError, match="Read-only") as e, atomic_directory(tmp_path / "pretrain"):
        pass
    assert e.value.filename == str(tmp_path / "pretrain")


def test_atomic_writes_reach_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """A rename can reach the disk before the data it names: without an fsync of the new file first, a
    power cut left the final name over an empty file (the old checkpoint gone), and without one of the
    directory after, the rename itself could be lost."""
    from nanoseek import atomic

    events: list[tuple[str, int]] = []

    class RecordingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def fsync(self, fd):
            events.append(("fsync", os.fstat(fd).st_ino))
            os.fsync(fd)

        def replace(self, src, dst):
            events.append(("replace", os.stat(src).st_ino))
            os.replace(src, dst)

    monkeypatch.setattr(atomic, "os", RecordingOs())
    atomic_write(tmp_path / "config.json", "{}")
    file, parent = (tmp_path / "config.json").stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file), ("replace", file), ("fsync", parent)]

    events.clear()
    with atomic_directory(tmp_path / "ckpt") as d:
        (d / "model.safetensors").write_bytes(b"weights")
    inner, folder = (tmp_path / "ckpt/model.safetensors").stat().st_ino, (tmp_path / "ckpt").stat().st_ino
    assert events == [("fsync", inner), ("fsync", folder), ("replace", folder), ("fsync", parent)]


def test_atomic_writes_work_where_directories_cannot_be_opened(tmp_path, monkeypatch):
    """Windows: os.open refuses a directory (EACCES), so the fsync of the directory after the rename
    failed every atomic write there (a tokenizer, a config, each checkpoint) with a PermissionError; and
    its fsync (FlushFileBuffers) refuses a file opened read-only (EBADF)."""
    import errno
    import sys

    from nanoseek import atomic

    class WindowsOs:
        read_only: set[int] = set()

        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, path, flags, *args, **kwargs):
            if os.path.isdir(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            fd = os.open(path, flags, *args, **kwargs)
            if flags & (os.O_WRONLY | os.O_RDWR):
                self.read_only.discard(fd)
            else:
                self.read_only.add(fd)
            return fd

        def fsync(self, fd):
            if fd in self.read_only:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            os.fsync(fd)

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(atomic, "os", WindowsOs())
    for text in ("old", "new"):
        atomic_write(tmp_path / "config.json", text)
        with atomic_directory(tmp_path / "pretrain") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights").write_text(text)
    assert (tmp_path / "config.json").read_text() == "new"
    assert (tmp_path / "pretrain" / "sub" / "weights").read_text() == "new"


def test_a_checkpoint_replaced_while_it_loads_loads_whole(tmp_path, monkeypatch):
    """A reader loading RUN/<stage> while the run saves its next checkpoint there gets one of the two
    checkpoints, never the first shards of one and the rest of the other."""
    from nanoseek import checkpoint

    target = tmp_path / "pretrain"
    old, new = (build_model(config()).init_weights(seed) for seed in (0, 1))

    def save(model):
        with atomic_directory(target) as tmp:
            save_model(model, tmp, max_shard_bytes=20_000)

    save(old)
    assert len(list(target.glob("model-*.safetensors"))) > 2
    get = checkpoint._ShardReader.get
    saves = []

    def get_while_the_run_saves(self, key):
        tensor = get(self, key)
        if not saves:  # the run saves its next checkpoint once the load has read a tensor
            saves.append(save(new))
        return tensor

    monkeypatch.setattr(checkpoint._ShardReader, "get", get_while_the_run_saves)
    loaded = nanoseek.load_model(target).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in new.state_dict().items()), "a mix of two checkpoints"


def test_a_checkpoint_loaded_mid_swap_loads_the_one_that_replaced_it(tmp_path, monkeypatch):
    """A reader that found RUN/<stage> between a save's two renames reads the old checkpoint where it was
    left aside; the save then finishes and removes it: the load starts again on the new checkpoint (it
    retried on the copy aside, gone by then, and failed)."""
    from nanoseek import checkpoint

    target, aside, scratch = tmp_path / "pretrain", tmp_path / ".pretrain.tmp-old", tmp_path / "next"
    old, new = (build_model(config()).init_weights(seed) for seed in (0, 1))
    save_model(old, aside, max_shard_bytes=20_000)  # the save has moved the old checkpoint aside
    save_model(new, scratch, max_shard_bytes=20_000)
    get = checkpoint._ShardReader.get

    def get_while_the_save_finishes(self, key):
        tensor = get(self, key)
        if aside.exists():  # the second rename and the clean-up, once the load has read a tensor
            scratch.rename(target)
            shutil.rmtree(aside)
        return tensor

    monkeypatch.setattr(checkpoint._ShardReader, "get", get_while_the_save_finishes)
    loaded = nanoseek.load_model(target).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in new.state_dict().items())


def test_pickle_files_are_refused_with_a_clear_message(tmp_path):
    config().save(tmp_path)
    torch.save({"lm_head.weight": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*pickle"):
        nanoseek.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="pickle"):
        read_safetensors(tmp_path)


def test_mismatched_shapes_give_a_clear_error(tmp_path):
    save_model(build_model(config()).init_weights(0), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["intermediate_size"] = 160
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape"):
        nanoseek.load_model(tmp_path)


def test_missing_tensors_give_a_clear_error(tmp_path):
    save_model(build_model(config()).init_weights(0), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model\.norm\.weight'\]"):
        nanoseek.load_model(tmp_path)


@pytest.mark.parametrize(
    ("key", "bad", "dtype", "quantize"),
    [
        ("model.layers.1.self_attn.o_proj.weight", float("nan"), torch.bfloat16, None),
        ("model.layers.1.mlp.experts.2.down_proj.weight", float("-inf"), torch.float32, "int8"),
        ("model.layers.0.mlp.gate_proj.weight_scale_inv", float("nan"), torch.float32, None),
    ],
)
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(tmp_path, key, bad, dtype, quantize):
    """A diverged run's checkpoint generated garbage (argmax of NaN logits) without a word."""
    if key.endswith("_scale_inv"):
        _fp8_checkpoint(tmp_path)
    else:
        save_model(build_model(config()).init_weights(0), tmp_path, dtype=dtype)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[key][0, -1] = bad
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model\.safetensors: {re.escape(key)} holds NaN or inf"):
        nanoseek.load_model(tmp_path, quantize=quantize)
    tensors[key][0, -1] = 0.5  # the same files with a finite value load
    save_file(tensors, str(tmp_path / "model.safetensors"))
    nanoseek.load_model(tmp_path, quantize=quantize)


def test_save_load_round_trip_is_exact_and_bf16_save(tmp_path):
    model = build_model(config(num_nextn_predict_layers=1)).init_weights(0)
    save_model(model, tmp_path / "fp32")
    again = nanoseek.load_model(tmp_path / "fp32")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    t = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert t["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("stored", "native_bf16", "device", "expected"),
    [
        ("bfloat16", True, "cpu", torch.bfloat16),  # a 16-bit checkpoint where bf16 is fast
        ("float16", True, "cpu", torch.bfloat16),
        ("bfloat16", False, "cpu", torch.float32),  # AVX2: bf16 matmuls take a slow path
        ("float32", True, "cpu", torch.float32),  # the checkpoint's own precision
        ("float32", False, "cpu", torch.float32),
        ("float32", True, "cuda", torch.bfloat16),
        ("float32", False, "cuda", torch.float16),  # a T4 or V100: bf16 only emulated there
    ],
)
def test_auto_dtype_is_the_checkpoints_where_the_machine_runs_it_fast(
    monkeypatch, stored, native_bf16, device, expected
):
    from nanoseek.checkpoint import resolve_dtype

    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    assert resolve_dtype("auto", config(torch_dtype=stored), device) == expected
    assert resolve_dtype("float32", config(torch_dtype=stored), device) == torch.float32
    assert resolve_dtype(torch.float16, config(torch_dtype=stored), device) == torch.float16


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_the_dtype_help_says_what_auto_picks_on_an_apple_gpu(monkeypatch, stored):
    """`--dtype auto` on `--device mps` loads float32 (`resolve_dtype`): the help of serve, generate,
    chat and eval said "bfloat16 on a GPU"."""
    from nanoseek.checkpoint import resolve_dtype
    from nanoseek.perf import AUTO_DTYPE_HELP

    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", config(torch_dtype=stored), "mps") == torch.float32
    assert "float32 on mps" in AUTO_DTYPE_HELP and "bfloat16 on a CUDA GPU" in AUTO_DTYPE_HELP


def test_load_model_auto_dtype_and_bad_dtype(tmp_path, monkeypatch):
    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path, dtype=torch.bfloat16)
    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: True)
    assert nanoseek.load_model(tmp_path, dtype="auto").dtype == torch.bfloat16
    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: False)
    assert nanoseek.load_model(tmp_path, dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'int8'"):
        nanoseek.load_model(tmp_path, dtype="int8")


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_auto_dtype_of_a_config_without_one_is_the_weights(tmp_path, monkeypatch, stored):
    """A config.json that names no torch_dtype (hand-written, or an old export) read as "bfloat16": an
    fp32 checkpoint ran in bf16 under "auto"; transformers' "auto" reads the weights' own dtype."""
    import json

    save_model(build_model(config()).init_weights(0), tmp_path, dtype=stored)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("torch_dtype", None), raw.pop("dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: True)
    assert nanoseek.load_model(tmp_path, dtype="auto").dtype == stored


def test_auto_dtype_without_one_in_the_config_is_the_embeddings(tmp_path, monkeypatch):
    """Mixed storage (a bf16 checkpoint keeping its head in fp32) and no torch_dtype: "auto" is the
    embedding's dtype, not that of whichever tensor the files list first (lm_head sorts first)."""
    import json

    save_model(build_model(config()).init_weights(0), tmp_path, dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].float()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("torch_dtype", None), raw.pop("dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: True)
    assert nanoseek.load_model(tmp_path, dtype="auto").dtype == torch.bfloat16


def test_auto_dtype_reads_transformers_5s_dtype_key(tmp_path, monkeypatch):
    """transformers 5 writes `dtype` where 4 wrote `torch_dtype`: "auto" takes it as the checkpoint's
    dtype (as transformers' dtype="auto" does), not the weights' storage."""
    import json

    save_model(build_model(config()).init_weights(0), tmp_path, dtype=torch.bfloat16)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("torch_dtype", None)
    raw["dtype"] = "float32"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: True)
    assert nanoseek.load_model(tmp_path, dtype="auto").dtype == torch.float32


def test_load_model_refuses_8_bit_dtypes_and_unavailable_devices(tmp_path):
    """dtype="float8_e4m3fn" built a model no forward could run ("mul_cpu_reduced_float" not implemented);
    a device torch cannot use failed inside torch (an AssertionError, a RuntimeError) with a traceback."""
    for dtype in ("float8_e4m3fn", torch.float8_e4m3fn, "int8", torch.int8):
        with pytest.raises(ValueError, match="fp8=True"):
            nanoseek.load_model("tiny", dtype=dtype)
    with pytest.raises(ValueError, match="device 'gpu'"):
        nanoseek.load_model("tiny", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda'.*not available"):
            nanoseek.load_model("tiny", device="cuda")
    model = build_model(config()).init_weights(0)
    # save_model takes a dtype name as load_model does (it was read as a device: "Invalid device string")
    save_model(model, tmp_path, dtype="bfloat16")
    assert nanoseek.load_model(tmp_path, dtype="auto").config.torch_dtype == "bfloat16"


def test_building_a_model_leaves_torch_dynamo_unimported():
    """Constructing on the meta device must not run ops through Python reference kernels, which import
    torch._dynamo: ~2 s added to every `nanoseek chat/generate/serve` start."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from nanoseek.checkpoint import build_model\n"
        "from nanoseek.config import get_preset\n"
        "build_model(get_preset('tiny'))\n"
        "build_model(get_preset('deepseek-v3'), device='meta')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_crash_mid_swap_loses_no_checkpoint(tmp_path):
    """Killed between moving the old directory aside and renaming the new one in: the next write
    puts the old one back before anything else, so it is never lost."""
    from nanoseek.checkpoint import load_train_state

    target = tmp_path / "pretrain"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
    target.rename(tmp_path / ".pretrain.tmp-old")  # where the swap had put it
    assert load_train_state(target) is None  # resuming looks for it, and so puts it back
    assert (target / "weights").read_text() == "old"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        raise RuntimeError("a failed write afterwards leaves it too")
    assert (target / "weights").read_text() == "old"


def test_a_checkpoint_a_crash_left_aside_is_still_loaded(tmp_path):
    """`nanoseek chat RUN/pretrain` after a crash between a save's two renames: the reader loads the
    copy left aside where it is (a writer may be mid-swap, so it never moves it back itself)."""
    from nanoseek.checkpoint import load_model

    model = build_model(config()).init_weights(0)
    target = tmp_path / "pretrain"
    save_model(model, target)
    target.rename(tmp_path / ".pretrain.tmp-old")  # where the swap had put it
    loaded = load_model(target)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not target.exists() and (tmp_path / ".pretrain.tmp-old").is_dir()
    with pytest.raises(ValueError, match="neither a directory with config.json nor a preset"):
        load_model(tmp_path / "other")  # no copy aside: as before


def test_a_checkpoint_left_aside_under_a_path_shaped_like_a_hub_name_is_still_loaded(tmp_path, monkeypatch):
    """`nanoseek chat runs/pretrain` (RUN/stage: owner/name's shape) after a crash between a save's two
    renames: the copy left aside is read, not `runs/pretrain` looked up on the Hugging Face Hub."""
    from nanoseek.checkpoint import is_hub_name, load_model, resolve_checkpoint

    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path / "runs" / "pretrain")
    (tmp_path / "runs" / "pretrain").rename(tmp_path / "runs" / ".pretrain.tmp-old")
    monkeypatch.chdir(tmp_path)
    assert not is_hub_name("runs/pretrain")
    assert resolve_checkpoint("runs/pretrain").name == ".pretrain.tmp-old"
    assert torch.equal(load_model("runs/pretrain").model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert is_hub_name("runs/other")  # no copy aside: the Hub's name, as before


def test_the_current_directory_loads_as_a_checkpoint(tmp_path, monkeypatch):
    """`nanoseek generate . PROMPT` inside a checkpoint: looking for a copy left aside beside `.`
    said "PosixPath('.') has an empty name"."""
    from nanoseek.checkpoint import load_model, resolve_checkpoint

    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(resolve_checkpoint("."), tmp_path)
    assert torch.equal(load_model(".").model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_dcp_checkpoint_is_named_as_one_with_the_way_to_load_it(tmp_path):
    """`nanoseek generate RUN/dcp` on `save_dcp`'s directory (shards and config.json) said it had no
    tokenizer.json, or no safetensors weights where the tokenizer was copied beside them."""
    from nanoseek.checkpoint import load_model, resolve_checkpoint
    from nanoseek.train.dcp import save_dcp

    save_dcp(build_model(config()).init_weights(0), tmp_path / "dcp")
    (tmp_path / "dcp" / "tokenizer.json").write_text("{}")  # copied beside it, as export_hf takes it
    for kw in ({"tokenizer": True}, {}):
        with pytest.raises(FileNotFoundError, match=r"dcp is a torch.distributed.checkpoint .*export_hf\("):
            resolve_checkpoint(tmp_path / "dcp", **kw)
    with pytest.raises(FileNotFoundError, match="is a torch.distributed.checkpoint"):
        load_model(tmp_path / "dcp")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_at_a_save_says_so_and_keeps_the_last_train_state(tmp_path):
    """A checkpoint save that runs out of space names the cause (torch's own writer says "unexpected
    pos" or "iostream error"), and the train state saved before is left whole for --resume."""
    from nanoseek.checkpoint import TRAIN_STATE, load_train_state, save_train_state

    save_train_state(tmp_path, {"state": {}}, {"step": 1}, {"step": 1})
    scratch = tmp_path / TRAIN_STATE / ".optimizer.pt.tmp"
    scratch.symlink_to("/dev/full")  # where the next save writes: a disk with no space left
    with pytest.raises(OSError, match="No space left on device"):
        save_train_state(tmp_path, {"state": {"w": torch.zeros(1000)}}, {"step": 2}, {"step": 2})
    assert not scratch.exists() and not scratch.is_symlink()
    assert load_train_state(tmp_path)[1] == {"step": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balancing_bias_stored_in_bf16_loads_in_fp32(tmp_path, dtype):
    """A checkpoint whose selection bias is stored in bf16 (a tool's all-bf16 export): the bias loads
    in fp32 whatever the dtype, as transformers keeps it, so the trainer's γ = 0.001 steps are not
    rounded away (at 0.3 bf16's spacing is 0.002)."""
    save_model(build_model(config()).init_weights(0), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors = {k: v.bfloat16() if "e_score_correction_bias" in k else v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = nanoseek.load_model(tmp_path, dtype=dtype)
    assert {str(r.e_score_correction_bias.dtype) for _, r in model.routers()} == {"torch.float32"}


def test_mtp_layers_the_config_does_not_use_are_skipped(tmp_path):
    """A DeepSeek-V3 checkpoint's MTP layers (at index num_hidden_layers + depth) load as the model's
    MTP modules, and those past config.json's num_nextn_predict_layers (here: 0) are not the model's:
    skipped, not unexpected, and no main layer is read from them."""
    model = build_model(config(num_nextn_predict_layers=1)).init_weights(0)
    save_model(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(d))
    main = nanoseek.load_model(tmp_path)
    assert len(main.model.mtp_layers) == 0
    full = model.state_dict()
    for k, v in main.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_fp8_e5m2_weights_are_requantized_to_e4m3_for_fp8_storage(tmp_path):
    """FP8Linear computes on float8_e4m3fn: an e5m2 weight is dequantized and quantized again, never
    taken as it is (its bytes read as e4m3 would be other numbers)."""
    from nanoseek.model.fp8 import FP8_DTYPE, FP8Linear, quantize_blocks

    save_model(build_model(config()).init_weights(0), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.gate_proj.weight"
    w8, s = quantize(tensors[key] * 50)
    tensors[key], tensors[key.removesuffix(".weight") + ".weight_scale_inv"] = (
        w8.float().to(torch.float8_e5m2),
        s,
    )
    save_file(tensors, str(tmp_path / "model.safetensors"))
    linear = nanoseek.load_model(tmp_path, fp8=True).model.layers[0].mlp.gate_proj
    assert isinstance(linear, FP8Linear) and linear.weight.dtype == FP8_DTYPE
    q, scale = quantize_blocks(dequantize_blocks(tensors[key], s))
    assert torch.equal(linear.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(linear.weight_scale_inv, scale)


def test_mtp_copies_of_embedding_and_head_alone_are_no_mtp_weights(tmp_path):
    """Files whose MTP layer holds only DeepSeek's copies of the shared embedding and head have no MTP
    weights: the model loads without the MTP module (with the warning), not with it missing."""
    save_model(build_model(config(num_nextn_predict_layers=1)).init_weights(0), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    shared = ("model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight")
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.2.") or k in shared}
    save_file(kept, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="holds no MTP weights") as said:
        assert len(nanoseek.load_model(tmp_path).model.mtp_layers) == 0
    # at the caller's line, where the default filter shows it and a user's filter can select it (it
    # named checkpoint.py's own `_stream(...)` line)
    assert [w.filename for w in said] == [__file__]


def test_an_atomic_write_replaces_the_file_rather_than_writing_into_it(tmp_path):
    """A reader of the old file (a served checkpoint's memory map) keeps reading the old bytes: the
    new file is renamed over it, never copied into it."""
    target = tmp_path / "model.safetensors"
    atomic_write(target, b"old")
    with open(target, "rb") as reader:
        atomic_write(target, b"new!")
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new!"


def test_a_checkpoint_left_aside_survives_a_failed_write_and_a_cut_short_clean_up(tmp_path):
    """The other two crash points of a swap: old one aside and the next write fails (it is put back
    first, so it is there after the failure); new one in place but the old one not yet removed (the
    next write or resume removes the old one and keeps the new)."""
    from nanoseek.atomic import restore_directory

    target, aside = tmp_path / "pretrain", tmp_path / ".pretrain.tmp-old"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
    target.rename(aside)
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("the next write fails")
    assert (target / "weights").read_text() == "old" and not aside.exists()
    aside.mkdir()
    (aside / "weights").write_text("older")
    restore_directory(target)
    assert (target / "weights").read_text() == "old" and not aside.exists()


def test_fp8_scales_stored_in_bf16_are_kept_as_fp32_for_fp8_storage(tmp_path):
    """A checkpoint whose weight_scale_inv is stored in bf16 loads with fp8=True into FP8Linear's fp32
    scales (FP8 matmuls take fp32 scales only), the same numbers."""
    from nanoseek.model.fp8 import FP8Linear

    save_model(build_model(config()).init_weights(0), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.gate_proj.weight"
    w8, s = quantize(tensors[key] * 50)
    tensors[key], tensors[key.removesuffix(".weight") + ".weight_scale_inv"] = w8, s.bfloat16()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    linear = nanoseek.load_model(tmp_path, fp8=True).model.layers[0].mlp.gate_proj
    assert isinstance(linear, FP8Linear)
    assert linear.weight_scale_inv.dtype == torch.float32
    assert torch.equal(linear.weight_scale_inv, s.bfloat16().float())


def test_a_key_mismatch_names_five_keys_and_the_count(tmp_path):
    """The error names the first five missing keys, '...' for more, and how many in all (of the first
    layer: files short of the last ones are refused before the key check, by `held_config`)."""
    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    gone = sorted(k for k in tensors if k.startswith("model.layers.0."))
    save_file({k: v for k, v in tensors.items() if k not in gone}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing") as e:
        nanoseek.load_model(tmp_path)
    named, count = re.search(r"missing \[([^\]]*)\]\.\.\. \((\d+) in all\)", str(e.value)).groups()
    assert (
        named.split(", ")
        == [repr(k) for k in sorted(model.state_dict()) if k.startswith("model.layers.0.")][:5]
    )
    assert int(count) == sum(k.startswith("model.layers.0.") for k in model.state_dict())


def test_a_single_file_checkpoint_reads_model_safetensors_only(tmp_path):
    """Beside model.safetensors (and no index), another *.safetensors file (an adapter, a draft's
    weights) is not read as part of the checkpoint."""
    model = build_model(config()).init_weights(0)
    save_model(model, tmp_path)
    save_file({"adapter.weight": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    loaded = nanoseek.load_model(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_gguf_file_given_for_the_checkpoint_says_it_is_one(tmp_path, capsys):
    """`nanoseek generate final.gguf` (chat, serve, eval, `--init`) said "not a checkpoint directory ...:
    it is a file", while inspect and cost named the GGUF: both say it, and that nanoseek loads HF-layout
    directories."""
    from nanoseek.checkpoint import resolve_checkpoint
    from nanoseek.cli import main

    gguf = tmp_path / "final.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(FileNotFoundError, match=r"final.gguf is a GGUF file, for llama.cpp .*HF-layout"):
        resolve_checkpoint(gguf, tokenizer=True)
    assert main(["generate", str(gguf), "hi"]) == 2
    assert "is a GGUF file, for llama.cpp" in capsys.readouterr().err
    other = tmp_path / "notes.txt"  # any other file keeps its message
    other.write_text("x")
    with pytest.raises(FileNotFoundError, match="it is a file"):
        resolve_checkpoint(other)


def test_a_checkpoint_path_that_is_a_link_loop_is_one_line(tmp_path, capsys):
    """`ln -s run run` (or two links naming each other): Path.resolve's RuntimeError "Symlink loop"
    came out of every command as a traceback; it is the OSError a read of the path gives (ELOOP)."""
    import errno

    from nanoseek.cli import main

    loop = tmp_path / "run"
    loop.symlink_to(loop)
    with pytest.raises(OSError) as e:
        nanoseek.load_model(loop)
    assert e.value.errno == errno.ELOOP and e.value.filename == str(loop)
    assert main(["inspect", str(loop)]) == 2
    err = capsys.readouterr().err
    assert err == f"nanoseek inspect: error: {loop}: Too many levels of symbolic links\n"


# ------------------------------------------------------------------ properties (hypothesis)
_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@pytest.mark.filterwarnings("ignore:transformers loads this checkpoint", "ignore:.*MTP layer")
@settings(max_examples=10)
@given(
    cfg=mla_configs(),
    dtype=_DTYPES,
    save_dtype=st.none() | _DTYPES,
    max_shard_bytes=st.integers(1, 200_000),
    seed=st.integers(0, 3),
)
def test_any_small_model_saved_loads_back_bit_identical(
    tmp_path_factory, cfg, dtype, save_dtype, max_shard_bytes, seed
):
    """save_model then load_model, in the dtype it was saved in: every tensor bit-identical (the balancing
    bias in fp32, as it always is) and the same config, whatever the shape, dtypes and shard size."""
    import dataclasses

    model = build_model(cfg).init_weights(seed).to(dtype)
    with torch.no_grad():  # a nonzero balancing bias, so that streaming it over the reset one shows
        for _, router in model.routers():
            router.e_score_correction_bias.uniform_(-1, 1)
    d = tmp_path_factory.mktemp("ckpt")
    save_model(model, d, dtype=save_dtype, max_shard_bytes=max_shard_bytes)
    stored = save_dtype or dtype
    loaded = nanoseek.load_model(d, dtype=stored)
    got = loaded.state_dict()
    assert got.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        want = v if "e_score_correction_bias" in k else v.to(stored)
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert loaded.config.torch_dtype == str(stored).removeprefix("torch.")
    # (as config.json says it: a config without routed experts writes every layer dense there)
    same = [dataclasses.replace(c, torch_dtype=None).to_dict() for c in (loaded.config, cfg)]
    assert same[0] == same[1]


def _failing_write(monkeypatch, at: int, swap: bool) -> list[str]:
    """Make the `at`-th write of a save fail as a full disk does: a shard's, a data fsync, the index's or
    config.json's text (`swap`: also the renames and the directory fsyncs `atomic_directory` makes).
    Returns the list of what was written, the last the one that failed."""
    import errno

    import nanoseek.atomic as atomic
    import nanoseek.checkpoint as ck

    done: list[str] = []

    def counted(real, what, arg=0):
        def write(*args, **kwargs):
            path = Path(args[arg])  # (save_file's is its second)
            if what != "text" or path.name.endswith(".tmp"):
                done.append(f"{what} {path.name}")
                if len(done) == at:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(*args, **kwargs)

        return write

    monkeypatch.setattr(ck, "save_file", counted(ck.save_file, "save", 1))
    monkeypatch.setattr(ck, "fsync", counted(ck.fsync, "fsync"))
    monkeypatch.setattr(Path, "write_text", counted(Path.write_text, "text"))
    if swap:
        monkeypatch.setattr(atomic, "fsync", counted(atomic.fsync, "fsync"))
        monkeypatch.setattr(atomic.os, "replace", counted(os.replace, "replace"))
    return done


def _holds(model, state) -> bool:
    got = model.state_dict()
    return got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())


@pytest.mark.filterwarnings("ignore:transformers loads this checkpoint")  # (the small config's V3 routing)
@settings(max_examples=12)
@given(
    old_shard=st.integers(10_000, 100_000),
    new_shard=st.none() | st.integers(10_000, 100_000),
    other_model=st.booleans(),
    at=st.integers(1, 80),
    swap=st.booleans(),
)
def test_a_save_cut_short_at_any_write_leaves_the_checkpoint_saved_there_before(
    tmp_path_factory, old_shard, new_shard, other_model, at, swap
):
    """A save that fails at any write (a full disk) leaves the checkpoint saved there before, loadable
    and whole: saved over with save_model (the next save of the same run, or another model), or in
    `atomic_directory` with its train state, where a failure even at a rename is said (a save that
    failed after its swap leaves the new checkpoint, whole), and its scratch copy goes."""
    import errno

    from nanoseek.checkpoint import load_train_state, save_train_state

    old = build_model(small_config(num_hidden_layers=2)).init_weights(0)
    new = build_model(small_config(num_hidden_layers=3 if other_model else 2)).init_weights(1)
    d = tmp_path_factory.mktemp("run") / "ckpt"
    with atomic_directory(d) as tmp:
        save_model(old, tmp, max_shard_bytes=old_shard)
        save_train_state(tmp, {"state": {}}, {"step": 1}, {"step": 1})
    files = sorted(p.name for p in d.rglob("*"))
    monkeypatch = pytest.MonkeyPatch()
    done = _failing_write(monkeypatch, at, swap)
    try:
        if swap:
            with atomic_directory(d) as tmp:
                save_model(new, tmp, max_shard_bytes=new_shard or old_shard)
                save_train_state(tmp, {"state": {}}, {"step": 2}, {"step": 2})
        else:
            save_model(new, d, max_shard_bytes=new_shard or old_shard)
    except OSError as e:
        assert e.errno == errno.ENOSPC and len(done) == at, done
    finally:
        monkeypatch.undo()
    if len(done) < at:  # it did not fail: the new one
        assert _holds(nanoseek.load_model(d), new.state_dict())
        return
    loaded = nanoseek.load_model(d)
    if swap and f"replace .{d.name}.tmp-new" in done[:-1]:  # failed after its swap
        assert _holds(loaded, new.state_dict()) and load_train_state(d)[1] == {"step": 2}, done
        return
    assert _holds(loaded, old.state_dict()), done
    if swap:
        assert load_train_state(d)[1] == {"step": 1}
        assert sorted(p.name for p in d.rglob("*")) == files
        assert [p.name for p in d.parent.iterdir()] == [d.name]


def test_a_shard_whose_fsync_fails_replaces_no_old_shard(tmp_path, monkeypatch):
    """A file system may report a full disk (or a failed write) only at fsync: the shards were fsynced
    one by one as they replaced their namesakes (the last first), so shard 2's failing there left the
    new later shards beside the old others and the old index, one model of two checkpoints loaded
    without a word. Every file is on disk before any replaces another; config.json too (a full disk
    there left another model's weights read under the old one's config, its extra layer dropped)."""
    import errno

    import nanoseek.atomic as atomic
    import nanoseek.checkpoint as ck

    before = build_model(config()).init_weights(0)
    save_model(before, tmp_path, max_shard_bytes=20_000)
    real = atomic.fsync

    def full_at_shard_2(path):
        if Path(path).name.startswith(".model-00002-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)

    monkeypatch.setattr(atomic, "fsync", full_at_shard_2)
    monkeypatch.setattr(ck, "fsync", full_at_shard_2, raising=False)
    with pytest.raises(OSError, match="No space left"):
        save_model(build_model(config()).init_weights(1), tmp_path, max_shard_bytes=20_000)
    monkeypatch.undo()
    assert _holds(nanoseek.load_model(tmp_path), before.state_dict())

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "config.json")

    monkeypatch.setattr(ModelConfig, "to_json", full)
    with pytest.raises(OSError, match="No space left"):
        save_model(build_model(config(num_hidden_layers=3)).init_weights(1), tmp_path, max_shard_bytes=20_000)
    monkeypatch.undo()
    assert _holds(nanoseek.load_model(tmp_path), before.state_dict())
