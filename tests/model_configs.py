"""A small DeepSeek-V3 shape with every feature on (low-rank q, groups, dense first layer), for tests."""

from nanoseek.config import ModelConfig


def small_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        max_position_embeddings=256,
        torch_dtype="float32",
    )
    base.update(changes)
    return ModelConfig(**base)


def assert_greedy(model, prompts, outputs) -> None:
    """Each generated token is the model's argmax after the prompt and the tokens before it (ties within
    1e-4 allowed): the engine decoded what a full forward pass would have chosen."""
    import torch

    for prompt, got in zip(prompts, outputs, strict=True):
        seq = list(prompt)
        with torch.no_grad():
            for token in got:
                logits = model(torch.tensor([seq]))[0, -1]
                assert logits[token] >= logits.max() - 1e-4, (seq, token, logits)
                seq.append(token)


def mla_configs(model_types=("deepseek_v3", "deepseek_v2"), hidden_sizes=(8, 12, 16, 24)):
    """A hypothesis strategy: any small valid DeepSeek (MLA) config. Heads 1, 2 or 4 (transformers wants
    hidden_size divisible by them), low-rank query or none, odd head sizes, experts or none in groups of
    1-3 with every valid k / topk_group, both scoring functions and every topk_method, normalized or
    not, a dense prefix, every other layer MoE, YaRN or plain RoPE, tied embeddings, an MTP layer."""
    from hypothesis import strategies as st

    @st.composite
    def draw_config(draw) -> ModelConfig:
        n_group, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        experts = n_group * per_group if draw(st.booleans()) else 0
        k = draw(st.integers(1, experts)) if experts else 0
        layers = draw(st.integers(1, 3))
        method = draw(st.sampled_from(["noaux_tc", "greedy", "group_limited_greedy"]))
        if method == "noaux_tc" and n_group > 1 and per_group < 2:  # (refused: a group's top-2 sum)
            method = "greedy"
        rope_scaling = None
        if draw(st.booleans()):
            rope_scaling = {
                "type": "yarn",
                "factor": draw(st.sampled_from([2.0, 4.0])),
                "original_max_position_embeddings": draw(st.sampled_from([8, 16])),
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": draw(st.sampled_from([1.0, 0.707])),
                "mscale_all_dim": draw(st.sampled_from([0.0, 1.0, 0.707])),
            }
        return ModelConfig(
            model_type=draw(st.sampled_from(model_types)),
            vocab_size=draw(st.integers(8, 40)),
            hidden_size=draw(st.sampled_from(hidden_sizes)),
            intermediate_size=draw(st.integers(1, 24)),
            moe_intermediate_size=draw(st.integers(1, 12)),
            num_hidden_layers=layers,
            num_attention_heads=draw(st.sampled_from([1, 2, 4])),
            q_lora_rank=draw(st.none() | st.integers(1, 16)),
            kv_lora_rank=draw(st.integers(1, 16)),
            qk_nope_head_dim=draw(st.integers(0, 8)),
            qk_rope_head_dim=draw(st.sampled_from([2, 4, 6])),
            v_head_dim=draw(st.integers(1, 8)),
            n_routed_experts=experts,
            n_shared_experts=draw(st.integers(0, 2)),
            num_experts_per_tok=k,
            n_group=n_group if experts else 1,
            topk_group=draw(st.integers(-(-k // per_group), n_group)) if experts else 1,
            routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.5])),
            scoring_func=draw(st.sampled_from(["sigmoid", "softmax"])),
            topk_method=method,
            norm_topk_prob=draw(st.booleans()),
            first_k_dense_replace=draw(st.integers(0, layers)),
            num_nextn_predict_layers=draw(st.integers(0, 1)),
            rope_interleave=draw(st.booleans()),
            tie_word_embeddings=draw(st.booleans()),
            rope_scaling=rope_scaling,
            max_position_embeddings=64,
            torch_dtype="float32",
            extra={"moe_layer_freq": draw(st.integers(1, 2))} if draw(st.booleans()) else {},
        )

    return draw_config()


def bf16_copy(checkpoint, out):
    """A copy of a checkpoint directory stored in bf16 (a DeepSeek or R1-distill release's storage),
    tokenizer files included; returns its path."""
    import shutil
    from pathlib import Path

    import torch

    import nanoseek
    from nanoseek.checkpoint import save_model

    save_model(nanoseek.load_model(checkpoint), out, dtype=torch.bfloat16)
    for f in Path(checkpoint).iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, Path(out) / f.name)
    return Path(out)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_tokenizer(directory):
    """Qwen2.5-Instruct's tokenizer files in miniature: byte-level BPE with ChatML's tokens and template
    (no think block: its generation prompt is `<|im_start|>assistant\\n`), EOS <|im_end|>; the backend."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return backend


def sentencepiece_tokenizer(directory, pieces=("▁", "▁The", "▁capital", "▁is", "▁Paris", ".")):
    """A Llama-2-style vocabulary in miniature: byte-fallback BPE whose decoder strips a text's leading
    space (so a reply decoded alone loses its first word's); loaded as nanoseek's Tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    from nanoseek.tokenizer import load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in pieces:
        vocab[piece] = len(vocab)
    backend = Backend(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(directory / "tokenizer.json"))
    return load_tokenizer(directory)


def chatml_checkpoint(directory, generation: dict | None = None, vocab_size: int | None = None):
    """A tiny Qwen2 checkpoint as Qwen2.5-Instruct ships (`chatml_tokenizer`), with `generation` as its
    generation_config.json (default: both of Qwen's stop ids); `vocab_size` pads the embeddings past the
    tokenizer, as Qwen's 151,936 rows do."""
    import json

    import transformers

    backend = chatml_tokenizer(directory)
    end, text_end = backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")
    hf = transformers.Qwen2Config(
        vocab_size=vocab_size or backend.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=end,
    )
    transformers.AutoModelForCausalLM.from_config(hf).save_pretrained(directory)
    generation = generation or {"eos_token_id": [end, text_end]}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory
