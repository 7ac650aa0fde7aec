"""The DeepSeek-V3 model: Multi-head Latent Attention, DeepSeekMoE, multi-token prediction."""

from nanoseek.model.attention import MultiHeadLatentAttention, RMSNorm, RotaryEmbedding
from nanoseek.model.moe import MLP, MoE, RoutedExperts, Router
from nanoseek.model.transformer import DecoderBlock, DeepSeekV3, MultiTokenPredictionLayer

__all__ = [
    "MLP",
    "DecoderBlock",
    "DeepSeekV3",
    "MoE",
    "MultiHeadLatentAttention",
    "MultiTokenPredictionLayer",
    "RMSNorm",
    "RotaryEmbedding",
    "RoutedExperts",
    "Router",
]
