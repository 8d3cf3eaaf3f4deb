"""Regional ``torch.compile`` of a :class:`~mag.models.dit.WanDiT` for streaming, applied from
outside.

Compiled: per transformer block everything but the cached attention (``before_cache``,
``after_cache``), and the time embedding, time projection and head: fixed shapes per block, one
graph for every layer. Eager: :meth:`~mag.models.attention.SelfAttention.attend_cached` (cache read,
attention, cache write), whose shapes follow host-side slot bookkeeping.
:meth:`CompiledModules.restore` puts the eager callables back (a compile failure surfaces on the
first forward). Measurements: docs/performance.md.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mag.errors import ConfigError
from mag.models.dit import WanDiT

__all__ = ["COMPILED_BLOCK_METHODS", "COMPILED_MODEL_PARTS", "COMPILE_MODES", "CompiledModules",
           "compile_failure", "compile_model", "compile_scope"]

# torch.compile modes: "reduce-overhead" adds CUDA graphs (CUDA only) to each compiled region.
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune-no-cudagraphs",
                                  "max-autotune")
COMPILED_BLOCK_METHODS: tuple[str, ...] = ("before_cache", "after_cache")
COMPILED_MODEL_PARTS: tuple[str, ...] = ("time_embedding", "time_projection", "head")


@dataclass
class CompiledModules:
    """Submodules and block methods replaced by compiled wrappers, so a failed compile can be
    undone."""

    replaced: list[tuple[nn.Module, str, Any]]

    def restore(self) -> None:
        for parent, name, original in self.replaced:
            if isinstance(original, types.MethodType):
                # the compiled wrapper shadowed the class's method on the instance
                delattr(parent, name)
            else:
                setattr(parent, name, original)
        self.replaced.clear()


def compile_model(model: WanDiT, backend: str = "inductor",
                  mode: str = "default") -> CompiledModules:
    """``torch.compile`` every part of ``model`` except the cached attention, in place (see the
    module doc).

    Compilation happens lazily on the first forward. ``backend="aot_eager"`` traces the same graphs
    without generating kernels (tests); ``mode`` is one of :data:`COMPILE_MODES`.
    """
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {mode!r}; valid modes: {', '.join(COMPILE_MODES)}")
    replaced: list[tuple[nn.Module, str, Any]] = []
    targets: list[tuple[nn.Module, str]] = [(model, n) for n in COMPILED_MODEL_PARTS]
    for block in model.blocks:
        targets += [(block, n) for n in COMPILED_BLOCK_METHODS]
    for parent, name in targets:
        original = getattr(parent, name)
        replaced.append((parent, name, original))
        options = {"backend": backend, "mode": None if mode == "default" else mode}
        setattr(parent, name, torch.compile(original, **options))
    return CompiledModules(replaced)


def compile_failure(err: BaseException) -> str:
    """One line naming a compile error (backend errors are long; their first line says what
    failed)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def compile_scope(mode: str = "default") -> str:
    """What :func:`compile_model` compiles, in words (for reports)."""
    block_parts = ", ".join(f"WanBlock.{m}" for m in COMPILED_BLOCK_METHODS)
    model_parts = ", ".join(COMPILED_MODEL_PARTS)
    blocks = f"every block but its cached attention ({block_parts})"
    return f"{blocks}, and the model's {model_parts}; mode {mode}"
