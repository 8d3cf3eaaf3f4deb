"""Per-block activation checkpointing of a ``WanDiT``: each block's activations are recomputed in
backward.

Applied from outside the model, like the sharding (:mod:`mag.train.mesh` applies it before
``fully_shard``), and without wrapper modules, so parameter names (and checkpoints) do not change.
Only forwards that build a graph are checkpointed, and never a cache *write* (recomputing it would
write twice). A forward that *reads* a KV cache (a rollout's exit step) checkpoints against a copy
of the cached K/V it read, because the rollout writes later blocks into the cache before backward
runs; the copy holds what the attention would have saved for backward anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mag.errors import ConfigError


class _CachedRead:
    """The ``read`` side of a KV cache frozen at one layer's values (what ``attend_cached``
    uses)."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values = keys, values

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.keys, self.values


def _checkpointed(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``forward`` (a bound ``WanBlock.forward``) with non-reentrant checkpointing when it builds a
    graph."""

    def run(x: Tensor, e0: Tensor, rope: tuple[Tensor, Tensor], attn_mask: object,
            cross_kv: tuple[Tensor, Tensor], kv_cache: object, layer: int,
            pending: object) -> Tensor:
        if pending is not None or not torch.is_grad_enabled():
            return forward(x, e0, rope, attn_mask, cross_kv, kv_cache, layer, pending)
        cached = kv_cache
        if kv_cache is not None:
            keys, values = kv_cache.read(layer)
            cached = _CachedRead(keys.detach().clone(), values.detach().clone())

        def block(x: Tensor, e0: Tensor, cos: Tensor, sin: Tensor, cross_k: Tensor,
                  cross_v: Tensor) -> Tensor:
            return forward(x, e0, (cos, sin), attn_mask, (cross_k, cross_v), cached, layer, None)

        return checkpoint(block, x, e0, *rope, *cross_kv, use_reentrant=False)

    return run


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Turn on activation checkpointing for every block of ``model.blocks`` in place; returns
    ``model``.

    Call before sharding (FSDP's hooks then wrap the checkpointed forward, torchtitan's order).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError("activation checkpointing expects a model with a non-empty ModuleList "
                          "'blocks',"
                          f" got {type(model).__name__}")
    for block in blocks:
        if not is_checkpointed(block):
            block.forward = _checkpointed(block.forward)
            block._mag_activation_checkpointing = True
    return model


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block, "_mag_activation_checkpointing", False))
