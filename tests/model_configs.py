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
