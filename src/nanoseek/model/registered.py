"""Class-level access to what `nn.Module` registers (submodules, parameters, buffers), for hot paths.

`nn.Module` keeps its children, parameters and buffers in its own dicts and finds them in
`__getattr__`, which Python calls only after the normal lookup has failed. On Python 3.11 that failure
is not free: the interpreter builds and formats an `AttributeError`, then discards it, before
`Module.__getattr__` runs: many times a plain attribute's cost per `self.weight`. The engine's
decode step of the speedrun's model made ~118 such lookups; declaring them here removed about a quarter
of the instructions that set it apart from the engine's former hand-flattened forward
(benchmarks/README.md, bench_decode_instructions.py).

Declared on the class (`weight = Registered()`), the name is found by the normal lookup, and this
descriptor reads the same dicts `Module.__getattr__` reads, in the same order. It defines no `__set__`:
assignment still goes through `nn.Module.__setattr__` (registration, a quantized layer replacing a
linear one), and a plain value assigned to the name (`self.shared_experts = None`) lands in the
instance's `__dict__`, which Python reads before a descriptor without `__set__`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Registered:
    """`self.<name>` for a submodule, parameter or buffer registered under the attribute's own name."""

    __slots__ = ("name", "registry")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.registry = "_modules"  # where the name was last found: looked in first

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        d = obj.__dict__
        hinted = d.get(self.registry)
        if hinted is not None:
            found = hinted.get(self.name)
            if found is not None:  # (a name is registered in one dict only: nn.Module refuses a second)
                return found
        for registry in ("_parameters", "_buffers", "_modules"):
            found = d.get(registry)
            if found is not None and self.name in found:
                self.registry = registry
                return found[self.name]
        raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{self.name}'")


def apply_keeping_fp32(
    module: nn.Module, names: tuple[str, ...], fn: Callable[[Any], Any], recurse: bool = True
) -> nn.Module:
    """`nn.Module._apply` (what `.to()`, `.half()`, `.cuda()` run) for a module whose buffers `names`
    must stay fp32 in a model of any dtype: moved with it, never rounded (`build` and `load_model`
    make them fp32; a later `model.to(torch.bfloat16)` must not undo it)."""
    before = {n: module._buffers[n] for n in names}
    nn.Module._apply(module, fn, recurse)
    for n, old in before.items():
        new = module._buffers[n]
        if old is not None and new is not None and new.dtype != torch.float32:
            module._buffers[n] = old.to(device=new.device, dtype=torch.float32)
    return module


class Linear(nn.Linear):
    """`nn.Linear` whose forward finds its own `weight` and `bias` without the failed lookup above
    (torch's reads them through `Module.__getattr__`: two formatted AttributeErrors per call). The
    model's linear layers are these; a layer that must be exactly torch's (`type(m) is nn.Linear`:
    quantizing, packing, FP8 conversion) is matched by `is_plain_linear`."""

    # (mypy compares the descriptor itself with nn.Linear's Tensor; a read returns the registered one)
    weight = Registered()  # type: ignore[assignment]
    bias = Registered()  # type: ignore[assignment]


def is_plain_linear(module: nn.Module) -> bool:
    """A dense linear layer with no storage or arithmetic of its own: torch's or the one above."""
    return type(module) is nn.Linear or type(module) is Linear
