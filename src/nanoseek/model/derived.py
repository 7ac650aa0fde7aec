"""Weights derived from a module's own for inference, kept until a source weight changes.

MLA's absorbed path folds `kv_b_proj` into the query and output projections (V2 §2.1.3); the engine's
MoE decode stacks the shared expert beside the routed ones. Both are built once and must be rebuilt
when a source changes: in place (a GRPO optimizer step on the model an engine serves: the tensor's
version counter moves), or replaced (`model.to(dtype)`, a checkpoint assigned: its storage or dtype
moves). `DerivedWeights` holds one such value and that key of its sources.

Reading the key costs a few Python attribute reads per source tensor, per layer, per forward: a
noticeable share of a small model's decode step. An engine already compares every parameter's
version once per step (its prefix cache goes stale with the weights), so it runs its forwards under
`weights_epoch(epoch)`, one object per span of steps with unchanged versions. A value checked under
the current epoch is returned without reading its key again. Values of modules that did not run in
every step (MTP layers, drafting only when speculating) are still checked once per epoch, so a change
they did not see is never missed. Outside an epoch (training, a plain `model(...)` call) every read
checks the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

_epoch: object | None = None  # see weights_epoch


class weights_epoch:  # noqa: N801 (a context manager, used like a function)
    """`with weights_epoch(epoch):` forwards inside run with weights that have not changed since
    `epoch` (any object) was made: the caller vouches for it, and makes a new object whenever a
    weight may have changed. (A class, not a generator: it is entered once per engine step.)"""

    __slots__ = ("epoch", "outer")

    def __init__(self, epoch: object) -> None:
        self.epoch = epoch
        self.outer: object | None = None

    def __enter__(self) -> None:
        global _epoch
        self.outer, _epoch = _epoch, self.epoch

    def __exit__(self, *exc: object) -> None:
        global _epoch
        _epoch = self.outer


class DerivedWeights(Generic[T]):
    """One value derived from some weights; `get` rebuilds it when a source has changed."""

    __slots__ = ("_built", "_epoch", "_key", "_value")

    def __init__(self) -> None:
        self._built = False
        self._epoch: object | None = None
        self._key: list[tuple[int, int, torch.dtype]] = []
        self._value: T | None = None

    def get(self, sources: Callable[[], Iterable[torch.Tensor]], build: Callable[[], T]) -> T:
        """The value `build()` returns (run without autograd), rebuilt when one of the tensors
        `sources()` yields has changed since it was built."""
        if self._built and _epoch is not None and self._epoch is _epoch:
            return self._value  # type: ignore[return-value]
        key = [(t._version, t.data_ptr(), t.dtype) for t in sources()]
        if not self._built or key != self._key:
            with torch.no_grad():
                self._value = build()
            self._key, self._built = key, True
        self._epoch = _epoch
        return self._value  # type: ignore[return-value]
