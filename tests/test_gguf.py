"""GGUF export: the file llama.cpp's deepseek2 loader expects (read back with gguf's own reader), clear
refusals, and, where llama-cpp-python is installed, llama.cpp's greedy tokens equal to nanoseek's."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from nanoseek.cli import main  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.export import check_exportable, export_gguf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_scripts import load_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def check():
    """benchmarks/check_gguf_llamacpp.py: one copy of the checkpoint builder and the comparison."""
    return load_benchmark("check_gguf_llamacpp")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, check):
    root = tmp_path_factory.mktemp("gguf")
    model, tok = check.make_checkpoint(root / "ckpt")
    return root / "ckpt", model, tok


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def test_export_reads_back_with_the_keys_and_tensors_llama_cpp_loads(checkpoint, tmp_path) -> None:
    ckpt, model, tok = checkpoint
    cfg = model.config
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(ckpt), "--gguf", str(out), "--type", "f32"]) == 0
    reader = gguf.GGUFReader(str(out))
    kv = _fields(reader)
    assert kv["general.architecture"] == "deepseek2"
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    a = "deepseek2."
    expected = {
        "block_count": cfg.num_hidden_layers,  # MTP layers are not counted: they are not written
        "embedding_length": cfg.hidden_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": 1,
        "attention.q_lora_rank": cfg.q_lora_rank,
        "attention.kv_lora_rank": cfg.kv_lora_rank,
        "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "attention.value_length": cfg.kv_lora_rank,
        "attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        "attention.value_length_mla": cfg.v_head_dim,
        "rope.dimension_count": cfg.qk_rope_head_dim,
        "leading_dense_block_count": cfg.first_k_dense_replace,
        "expert_count": cfg.n_routed_experts,
        "expert_used_count": cfg.num_experts_per_tok,
        "expert_shared_count": cfg.n_shared_experts,
        "expert_feed_forward_length": cfg.moe_intermediate_size,
        "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
        "expert_weights_norm": True,
        "expert_group_count": cfg.n_group,
        "expert_group_used_count": cfg.topk_group,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "feed_forward_length": cfg.intermediate_size,  # the dense layers'; experts have their own key
    }
    for key, value in expected.items():
        assert kv[a + key] == value, key
    assert kv[a + "expert_weights_scale"] == pytest.approx(cfg.routed_scaling_factor)
    assert kv[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert kv[a + "rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert kv["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    # The tokenizer: every id, the specials as control tokens, the chat tags as user-defined ones.
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size
    assert tokens[tok.bos_token_id] == tok.bos_token and types[tok.bos_token_id] == gguf.TokenType.CONTROL
    user = tok.token_to_id("<｜User｜>")
    assert types[user] == gguf.TokenType.USER_DEFINED
    assert types[tok.vocab_size] == gguf.TokenType.UNUSED  # the model's padded ids
    added = tok.backend.get_added_tokens_decoder()
    vocab = {t: i for t, i in tok.backend.get_vocab(with_added_tokens=False).items() if i not in added}
    assert vocab and all(tokens[i] == t and types[i] == gguf.TokenType.NORMAL for t, i in vocab.items())
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.padding_token_id"] == tok.pad_token_id != tok.eos_token_id
    assert kv["tokenizer.ggml.add_bos_token"] == tok.add_bos_token
    assert kv["tokenizer.ggml.add_eos_token"] is False  # nanoseek never appends EOS to a prompt
    # Every added token under its own text (the tool tags sit past the BPE vocabulary), typed as
    # special or not; padded ids are "[PAD<id>]", unique as in llama.cpp's converter.
    for i, added in tok.backend.get_added_tokens_decoder().items():
        kind = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        assert (tokens[i], types[i]) == (added.content, kind), i
    assert tokens[tok.token_to_id("<｜tool▁sep｜>")] == "<｜tool▁sep｜>"
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, cfg.vocab_size)]
    assert kv["general.name"] == ckpt.name
    assert kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert kv["tokenizer.chat_template"] == tok.chat_template
    merges = json.loads(tok.backend.to_str())["model"]["merges"]  # "a b" or ["a", "b"]
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]

    tensors = {t.name: t for t in reader.tensors}
    assert not any("nextn" in n or f"blk.{cfg.num_hidden_layers}." in n for n in tensors)  # no MTP
    h, nope, v, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    e, ff, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    shapes = {  # GGUF lists dimensions innermost first, as llama.cpp's create_tensor does
        "token_embd.weight": [d, cfg.vocab_size],
        "output.weight": [d, cfg.vocab_size],
        "blk.0.ffn_gate.weight": [d, cfg.intermediate_size],
        "blk.1.attn_q_a.weight": [d, cfg.q_lora_rank],
        "blk.1.attn_q_b.weight": [cfg.q_lora_rank, h * (nope + cfg.qk_rope_head_dim)],
        "blk.1.attn_kv_a_mqa.weight": [d, r + cfg.qk_rope_head_dim],
        "blk.1.attn_k_b.weight": [nope, r, h],
        "blk.1.attn_v_b.weight": [r, v, h],
        "blk.1.attn_output.weight": [h * v, d],
        "blk.1.ffn_gate_inp.weight": [d, e],
        "blk.1.exp_probs_b.bias": [e],
        "blk.1.ffn_gate_exps.weight": [d, ff, e],
        "blk.1.ffn_up_exps.weight": [d, ff, e],
        "blk.1.ffn_down_exps.weight": [ff, d, e],
        "blk.1.ffn_gate_shexp.weight": [d, ff * cfg.n_shared_experts],
        "blk.1.ffn_down_shexp.weight": [ff * cfg.n_shared_experts, d],
    }
    for name, shape in shapes.items():
        assert [int(x) for x in tensors[name].shape] == shape, name
    assert "blk.1.attn_kv_b.weight" not in tensors  # split for the absorbed path

    # The split is kv_b_proj's: per head, the key half transposed and the value half as is.
    attn = model.model.layers[1].self_attn
    kv_b = attn.kv_b_proj.weight.detach().view(h, nope + v, r)
    k_b = np.asarray(tensors["blk.1.attn_k_b.weight"].data).reshape(h, r, nope)
    v_b = np.asarray(tensors["blk.1.attn_v_b.weight"].data).reshape(h, v, r)
    np.testing.assert_array_equal(k_b, kv_b[:, :nope].transpose(1, 2).numpy())
    np.testing.assert_array_equal(v_b, kv_b[:, nope:].numpy())
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.exp_probs_b.bias"].data), bias)


# The names llama.cpp's converter gives a checkpoint's (Hugging Face) tensors, per layer.
HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}


def test_every_tensor_is_the_checkpoint_s_own_under_llama_cpp_s_name(checkpoint, tmp_path) -> None:
    """Read back in f32, every tensor equals the checkpoint file's tensor that llama.cpp's converter
    writes under that name: routed experts stacked in index order (gate, up and down each), kv_b_proj
    split per head, each norm its own, and nothing else (no MTP layer)."""
    import re

    from safetensors.numpy import load_file

    ckpt, model, _ = checkpoint
    cfg = model.config
    h, nope, v, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    hf = {k: t for f in sorted(ckpt.glob("*.safetensors")) for k, t in load_file(f).items()}
    want = {
        "token_embd.weight": hf.pop("model.embed_tokens.weight"),
        "output_norm.weight": hf.pop("model.norm.weight"),
        "output.weight": hf.pop("lm_head.weight"),
    }
    experts: dict[str, dict[int, np.ndarray]] = {}
    for key, t in hf.items():
        i, part, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(\w+)", key).groups()
        if int(i) >= cfg.num_hidden_layers:
            continue  # MTP
        if e := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj", part):
            experts.setdefault(f"blk.{i}.ffn_{e[2]}_exps.weight", {})[int(e[1])] = t
        elif kind == "e_score_correction_bias":
            want[f"blk.{i}.exp_probs_b.bias"] = t
        elif part == "self_attn.kv_b_proj":
            kv_b = t.reshape(h, nope + v, r)
            want[f"blk.{i}.attn_k_b.weight"] = kv_b[:, :nope].transpose(0, 2, 1)
            want[f"blk.{i}.attn_v_b.weight"] = kv_b[:, nope:]
        else:
            want[f"blk.{i}.{HF_TO_GGUF[part]}.{kind}"] = t
    for name, per_expert in experts.items():
        want[name] = np.stack([per_expert[e] for e in range(cfg.n_routed_experts)])
    out = export_gguf(ckpt, tmp_path / "tiny.gguf", type="f32").path
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert t.shape == want[name].shape, name
        np.testing.assert_array_equal(t, want[name], err_msg=name)


def _keys(config, tmp_path) -> dict:
    """The deepseek2.* keys the export writes for `config`, read back (no model needed)."""
    from nanoseek.export import ARCH, _write_hparams

    path = tmp_path / "keys.gguf"
    w = gguf.GGUFWriter(str(path), ARCH)
    _write_hparams(w, gguf, config)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k.removeprefix(ARCH + "."): v for k, v in _fields(gguf.GGUFReader(str(path))).items()}


def test_routing_and_rope_keys_follow_the_config(tmp_path) -> None:
    """The keys that set routing and RoPE in llama.cpp, for configs beside `tiny`'s."""
    tiny = get_preset("tiny")  # noaux_tc, 4 groups of 4 experts
    # One group of several is group-limited routing too (nanoseek's Router keeps that group's experts
    # only): without the keys llama.cpp routed over all 16 experts, and its logits differed.
    kv = _keys(tiny.replace(topk_group=1), tmp_path)
    assert (kv["expert_group_count"], kv["expert_group_used_count"]) == (4, 1)
    kv = _keys(tiny.replace(topk_group=4), tmp_path)  # every group: nothing limited, no keys
    assert "expert_group_count" not in kv and "expert_group_used_count" not in kv
    v2 = dict(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)
    notes = check_exportable(tiny.replace(topk_group=1, **v2))
    assert len(notes) == 1 and "top-2" in notes[0]
    # V2's gate: top-1 is never normalized (HF's `top_k > 1 and norm_topk_prob`), so it is scaled.
    top1 = {**v2, "topk_method": "greedy", "norm_topk_prob": True, "num_experts_per_tok": 1}
    kv = _keys(tiny.replace(**top1, routed_scaling_factor=3.0), tmp_path)
    assert kv["expert_weights_norm"] is False and kv["expert_weights_scale"] == pytest.approx(3.0)
    # A dense model: every layer a leading dense one, whatever first_k_dense_replace says.
    dense = get_preset("tiny-dense").replace(first_k_dense_replace=0)
    kv = _keys(dense, tmp_path)
    assert kv["leading_dense_block_count"] == dense.num_hidden_layers
    # older llama.cpp builds' deepseek2 loader requires expert_weights_scale, routed experts or not
    assert kv["expert_weights_scale"] == 1.0 and "expert_count" not in kv
    # YaRN as DeepSeek ships it; beta_fast and beta_slow default to DeepSeek's 32 and 1.
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    kv = _keys(tiny.replace(rope_scaling={**yarn, "mscale": 0.707, "mscale_all_dim": 0.707}), tmp_path)
    assert kv["rope.scaling.type"] == "yarn"
    assert kv["rope.scaling.factor"] == pytest.approx(4.0)
    assert kv["rope.scaling.original_context_length"] == 256
    assert (kv["rope.scaling.yarn_beta_fast"], kv["rope.scaling.yarn_beta_slow"]) == (32, 1)
    assert kv["rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)  # llama.cpp divides by 0.1
    kv = _keys(tiny.replace(rope_scaling={**yarn, "beta_fast": 24, "beta_slow": 2}), tmp_path)
    assert (kv["rope.scaling.yarn_beta_fast"], kv["rope.scaling.yarn_beta_slow"]) == (24, 2)
    assert "rope.scaling.type" not in _keys(tiny, tmp_path)


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_export_types_quantize_weights_and_keep_norms_and_router_f32(checkpoint, tmp_path, kind) -> None:
    ckpt, model, _ = checkpoint
    out = export_gguf(ckpt, tmp_path / f"tiny-{kind}.gguf", type=kind).path
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == qtype
    assert tensors["blk.1.attn_k_b.weight"].tensor_type == qtype
    for name in ("blk.1.attn_norm.weight", "blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32, name
    for name, t in tensors.items():  # every norm and bias
        assert len(t.shape) > 1 or t.tensor_type == gguf.GGMLQuantizationType.F32, name
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{kind.upper()}")
    assert _fields(gguf.GGUFReader(str(out)))["general.file_type"] == int(file_type)
    t = tensors["token_embd.weight"]
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(model.config.vocab_size, -1)
    ref = model.model.embed_tokens.weight.detach().numpy()
    assert np.abs(back - ref).max() <= 0.01 * np.abs(ref).max()  # 8-bit blocks: well within 1%


def test_an_fp16_checkpoint_exports_exactly_in_f16(checkpoint, tmp_path) -> None:
    """A float16 checkpoint (transformers' torch_dtype float16, F16 tensors: what T4/V100 users train and
    share) had no 16-bit export but bf16, which rounds 3 bits off every weight; llama.cpp's converter
    writes it in f16, its own precision. --type f16 keeps every weight as the file holds it."""
    import torch

    from nanoseek.checkpoint import build_model, read_safetensors, save_model

    ckpt, model, _ = checkpoint
    half = tmp_path / "fp16"
    save_model(build_model(model.config).init_weights(1), half, dtype=torch.float16)
    for f in ckpt.glob("tokenizer*"):
        shutil.copy(f, half / f.name)
    out = tmp_path / "fp16.gguf"
    assert main(["export", str(half), "--gguf", str(out), "--type", "f16"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    t = tensors["token_embd.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    want = read_safetensors(half)["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want)


def test_q8_0_rows_not_in_blocks_of_32_are_written_f16() -> None:
    """As llama.cpp's converter: q8_0 needs whole blocks of 32 per row, another width falls back to f16."""
    import torch

    from nanoseek.export import _encode, _qtype

    q8 = gguf.GGMLQuantizationType.Q8_0
    narrow = torch.ones(4, 48)
    assert _qtype(gguf, narrow, q8, False) == gguf.GGMLQuantizationType.F16
    assert _qtype(gguf, torch.ones(4, 64), q8, False) == q8
    assert _qtype(gguf, torch.ones(4, 64), q8, True) == gguf.GGMLQuantizationType.F32
    data = _encode(gguf, narrow, gguf.GGMLQuantizationType.F16)
    np.testing.assert_array_equal(data.view(np.float16), np.ones((4, 48), np.float16))


def test_a_tied_head_is_not_written_twice() -> None:
    """Tied embeddings: llama.cpp reuses token_embd as the head; no output.weight copy."""
    from nanoseek.checkpoint import build_model
    from nanoseek.export import _gguf_tensors

    model = build_model(get_preset("tiny").replace(vocab_size=640, tie_word_embeddings=True))
    names = [name for name, _, _ in _gguf_tensors(model, gguf)]
    assert "token_embd.weight" in names and "output.weight" not in names


def test_export_defaults_to_bf16_and_prints_a_command_to_paste(checkpoint, tmp_path, capsys) -> None:
    """--help: bf16 is the default type; the llama-cli line names a path with a space as one argument."""
    import shlex

    ckpt, _, _ = checkpoint
    out = tmp_path / "my model.gguf"
    assert main(["export", str(ckpt), "--gguf", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert ", bf16, vocab" in last
    assert shlex.split(last.split("run it with llama.cpp: ")[1]) == ["llama-cli", "-m", str(out)]
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.BF16


def test_export_into_a_reader_that_stops_writes_the_file(checkpoint, tmp_path, monkeypatch) -> None:
    """`nanoseek export ... | head -1`: the progress lines went to stdout, the reader closed it after the
    first, and the next write ended the export before the .gguf was written. Progress is on stderr now."""
    import os
    import sys

    ckpt, _, _ = checkpoint
    out = tmp_path / "m.gguf"
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        assert main(["export", str(ckpt), "--gguf", str(out)]) == 141  # at the summary, the file written
    assert gguf.GGUFReader(str(out)).tensors


def test_export_reads_a_checkpoint_a_crash_left_aside(checkpoint, tmp_path) -> None:
    """A crash between a save's two renames leaves the last checkpoint aside until the next save; chat,
    serve, eval and load_model read it where it lies, and export said "not a checkpoint directory"."""
    ckpt, _, _ = checkpoint
    target = tmp_path / "final"
    shutil.copytree(ckpt, tmp_path / ".final.tmp-old")  # where the swap had put it
    summary = export_gguf(target, tmp_path / "x.gguf", type="f32")
    assert summary.tensors > 0 and (tmp_path / "x.gguf").exists()
    assert not target.exists()  # a reader leaves it there (the writer may be between its renames)
    # the model's name (llama.cpp and ollama show it) is the checkpoint's, not its scratch copy's
    assert _fields(gguf.GGUFReader(str(tmp_path / "x.gguf")))["general.name"] == "final"


def test_export_fetches_a_hub_name_as_every_command_does(checkpoint, tmp_path, monkeypatch) -> None:
    """`nanoseek export owner/name --gguf x.gguf` said "not a checkpoint directory": export read local
    paths only, where chat, serve, generate and load_model fetch a Hub name through huggingface_hub."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(checkpoint[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "someone/tiny-r1", "--gguf", "x.gguf", "--type", "f32"]) == 0
    assert calls == ["someone/tiny-r1"]
    assert _fields(gguf.GGUFReader("x.gguf"))["general.name"] == "tiny-r1"


def test_the_checkpoints_sampling_defaults_go_in_as_llama_cpps_keys(
    checkpoint, tmp_path, monkeypatch
) -> None:
    """generation_config.json's temperature, top_p, top_k and min_p are general.sampling.* (llama.cpp
    samples with them where its flags leave them out; its own converter writes them from that file):
    they were dropped, and llama.cpp sampled a checkpoint `chat` and `serve` decode greedily at its own
    0.8. `do_sample: false` is temperature 0 (greedy); a value out of range is refused before loading."""
    ckpt, _, _ = checkpoint
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05}
    (d / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 1.1}))
    export_gguf(d, tmp_path / "a.gguf", type="f32")
    kv = _fields(gguf.GGUFReader(str(tmp_path / "a.gguf")))
    got = {k: kv.get(f"general.sampling.{k}") for k in ("temp", "top_p", "top_k", "min_p", "penalty_repeat")}
    assert got == {
        "temp": pytest.approx(0.6),
        "top_p": pytest.approx(0.95),
        "top_k": 20,
        "min_p": pytest.approx(0.05),
        "penalty_repeat": None,  # llama.cpp's counts the last 64 tokens, not HF's whole sequence
    }
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    export_gguf(d, tmp_path / "b.gguf", type="f32")
    assert _fields(gguf.GGUFReader(str(tmp_path / "b.gguf")))["general.sampling.temp"] == 0.0
    (d / "generation_config.json").write_text(json.dumps({"top_p": 5}))
    monkeypatch.setattr("nanoseek.checkpoint.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match=r"generation_config\.json: invalid SamplingParams: top_p"):
        export_gguf(d, tmp_path / "c.gguf", type="f32")


def test_export_refuses_clearly(checkpoint, tmp_path, capsys) -> None:
    ckpt, _, tok = checkpoint
    # Not a checkpoint directory.
    assert main(["export", str(tmp_path), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    # A GGUF file, an export's own output: named as one, as every command names it.
    (tmp_path / "done.gguf").write_bytes(b"GGUF" + bytes(60))
    assert main(["export", str(tmp_path / "done.gguf"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "is a GGUF file" in capsys.readouterr().err
    # --gguf naming a directory: said before anything is written, nothing left behind
    (tmp_path / "outdir").mkdir()
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "outdir")]) == 2
    assert "is a directory" in capsys.readouterr().err and not list(tmp_path.glob(".*tmp*"))
    # --gguf naming one of the checkpoint's own files: refused before it is replaced (the weights were lost)
    for own in ("model.safetensors", "config.json"):
        before = (ckpt / own).read_bytes()
        assert main(["export", str(ckpt), "--gguf", str(ckpt / own)]) == 2
        assert "a file of the checkpoint" in capsys.readouterr().err and (ckpt / own).read_bytes() == before
    # ...a file of it that is a link (a Hub snapshot's into blobs/): the write went through to the weights
    linked, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(ckpt, blobs)
    linked.mkdir()
    for f in blobs.iterdir():
        (linked / f.name).symlink_to(f)
    before = (blobs / "model.safetensors").read_bytes()
    assert main(["export", str(linked), "--gguf", str(linked / "model.safetensors")]) == 2
    assert "a file of the checkpoint" in capsys.readouterr().err
    assert (blobs / "model.safetensors").read_bytes() == before
    # --gguf under a file (or on a read-only disk): said before the model is loaded and converted
    (tmp_path / "file").write_text("")
    assert main(["export", str(ckpt), "--gguf", str(tmp_path / "file" / "m.gguf")]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path / 'file'}: Not a directory" in captured.err and "loading" not in captured.err
    # A tokenizer from before the switch to Qwen2's regex: retrain it.
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    spec = json.loads((old / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"[\p{Han}]+|\p{N}|\s+"
    (old / "tokenizer.json").write_text(json.dumps(spec))
    assert main(["export", str(old), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "must be retrained" in err and "qwen2" in err
    assert not (tmp_path / "x.gguf").exists()
    # Configs llama.cpp's deepseek2 loader cannot run.
    with pytest.raises(ValueError, match="26 or 27"):
        check_exportable(get_preset("tiny").replace(num_hidden_layers=27))
    with pytest.raises(ValueError, match="shared experts"):
        check_exportable(get_preset("tiny").replace(n_shared_experts=0))
    with pytest.raises(ValueError, match="128256"):  # 48 layers and Llama 3's vocabulary: V2-Lite's kin
        check_exportable(get_preset("tiny").replace(num_hidden_layers=48, vocab_size=128256))
    # A tokenizer with ids the model has no row for.
    small = tmp_path / "small"
    shutil.copytree(ckpt, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": tok.vocab_size - 1}))
    with pytest.raises(
        ValueError, match=r"tokenizer.json has .* tokens but the model's vocab_size \(.*config.json\) is"
    ):
        export_gguf(small, tmp_path / "x.gguf")
    # V2-Lite's own shape loads (27 layers, full-rank query); so does a full-rank query at any depth.
    assert check_exportable(get_preset("deepseek-v2-lite")) == []
    assert check_exportable(get_preset("tiny-dense")) == []
    # Routed experts that no layer uses (every main layer a leading dense one) need no shared expert:
    # the file is a dense model's, as tiny-dense's is.
    all_dense = get_preset("tiny").replace(n_shared_experts=0, first_k_dense_replace=4)
    assert check_exportable(all_dense) == []
    kv = _keys(all_dense, tmp_path)
    assert kv["leading_dense_block_count"] == 4 and kv["expert_shared_count"] == 0
    assert "expert_count" not in kv and kv["expert_feed_forward_length"] == all_dense.intermediate_size


def test_a_pretrained_model_s_tokenizer_is_sent_to_llama_cpp_s_converter(
    checkpoint, tmp_path, capsys
) -> None:
    """A DeepSeek checkpoint keeps DeepSeek's own tokenizer (digits in threes, a CJK split, its word
    regex): it was told its regex is unknown to llama.cpp (which knows it as "deepseek-v3") and to
    retrain the tokenizer and the model; it is pointed at llama.cpp's converter, which exports it."""
    ckpt, _, _ = checkpoint
    ds = tmp_path / "deepseek"
    shutil.copytree(ckpt, ds)
    spec = json.loads((ds / "tokenizer.json").read_text())
    splits = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", r"\s+(?!\S)|\s+|\S+"]
    split = {"type": "Split", "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    steps = [{**split, "pattern": {"Regex": r}} for r in splits] + [byte_level]
    (ds / "tokenizer.json").write_text(
        json.dumps({**spec, "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}})
    )
    assert main(["export", str(ds), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "not a tokenizer nanoseek trained" in err and "convert_hf_to_gguf.py" in err, err
    assert "must be retrained" not in err
    assert not (tmp_path / "x.gguf").exists()


def test_a_context_length_past_gguf_s_uint32_is_refused_before_loading(checkpoint, tmp_path, capsys) -> None:
    """`max_position_embeddings: 100000000000` (a typo) was a struct.error traceback once the model had
    loaded: GGUF holds the context lengths as uint32."""
    big = tmp_path / "big"
    shutil.copytree(checkpoint[0], big)
    config = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**11}))
    assert main(["export", str(big), "--gguf", str(tmp_path / "x.gguf")]) == 2
    captured = capsys.readouterr()
    assert (
        "max_position_embeddings=100000000000 does not fit" in captured.err and "loading" not in captured.err
    )
    assert not (tmp_path / "x.gguf").exists()
    yarn = {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 2**32}
    with pytest.raises(ValueError, match="rope_scaling.original_max_position_embeddings=4294967296"):
        check_exportable(get_preset("tiny").replace(rope_scaling=yarn))


def test_tokenizer_keys_are_the_tokenizer_s_own(checkpoint, tmp_path) -> None:
    """BOS/EOS ids and add_bos come from the tokenizer, not from nanoseek's usual layout (BOS id 0): a
    vocabulary whose documents start with EOS (no BOS of its own) says so, and adds none."""
    from nanoseek.export import ARCH, _write_tokenizer
    from nanoseek.tokenizer import EOS, LLAMA_CPP_PRE, Tokenizer

    _, model, tok = checkpoint
    no_bos = Tokenizer(tok.backend, bos_token=EOS)
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), ARCH)
    _write_tokenizer(w, gguf, no_bos, model.config.vocab_size, LLAMA_CPP_PRE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kv = _fields(gguf.GGUFReader(str(path)))
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id != 0
    assert kv["tokenizer.ggml.add_bos_token"] is False


def test_export_defaults_warnings_and_tokenizer_refusals(checkpoint, tmp_path, capsys) -> None:
    """`nanoseek export` without --type writes bf16 (as --help says) and prints the tensor count;
    a config llama.cpp runs otherwise warns during the export itself; a checkpoint without a
    tokenizer.json, or with a decoder that is not byte-level, is refused in words; a model vocabulary
    exactly the tokenizer's exports; an unknown type is refused by the API too."""
    ckpt, _, tok = checkpoint
    yarn = tmp_path / "yarn"
    shutil.copytree(ckpt, yarn)
    config = json.loads((yarn / "config.json").read_text())
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0}
    (yarn / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    out = tmp_path / "yarn.gguf"
    with pytest.warns(UserWarning, match="mscale"):
        assert main(["export", str(yarn), "--gguf", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    assert _fields(reader)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_BF16)
    said = capsys.readouterr()
    assert f"writing {len(reader.tensors)} tensors (bf16)" in said.err  # progress, then the summary
    assert (
        f"{len(reader.tensors)} tensors, bf16, vocab {config['vocab_size']}, pre-tokenizer qwen2" in said.out
    )
    with pytest.raises(ValueError, match="--type must be one of f32, f16, bf16, q8_0"):
        export_gguf(ckpt, tmp_path / "x.gguf", type="q4_0")
    # The model's vocabulary exactly the tokenizer's: nothing padded, nothing refused.
    from nanoseek.checkpoint import build_model, save_model

    exact = tmp_path / "exact"
    save_model(build_model(get_preset("tiny").replace(vocab_size=tok.vocab_size)).init_weights(0), exact)
    tok.save(exact)
    assert export_gguf(exact, tmp_path / "exact.gguf", type="f32").vocab_size == tok.vocab_size
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "tokenizer.json").unlink()
    assert main(["export", str(bare), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    (bare / "tokenizer.json").write_text(json.dumps({**spec, "decoder": {"type": "Fuse"}}))
    assert main(["export", str(bare), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "must be retrained" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_rope_scaling_llama_cpp_runs_otherwise_is_said(checkpoint, tmp_path, capsys) -> None:
    """llama.cpp's deepseek2 takes YaRN only in DeepSeek's form (mscale == mscale_all_dim, both set):
    other YaRN forms run with another attention scale (measured: greedy tokens differ from the first
    few), so they warn; Llama 3 scaling it cannot apply at all."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    tiny = get_preset("tiny")
    for ok in ({"mscale": 1.0, "mscale_all_dim": 1.0}, {"mscale": 0.707, "mscale_all_dim": 0.707}):
        assert check_exportable(tiny.replace(rope_scaling={**yarn, **ok})) == []
    for other in ({}, {"mscale": 1.0}, {"mscale_all_dim": 1.0}, {"mscale": 1.0, "mscale_all_dim": 0.707}):
        notes = check_exportable(tiny.replace(rope_scaling={**yarn, **other}))
        assert len(notes) == 1 and "mscale" in notes[0], other
    llama3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(ValueError, match="YaRN only"):
        check_exportable(tiny.replace(rope_scaling={**llama3, "original_max_position_embeddings": 64}))
    # A Qwen2 directory (R1-Distill-Qwen's tokenizer normalizes to NFC, as Qwen2's does) is refused as
    # a grouped-query model, not sent to retrain its tokenizer; so is one without tokenizer.json.
    ckpt, _, _ = checkpoint
    qwen = tmp_path / "qwen2"
    get_preset("tiny-qwen2").replace(vocab_size=640).save(qwen)
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    (qwen / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": {"type": "NFC"}}))
    assert main(["export", str(qwen), "--gguf", str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err
    assert "grouped-query attention" in err and "convert_hf_to_gguf.py" in err, err
    (qwen / "tokenizer.json").unlink()
    assert main(["export", str(qwen), "--gguf", str(tmp_path / "q.gguf")]) == 2
    assert "grouped-query attention" in capsys.readouterr().err


def test_full_rank_query_and_half_split_rope_are_written_for_llama_cpp(checkpoint, tmp_path) -> None:
    """q_lora_rank=None is written as 0 (llama.cpp then reads attn_q at any depth); a checkpoint whose
    RoPE dims are half-split has them reordered into the adjacent pairs llama.cpp rotates."""
    from nanoseek.checkpoint import build_model, save_model

    _, _, tok = checkpoint
    cfg = get_preset("tiny-dense").replace(vocab_size=640, rope_interleave=False)
    model = build_model(cfg).init_weights(0)
    save_model(model, tmp_path / "dense")
    tok.save(tmp_path / "dense")
    out = export_gguf(tmp_path / "dense", tmp_path / "dense.gguf", type="f32").path
    reader = gguf.GGUFReader(str(out))
    kv = _fields(reader)
    assert kv["deepseek2.attention.q_lora_rank"] == 0
    assert kv["deepseek2.leading_dense_block_count"] == cfg.num_hidden_layers
    assert "deepseek2.expert_count" not in kv
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.0.attn_q.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors
    rope, nope, r = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    kv_a = model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.detach().numpy()
    got = np.asarray(tensors["blk.0.attn_kv_a_mqa.weight"].data).reshape(r + rope, -1)
    half = rope // 2
    np.testing.assert_array_equal(got[r::2], kv_a[r : r + half])  # pair i = (dim i, dim i + rope/2)
    np.testing.assert_array_equal(got[r + 1 :: 2], kv_a[r + half :])
    q = (
        model.model.layers[0]
        .self_attn.q_proj.weight.detach()
        .numpy()
        .reshape(cfg.num_attention_heads, nope + rope, -1)
    )
    got_q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(cfg.num_attention_heads, nope + rope, -1)
    np.testing.assert_array_equal(got_q[:, :nope], q[:, :nope])
    np.testing.assert_array_equal(got_q[:, nope::2], q[:, nope : nope + half])


# ------------------------------------------------------------------ llama.cpp itself
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, check):
    """Briefly trained: random weights' flat distributions have near-ties that any rounding flips (in
    nanoseek itself too), which would test the tie, not the export, for bf16 and q8_0."""
    root = tmp_path_factory.mktemp("gguf-trained")
    model, tok = check.make_checkpoint(root / "ckpt", train_steps=20)
    return root / "ckpt", model, tok


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "f32+yarn", "f32+dense"])
def test_llama_cpp_greedy_tokens_equal_nanoseek(request, check, tmp_path, kind) -> None:
    """llama.cpp (llama-cpp-python, built from source) loads the export and decodes as nanoseek does.

    f32 (briefly trained; random weights with YaRN-extended RoPE; a random dense model with a full-rank
    query and half-split RoPE): all 16 greedy tokens equal on all 8 prompts. bf16/q8_0 round the weights (and llama.cpp its activations to match), so a near-tie
    can flip one greedy choice and the rest of that continuation with it: there the first token must
    agree on every prompt and, teacher-forced on nanoseek's continuation, llama.cpp's top-1 must agree
    on at least 90% of positions (measured: bf16 100%, q8_0 99.2%, benchmarks/README.md).
    """
    pytest.importorskip("llama_cpp")
    weights, _, variant = kind.partition("+")
    if variant:
        ckpt = tmp_path / "ckpt"
        model, tok = check.make_checkpoint(ckpt, variant=variant)
    else:
        ckpt, model, tok = request.getfixturevalue("trained_checkpoint")
    out = export_gguf(ckpt, tmp_path / f"tiny-{kind}.gguf", type=weights).path
    results = check.compare(model, tok, out, kind, new_tokens=16)
    assert len(results) == 8
    assert all(r.same_tokenization for r in results), [r.prompt for r in results if not r.same_tokenization]
    if weights == "f32":
        assert all(r.greedy_prefix == r.new_tokens for r in results), [
            (r.prompt, r.greedy_prefix) for r in results
        ]
    else:
        assert all(r.greedy_prefix >= 1 for r in results), [(r.prompt, r.greedy_prefix) for r in results]
        assert np.mean([r.teacher_forced_top1 for r in results]) >= 0.9


def test_bench_llamacpp_refuses_unknown_names_and_exits_nonzero_on_a_failed_run(
    tmp_path, monkeypatch
) -> None:
    """benchmarks/bench_llamacpp.py: a size it does not know is refused (any name but `tiny` built the
    multi-GB `lite`), and a run that failed makes the exit status non-zero, not only a FAILED line."""
    pytest.importorskip("llama_cpp")
    bench = load_benchmark("bench_llamacpp")
    monkeypatch.setattr(bench, "make_checkpoint", lambda size, root, layers: tmp_path / size)
    monkeypatch.setattr(bench, "gguf_file", lambda ckpt, precision: tmp_path / f"{precision}.gguf")
    for flags in (["--sizes", "Tiny"], ["--precisions", "q8_0"], ["--figures", "b8"]):
        with pytest.raises(SystemExit) as e:
            bench.main(["--workdir", str(tmp_path), *flags])
        assert e.value.code == 2
    monkeypatch.setattr(
        bench,
        "spawn",
        lambda engine, *a, **k: {"error": "boom"} if engine == "nanoseek" else {"pp": 1.0},
    )
    args = ["--sizes", "tiny", "--precisions", "bf16", "--figures", "pp", "--repeats", "1"]
    assert bench.main([*args, "--workdir", str(tmp_path), "--no-extra-bufts"]) == 1


def test_export_holds_the_model_once_in_its_own_dtype(checkpoint, tmp_path) -> None:
    """A bf16 checkpoint exported: the model was loaded in fp32 (twice its bytes) and every encoded
    tensor kept until the last was encoded (a third copy), ~1.4x the checkpoint's bytes more than
    loading it took; now the model is held once, in bf16, and each tensor encoded as it is written.
    Peak RSS above the imports, each in a fresh process, on a model whose embedding and head (~33 MB
    each in bf16) dwarf the rest."""
    import subprocess

    import torch

    from nanoseek.checkpoint import build_model, save_model

    ckpt, model, _ = checkpoint
    wide = tmp_path / "wide"
    config = model.config.replace(vocab_size=32000, hidden_size=512, num_nextn_predict_layers=0)
    save_model(build_model(config).init_weights(0), wide, dtype=torch.bfloat16)
    for f in ckpt.glob("tokenizer*"):
        shutil.copy(f, wide / f.name)
    weights = sum(f.stat().st_size for f in wide.glob("*.safetensors"))
    code = """
import sys
import gguf, numpy, torch, nanoseek.checkpoint, nanoseek.export, nanoseek.tokenizer, tqdm
def peak():  # VmHWM, not ru_maxrss: that one starts from the parent's RSS at fork
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
base = peak()
if sys.argv[3] == "load":
    nanoseek.checkpoint.load_model(sys.argv[1], dtype=torch.bfloat16)
else:
    nanoseek.export.export_gguf(sys.argv[1], sys.argv[2], type="bf16")
print(peak() - base)
"""

    def grown(what: str) -> int:
        argv = [sys.executable, "-c", code, str(wide), str(tmp_path / "wide.gguf"), what]
        return int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()[-1])

    # above loading the checkpoint itself: the tensor being encoded (here the 33 MB embedding)
    load, export = grown("load"), grown("export")
    assert export < load + 0.7 * weights


# ------------------------------------------------------------------ properties (hypothesis)
@settings(max_examples=150)
@given(
    rows=st.integers(1, 70),
    cols=st.sampled_from([1, 7, 32, 48, 64, 96, 200]),
    lead=st.sampled_from([(), (3,)]),
    seed=st.integers(0, 2**31),
    magnitude=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e4]),
    kind=st.sampled_from(["f32", "f16", "bf16", "q8_0"]),
    chunk=st.integers(1, 5000),
)
def test_any_tensor_reads_back_as_its_gguf_type_holds_it(
    rows, cols, lead, seed, magnitude, kind, chunk
) -> None:
    """What `_encode` writes, gguf's reader dequantizes to: the tensor itself in f32, torch's own bf16 and
    f16 rounding of it, and q8_0 within half a step of each block of 32 (step: the block's max / 127,
    held in fp16); the rows it encodes at a time change no byte."""
    import nanoseek.engine.quantize as quantize
    from nanoseek.export import _encode, _qtype

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*lead, rows, cols, generator=g) * magnitude
    qtype = _qtype(gguf, w, getattr(gguf.GGMLQuantizationType, kind.upper()), False)
    whole = _encode(gguf, w, qtype)
    saved, quantize.QUANT_CHUNK = quantize.QUANT_CHUNK, chunk
    try:
        assert np.array_equal(_encode(gguf, w, qtype), whole)
    finally:
        quantize.QUANT_CHUNK = saved
    back = torch.from_numpy(np.array(gguf.quants.dequantize(whole, qtype))).reshape(w.shape)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        blocks = w.reshape(-1, 32)
        step = blocks.abs().amax(-1, keepdim=True) / 127
        held = step.half().float()  # the fp16 scale, rounded
        bound = held / 2 + (step - held).abs() * 127
        assert ((back.reshape(-1, 32) - blocks).abs() <= bound * 1.001 + 1e-30).all()
    else:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype.name]
        assert torch.equal(back, w.to(dtype).float())
