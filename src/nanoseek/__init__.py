"""nanoseek: DeepSeek's recipe (V3 model, training, R1 reasoning RL, serving) in one small codebase."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Heavy modules load on first use, so `import nanoseek` and `nanoseek --help` stay fast.
_LAZY = {
    "ModelConfig": "nanoseek.config",
    "get_preset": "nanoseek.config",
    "DeepSeekV3": "nanoseek.model.transformer",
    "load_model": "nanoseek.checkpoint",
    "save_model": "nanoseek.checkpoint",
    "load_tokenizer": "nanoseek.tokenizer",
    "Engine": "nanoseek.engine",
}

if TYPE_CHECKING:
    from nanoseek.checkpoint import load_model, save_model
    from nanoseek.config import ModelConfig, get_preset
    from nanoseek.engine import Engine
    from nanoseek.model.transformer import DeepSeekV3
    from nanoseek.tokenizer import load_tokenizer

__all__ = [
    "DeepSeekV3",
    "Engine",
    "ModelConfig",
    "__version__",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "save_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # the lazy names too: what IPython and editors complete
