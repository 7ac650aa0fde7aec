"""nanoseek's inference engine: token ids in, token ids out (see engine.py for the tour).

from nanoseek.engine import Engine, SamplingParams
engine = Engine(model, max_batch_size=16, speculative=True)
engine.generate([[1, 2, 3]], max_new_tokens=32)
"""

from nanoseek.engine.cache import EngineCapacityError, PagedLatentCache
from nanoseek.engine.engine import Completion, Engine, StepEvent
from nanoseek.engine.sampling import SamplingParams, TokenLogprob

__all__ = [
    "Completion",
    "Engine",
    "EngineCapacityError",
    "PagedLatentCache",
    "SamplingParams",
    "StepEvent",
    "TokenLogprob",
]
