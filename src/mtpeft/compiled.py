"""``torch.compile`` for the backbone while a task trains (``TrainConfig.compile``).

What compiling buys on a CPU is fused element-wise work (GELU, layer norm, the adapter's
adds, dtype casts) that eager PyTorch runs as separate kernels. It costs a compilation of
about a minute at the first step (the packaged MiniLM on 2 AMD EPYC cores), so it pays on
long runs only and is off by default; the figures are in RESULTS.md
(``benchmarks/train_speed.py``).

Shapes are compiled as dynamic from the first step: length-bucketed batches change the
sequence length every few steps, and a compilation per length would cost more than it saves.
If compilation fails (an operator the compiler does not handle, a backend missing on the
machine), the step runs eagerly instead, with a warning: ``suppress_errors`` is PyTorch's
own fallback. The backbone leaves the block as it came in: uncompiled, so evaluation and
serving run eagerly, unless its caller had compiled it (``module.compile()``).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn


# One compiled callable per module, kept across runs: a new ``torch.compile`` wrapper is a
# new backend to dynamo's guards, so re-wrapping would compile again on every run. Kept here,
# not on the module, and not holding it: the module still pickles (``torch.save``).
_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()

# Each task trained compiles once (the task's name routes the adapters, and dynamo guards on
# it); past PyTorch's default limit of 8 compilations, later tasks would silently run eagerly.
TASK_COMPILATIONS = 256


@contextlib.contextmanager
def compiled(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """``module`` runs compiled inside the block (dynamic shapes, eager on failure)."""
    if not enabled:
        yield
        return
    import torch._dynamo

    call = _COMPILED.get(module)
    if call is None:
        call = _COMPILED[module] = torch.compile(nn.Module._call_impl, dynamic=True)
    previous = module._compiled_call_impl  # the caller's own ``module.compile()``, if any
    module._compiled_call_impl = functools.partial(call, module)  # as nn.Module.compile sets it
    try:
        limit = max(torch._dynamo.config.recompile_limit, TASK_COMPILATIONS)
        with torch._dynamo.config.patch(suppress_errors=True, recompile_limit=limit):
            yield
    finally:
        module._compiled_call_impl = previous  # calls go to forward again, or to the caller's compilation
