"""moe-serve's serving ops (`moe_serve::...`), registered straight on the dispatcher.

`torch.library.custom_op` wraps its function in layers (autograd, argument checks) that cost about 10 us a
call: a batch-1 expert call measured 23 us through it against 15 us as registered here (7 us of it the kernel;
timed by a throwaway script, docs/performance.md). A decode step calls these
ops twice per layer with gradients off, so they are plain kernels on the CPU and CUDA keys of a
`torch.library.Library` fragment, each with the fake implementation torch.compile traces. Autograd never reaches
them: training takes other paths (engine.moe.dispatch, dense causal attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

NAMESPACE = "moe_serve"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(schema: str, kernel: Callable[..., Any], fake: Callable[..., Any]) -> None:
    """Define `moe_serve::<schema>`, served by kernel on CPU and CUDA and traced through fake."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    for device in ("CPU", "CUDA"):
        _LIBRARY.impl(name, kernel, device)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)


def returns_nothing(*_: Any) -> None:
    """The fake of an op that only writes into an argument (`Tensor(a!)`, returning `()`): nothing to trace."""


def define_native_op(schema: str, fake: Callable[..., Any]) -> None:
    """Define `moe_serve::<schema>` with only the fake implementation torch.compile traces; its kernels are
    registered in C++ (engine/native_ops.cpp)."""
    _LIBRARY.define(schema)
    torch.library.register_fake(f"{NAMESPACE}::{schema.split('(', 1)[0]}", fake, lib=_LIBRARY)
