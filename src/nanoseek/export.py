"""GGUF export: a nanoseek checkpoint as a file llama.cpp (and ollama) load, architecture "deepseek2".

What is notable here:
- llama.cpp runs DeepSeek-V2/V3 as one architecture, "deepseek2". Its MLA runs the absorbed path
  (DeepSeek-V2 §2.1.2): `kv_b_proj` is split per head into the key half, transposed so it folds into
  the query (`attn_k_b`), and the value half that folds into the output (`attn_v_b`); the latent and
  the RoPE key are the one-"head" cache (head_count_kv = 1, key length kv_lora_rank + rope dims).
- Routed experts are written stacked (`ffn_{gate,up,down}_exps`), as nanoseek already holds them.
  Sigmoid or softmax gating, the selection-only bias `e_score_correction_bias` (`exp_probs_b`), the
  top-k normalization and `routed_scaling_factor`, and group-limited routing go in as keys.
- MTP modules are left out: llama.cpp decodes with the main model only.
- The tokenizer goes in whole (tokens, types, merges, BOS/EOS/PAD, the chat template) with
  `tokenizer.ggml.pre` naming the split regex; llama.cpp applies its own copy of the regex for that
  name, so only a tokenizer with exactly that regex is exported (`nanoseek.tokenizer.LLAMA_CPP_PRE`).
- The checkpoint's sampling defaults (generation_config.json's temperature, top_p, top_k, min_p;
  `do_sample: false` as temperature 0, greedy) go in as `general.sampling.*`, which llama.cpp takes where
  its flags leave them out, as llama.cpp's own converter writes them from that file.
- Weights in f32, f16, bf16 or q8_0 (blocks of 32 with one fp16 scale); norms, the router and biases
  stay f32, as llama.cpp's own converter keeps them. f16 is an fp16 checkpoint's own precision (bf16
  would round off 3 bits of each weight), as llama.cpp's converter writes one.
- Memory: the model is loaded once, in the files' own 16-bit dtype where that is exact
  (`checkpoint.exact_dtype`), and each tensor encoded as it is written: the peak is the load's.
The reference for key and tensor names is llama.cpp's loader (`src/models/deepseek2.cpp`), which
decides what a file must hold.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoseek.atomic import atomic_file, check_writable, directory_to_read
from nanoseek.config import ModelConfig

if TYPE_CHECKING:  # torch and tokenizers load on use: `nanoseek --help` imports this module
    import torch

    from nanoseek.model import DeepSeekV3
    from nanoseek.tokenizer import Tokenizer

ARCH = "deepseek2"
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")


# llama.cpp 0.3.x reads the layer count as a model identity: 26 or 27 layers (or 48 with a 128256
# vocabulary) is taken for DeepSeek-V2-Lite and its kin, whose query is full rank; the loader then never
# reads q_lora_rank and asks for a full-rank `attn_q`. Any other layer count must state q_lora_rank,
# which we write as 0 for a full-rank query (the loader then looks for `attn_q` itself).
def _llama_cpp_takes_for_lite(config: ModelConfig) -> bool:
    n = config.num_hidden_layers
    return n in (26, 27) or (n == 48 and config.vocab_size == 128256)


@dataclass
class ExportSummary:
    path: Path
    type: str
    tensors: int
    bytes: int
    vocab_size: int
    pre_tokenizer: str


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # an optional dependency: only export needs it
        raise ValueError(
            "GGUF export needs the `gguf` package: pip install 'gguf>=0.18' (or pip install 'nanoseek[gguf]')"
        ) from e
    return gguf


def _has_moe_layers(config: ModelConfig) -> bool:
    """Whether any exported layer is an MoE one: a config with routed experts can still make every main
    layer dense (first_k_dense_replace), and llama.cpp then reads it as the dense model it is."""
    return any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def check_exportable(config: ModelConfig) -> list[str]:
    """Raise ValueError for a config llama.cpp's deepseek2 cannot run; return warnings for ones it
    runs differently from nanoseek."""
    notes: list[str] = []
    n = config.num_hidden_layers
    # GGUF holds the context lengths as uint32: a larger one (a typo) was a struct.error mid-write
    contexts = {"max_position_embeddings": config.max_position_embeddings}
    if config.rope_scaling and "original_max_position_embeddings" in config.rope_scaling:
        contexts["rope_scaling.original_max_position_embeddings"] = config.rope_scaling[
            "original_max_position_embeddings"
        ]
    for name, value in contexts.items():
        if not 0 < int(value) < 2**32:
            raise ValueError(
                f"{name}={value} does not fit GGUF's context length (a 32-bit unsigned integer): "
                "correct config.json"
            )
    if config.attention_variant != "mla":
        raise ValueError(
            f"--gguf writes llama.cpp's deepseek2 (MLA) layout; this is a {config.model_type} model "
            "(grouped-query attention): its directory is already in Hugging Face's layout, which "
            "llama.cpp's own convert_hf_to_gguf.py reads"
        )
    if _llama_cpp_takes_for_lite(config) and config.q_lora_rank is not None:
        raise ValueError(
            f"llama.cpp cannot load this model: with {n} layers (as with 26 or 27, or 48 and a "
            "128256-token vocabulary) its deepseek2 loader assumes DeepSeek-V2-Lite's full-rank query "
            f"and ignores q_lora_rank, but this config has q_lora_rank={config.q_lora_rank}. Use another "
            "layer count, or q_lora_rank=None"
        )
    if _has_moe_layers(config):
        if not config.n_shared_experts:
            raise ValueError(
                "llama.cpp cannot load this model: its deepseek2 MoE layers need shared experts "
                "(n_shared_experts >= 1), this config has none"
            )
        if int(config.extra.get("moe_layer_freq", 1)) != 1:
            raise ValueError(
                "llama.cpp cannot load this model: it makes every layer after first_k_dense_replace an "
                f"MoE layer, this config has moe_layer_freq={config.extra['moe_layer_freq']}"
            )
        if config.topk_method == "group_limited_greedy" and config.topk_group < config.n_group:
            notes.append(
                "llama.cpp ranks expert groups by the sum of their top-2 scores (DeepSeek-V3's rule); "
                "this V2 config ranks them by their best score, so routing can differ in llama.cpp"
            )
    rs = config.rope_scaling
    if rs and rs.get("type", rs.get("rope_type")) == "llama3":
        raise ValueError(
            "llama.cpp cannot run this model as nanoseek does: its deepseek2 scales RoPE with YaRN only, "
            "this config has Llama 3 rope_scaling"
        )
    if rs:
        from nanoseek.model.attention import rope_inverse_frequencies

        # llama.cpp's deepseek2 takes YaRN in DeepSeek's own form, mscale == mscale_all_dim: RoPE's
        # YaRN magnitude 1 and mscale_all_dim folded into the softmax scale. Any other form (no
        # mscale_all_dim, mscale != mscale_all_dim, an attention_factor) scales attention otherwise.
        _, rope_mscale = rope_inverse_frequencies(config)
        if not rs.get("mscale_all_dim") or abs(rope_mscale - 1.0) > 1e-6:
            notes.append(
                f"YaRN with mscale={rs.get('mscale')}, mscale_all_dim={rs.get('mscale_all_dim')}: "
                "llama.cpp's deepseek2 scales attention as DeepSeek's configs do (mscale == "
                "mscale_all_dim, both set), so attention and the tokens can differ from nanoseek's"
            )
    return notes


def export_gguf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    type: str = "bf16",
    progress: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Write the checkpoint directory `checkpoint` (config.json, safetensors, tokenizer.json) to the
    GGUF file `out` with weights in `type` (f32, f16, bf16 or q8_0)."""
    import numpy as np
    from tqdm import tqdm

    from nanoseek.tokenizer import LLAMA_CPP_PRE, SPLIT_PATTERN, llama_cpp_pre_tokenizer

    gguf = _gguf()
    say = progress or (lambda _msg: None)
    if type not in GGUF_TYPES:
        raise ValueError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {type!r}")
    from nanoseek.checkpoint import is_hub_name, resolve_checkpoint

    # a Hub name fetched as every other command fetches it (it was "not a checkpoint directory")
    if is_hub_name(checkpoint):
        src = resolve_checkpoint(checkpoint)
    else:  # as load_model reads it: `~`, a copy left aside
        src = directory_to_read(Path(checkpoint).expanduser())
    if not src.is_dir() or not (src / "config.json").exists():
        from nanoseek.checkpoint import GGUF_FILE, _is_gguf

        if _is_gguf(src):  # an export given back to export: named as every other command names it
            raise ValueError(f"{src} is {GGUF_FILE}: give the checkpoint directory it was exported from")
        raise ValueError(
            f"{src} is not a checkpoint directory (expected config.json, model.safetensors and "
            "tokenizer.json, as every nanoseek stage writes)"
        )
    path = Path(out)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory: --gguf takes the file to write, such as {path / 'model.gguf'}"
        )
    # --gguf naming one of the checkpoint's own files (model.safetensors, config.json, a shard): the
    # export read the weights, then replaced that file with the GGUF, and the checkpoint was lost. By
    # its path in the directory as well as by its target: a file there may be a link (a Hub snapshot's
    # into blobs/, `hf download --local-dir`'s older copies), which the write goes through to.
    own = {f.resolve() for f in src.iterdir()}
    if (
        path.exists()
        and path.suffix != ".gguf"
        and (path.parent.resolve() == src.resolve() or path.resolve() in own)
    ):
        raise ValueError(
            f"--gguf {path} is a file of the checkpoint being exported, which the export would replace: "
            f"name a new file, such as {path.parent / 'model.gguf'}"
        )
    check_writable(path.parent)  # a read-only disk: said now, not once every tensor is converted
    # The model first: a family llama.cpp's deepseek2 cannot run is refused as such, whatever its tokenizer.
    config = ModelConfig.load(src)
    for note in check_exportable(config):
        warnings.warn(note, stacklevel=2)
    if not (src / "tokenizer.json").exists():
        raise ValueError(
            f"{src} has no tokenizer.json: a GGUF file carries its tokenizer, copy the run's tokenizer "
            "files (tokenizer.json, tokenizer_config.json) into the checkpoint directory"
        )
    from nanoseek.checkpoint import exact_dtype, load_model
    from nanoseek.engine.sampling import generation_defaults
    from nanoseek.tokenizer import checkpoint_tokenizer

    tok = checkpoint_tokenizer(src, config)
    pre = llama_cpp_pre_tokenizer(tok)
    if pre is None or not tok.is_byte_level:
        # A split regex of nanoseek's (today's, or a former one: they all named \p{Han}) is a run of
        # ours; any other tokenizer is a pretrained model's (DeepSeek's own: llama.cpp knows its regex by
        # another name), which was told to retrain its tokenizer and the model on it: llama.cpp's own
        # converter takes such a directory.
        spec = json.loads(tok.backend.to_str()).get("pre_tokenizer") or {}
        regexes = [str((s.get("pattern") or {}).get("Regex")) for s in spec.get("pretokenizers") or [spec]]
        if not any(r == SPLIT_PATTERN or r"\p{Han}" in r for r in regexes):
            raise ValueError(
                f"{src}/tokenizer.json is not a tokenizer nanoseek trained (its pre-tokenizer is another "
                f"model's), and --gguf writes nanoseek's own only (llama.cpp's {LLAMA_CPP_PRE!r} split "
                "regex): llama.cpp's own convert_hf_to_gguf.py, which knows pretrained models' tokenizers, "
                "reads this directory"
            )
        raise ValueError(
            f"{src}/tokenizer.json splits text with a regex llama.cpp does not know, so llama.cpp would "
            "tokenize prompts differently from the trained model. Tokenizers trained before nanoseek "
            f"switched to Qwen2's split regex (llama.cpp's {LLAMA_CPP_PRE!r}) must be retrained "
            "(nanoseek tokenizer train) and the model trained on it, to export to GGUF"
        )
    # a value out of range in the file refused now, as `serve` refuses it, not after the weights load
    sampling = generation_defaults(tok.generation_config, src / "generation_config.json")
    say(f"loading {src}")
    # In the files' own dtype where that holds them exactly (a bf16 checkpoint in bf16): fp32 doubled
    # the memory of the model held while it is written, for the same values (each tensor goes through
    # fp32 as it is encoded).
    model = load_model(src, dtype=exact_dtype(src))
    config = model.config  # load_model may drop MTP layers the files do not hold
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[type]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[type]

    with atomic_file(path) as tmp:  # a half-written file must never look like an export
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            writer.add_name(Path(checkpoint).expanduser().resolve().name)  # not a copy's `.NAME.tmp-old`
            writer.add_file_type(int(file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_hparams(writer, gguf, config)
            _write_tokenizer(writer, gguf, tok, config.vocab_size, pre)
            _write_sampling(writer, sampling)
            # Tensor by tensor: the header first (shapes and types, from the model's tensors), then
            # each tensor encoded as it is written. add_tensor kept every encoded tensor in memory
            # until write_tensors_to_file: a second copy of the model beside the one loaded.
            total = 0
            for name, tensor, keep_f32 in _gguf_tensors(model, gguf):
                kind = _qtype(gguf, tensor, qtype, keep_f32)
                shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, kind)
                writer.add_tensor_info(name, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=kind)
                total += math.prod(shape)
            n_tensors = len(writer.tensors[0])
            say(f"writing {n_tensors} tensors ({type}) to {path}")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(
                total=total, unit="B", unit_scale=True, desc="Writing", disable=progress is None
            ) as bar:
                for _, tensor, keep_f32 in _gguf_tensors(model, gguf):
                    data = _encode(gguf, tensor, _qtype(gguf, tensor, qtype, keep_f32))
                    writer.write_tensor_data(data)
                    bar.update(data.nbytes)
        finally:
            writer.close()
    return ExportSummary(path, type, n_tensors, path.stat().st_size, config.vocab_size, pre)


# ------------------------------------------------------------------ keys
def _write_hparams(w: Any, gguf: Any, c: ModelConfig) -> None:
    n, moe = c.num_hidden_layers, _has_moe_layers(c)
    w.add_vocab_size(c.vocab_size)
    w.add_block_count(n)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    # MLA as llama.cpp sees it: one shared KV "head" (latent + RoPE key), MQA over the absorbed query;
    # the *_mla lengths are the per-head sizes after decompression, which set the softmax scale.
    w.add_q_lora_rank(c.q_lora_rank or 0)
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_head_count_kv(1)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    # DeepSeekMoE. The loader requires the expert keys even for a model without routed experts.
    w.add_leading_dense_block_count(c.first_k_dense_replace if moe else n)
    w.add_expert_feed_forward_length(c.moe_intermediate_size if moe else c.intermediate_size)
    w.add_expert_shared_count((c.n_shared_experts or 0) if moe else 0)
    if not moe:
        # Older llama.cpp builds read this key whatever the layers: without it a dense file did not load
        # there ("key not found: deepseek2.expert_weights_scale"); newer ones never use it without experts.
        w.add_expert_weights_scale(1.0)
    if moe:
        k = c.num_experts_per_tok or 0
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(k)
        gating = gguf.ExpertGatingFuncType
        w.add_expert_gating_func(gating.SIGMOID if c.scoring_func == "sigmoid" else gating.SOFTMAX)
        # nanoseek's Router: top-k weights are normalized when norm_topk_prob (V2: and k > 1); V3
        # then scales by routed_scaling_factor, V2's gate normalizes *instead of* scaling.
        norm = c.norm_topk_prob and (k > 1 or c.topk_method == "noaux_tc")
        w.add_expert_weights_norm(norm)
        scaled = not norm or c.topk_method == "noaux_tc"
        w.add_expert_weights_scale(c.routed_scaling_factor if scaled else 1.0)
        # Group-limited routing only where nanoseek's Router applies it and it limits anything (one
        # group of several limits the most; llama.cpp also rejects topk_group == n_group).
        if c.topk_method in ("noaux_tc", "group_limited_greedy") and c.topk_group < c.n_group:
            w.add_expert_group_count(c.n_group)
            w.add_expert_group_used_count(c.topk_group)
    rs = c.rope_scaling
    if rs:  # YaRN (config.py accepts no other scaling)
        factor = rs["factor"]
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
        # llama.cpp's deepseek2 stores 0.1 * mscale_all_dim here and divides the 0.1 back out on load.
        if rs.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))


def _write_tokenizer(w: Any, gguf: Any, tok: Tokenizer, vocab_size: int, pre: str) -> None:
    spec = json.loads(tok.backend.to_str())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size  # ids the model has and the tokenizer never makes
    for token, i in tok.backend.get_vocab(with_added_tokens=False).items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for i, added in tok.backend.get_added_tokens_decoder().items():
        # Special tokens (BOS/EOS/PAD) are control tokens, dropped from llama.cpp's detokenized text as
        # from nanoseek's with skip_special_tokens; the chat tags are user-defined: always one id and
        # kept in text, as DeepSeek-R1 keeps them.
        kind = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        tokens[i], types[i] = added.content, int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(tok.add_bos_token)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _write_sampling(w: Any, sampling: dict[str, float]) -> None:
    """`generation_defaults` as llama.cpp's general.sampling.* keys: the fields llama.cpp's converter takes
    from generation_config.json (its repetition penalty counts only the last 64 tokens: not written)."""
    keys = {
        "temperature": w.add_sampling_temp,
        "top_p": w.add_sampling_top_p,
        "top_k": w.add_sampling_top_k,
        "min_p": w.add_sampling_min_p,
    }
    for name, value in sampling.items():
        if name in keys:
            keys[name](value)


# ------------------------------------------------------------------ tensors
def _gguf_tensors(model: DeepSeekV3, gguf: Any) -> Any:
    """(GGUF name, tensor, kept in f32) for every tensor llama.cpp reads, MTP left out.

    Arrays keep PyTorch's [out, in] layout: GGUF lists dimensions innermost first, so llama.cpp sees
    {in, out} as it expects."""
    import torch

    c: ModelConfig = model.config
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES

    def name(t: Any, bid: int | None = None, suffix: str = "weight") -> str:
        return f"{names[t].format(bid=bid)}.{suffix}"

    def arr(t: torch.Tensor) -> torch.Tensor:
        return t.detach()  # converted to fp32 as it is encoded (`_encode`), a few rows at a time

    backbone = model.model
    yield name(T.TOKEN_EMBD), arr(backbone.embed_tokens.weight), False
    yield name(T.OUTPUT_NORM), arr(backbone.norm.weight), True
    if not c.tie_word_embeddings:  # tied: llama.cpp reuses token_embd as the head
        yield name(T.OUTPUT), arr(model.lm_head.weight), False
    h, nope, rope, v = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    # llama.cpp rotates adjacent pairs (2i, 2i+1), DeepSeek's layout (`rope_interleave`); a checkpoint
    # in the half-split layout has its RoPE rows reordered into pairs, for queries and keys alike, which
    # leaves every q·k unchanged.
    pairs = None if c.rope_interleave else torch.arange(rope).view(2, -1).t().flatten()
    for i, block in enumerate(backbone.layers):
        attn, mlp = block.self_attn, block.mlp
        yield name(T.ATTN_NORM, i), arr(block.input_layernorm.weight), True
        yield name(T.FFN_NORM, i), arr(block.post_attention_layernorm.weight), True
        q = attn.q_proj.weight if c.q_lora_rank is None else attn.q_b_proj.weight
        if pairs is not None:
            q = q.view(h, nope + rope, -1)
            q = torch.cat((q[:, :nope], q[:, nope:][:, pairs]), dim=1).flatten(0, 1)
        if c.q_lora_rank is None:
            yield name(T.ATTN_Q, i), arr(q), False
        else:
            yield name(T.ATTN_Q_A, i), arr(attn.q_a_proj.weight), False
            yield name(T.ATTN_Q_A_NORM, i), arr(attn.q_a_layernorm.weight), True
            yield name(T.ATTN_Q_B, i), arr(q), False
        kv_a = attn.kv_a_proj_with_mqa.weight
        if pairs is not None:
            kv_a = torch.cat((kv_a[: c.kv_lora_rank], kv_a[c.kv_lora_rank :][pairs]))
        yield name(T.ATTN_KV_A_MQA, i), arr(kv_a), False
        yield name(T.ATTN_KV_A_NORM, i), arr(attn.kv_a_layernorm.weight), True
        # kv_b_proj [H*(nope+v), kv_lora] -> per head: key half transposed to [H, kv_lora, nope] (it
        # multiplies q_nope to give the query in latent space), value half [H, v, kv_lora].
        kv_b = attn.kv_b_proj.weight.view(h, nope + v, c.kv_lora_rank)
        yield name(T.ATTN_K_B, i), arr(kv_b[:, :nope].transpose(1, 2)), False
        yield name(T.ATTN_V_B, i), arr(kv_b[:, nope:]), False
        yield name(T.ATTN_OUT, i), arr(attn.o_proj.weight), False
        if not c.is_moe_layer(i):
            yield name(T.FFN_GATE, i), arr(mlp.gate_proj.weight), False
            yield name(T.FFN_UP, i), arr(mlp.up_proj.weight), False
            yield name(T.FFN_DOWN, i), arr(mlp.down_proj.weight), False
            continue
        # The router stays f32 (as llama.cpp's converter keeps it): a rounded score can flip an expert.
        yield name(T.FFN_GATE_INP, i), arr(mlp.gate.weight), True
        if c.topk_method == "noaux_tc":
            yield name(T.FFN_EXP_PROBS_B, i, "bias"), arr(mlp.gate.e_score_correction_bias), True
        inter = mlp.experts.intermediate_size
        gate_up = mlp.experts.gate_up_proj  # [E, 2I, H]: gate rows, then up rows
        yield name(T.FFN_GATE_EXP, i), arr(gate_up[:, :inter]), False
        yield name(T.FFN_UP_EXP, i), arr(gate_up[:, inter:]), False
        yield name(T.FFN_DOWN_EXP, i), arr(mlp.experts.down_proj), False
        shared = mlp.shared_experts
        yield name(T.FFN_GATE_SHEXP, i), arr(shared.gate_proj.weight), False
        yield name(T.FFN_UP_SHEXP, i), arr(shared.up_proj.weight), False
        yield name(T.FFN_DOWN_SHEXP, i), arr(shared.down_proj.weight), False


def _qtype(gguf: Any, tensor: torch.Tensor, qtype: Any, keep_f32: bool) -> Any:
    """The GGUF type `tensor` is written in: f32 where it is kept so, else `qtype`; q8_0 needs rows in
    blocks of 32, and a matrix whose rows are not falls back to f16, as in llama.cpp's converter."""
    if keep_f32:
        return gguf.GGMLQuantizationType.F32
    if tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _encode(gguf: Any, tensor: torch.Tensor, qtype: Any) -> Any:
    """`tensor` as GGUF type `qtype`'s bytes (a uint8 array, one row of bytes per row), converted and
    encoded a few rows at a time: a whole 102400 x 2048 embedding in fp32, and q8_0's temporaries of
    it, took several times its bytes at once."""
    import numpy as np

    from nanoseek.engine.quantize import QUANT_CHUNK

    rows = tensor.reshape(-1, tensor.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(rows.shape, qtype), np.uint8)
    step = max(1, QUANT_CHUNK // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        block = rows[i : i + step].float().contiguous().numpy()
        out[i : i + step] = gguf.quants.quantize(block, qtype).view(np.uint8)
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(tensor.shape, qtype))
