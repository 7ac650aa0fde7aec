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
