"""What a stream asks of the host: device syncs and kernel launches, audited without the device.

Streams run on the ``meta`` device (shapes, no data) stand in for a GPU. :class:`HostSyncAudit`
flags every host read of a device value and every blocking host-to-device copy;
:class:`KernelCounter` counts the operators a block dispatches (views apart, fused attention as one
kernel). Why both matter and the Wan-1.3B counts: docs/performance.md, "Host syncs and kernel
launches".
"""

from __future__ import annotations

import collections
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "HostSyncAudit", "HostSyncError", "KernelCounter", "VIEW_OPS",
           "count_block_kernels"]

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Tensor methods that hand a device value to the host (each waits for the queued kernels).
_DEVICE_TO_HOST = {
    Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__int__,
    Tensor.__float__,
    Tensor.__index__, Tensor.nonzero, torch.nonzero, torch.masked_select, Tensor.masked_select,
    torch.unique,
    Tensor.unique, torch.equal, torch.allclose, Tensor.allclose, torch.is_nonzero,
    Tensor.is_nonzero,
}
# Factories that build a device tensor from host data: a blocking copy when the device is not the
# CPU.
_FROM_HOST_DATA = {torch.tensor, torch.as_tensor}
# Operators that only make views (no kernel) -- shape metadata on every device.
VIEW_OPS = frozenset({
    "aten.view.default", "aten._unsafe_view.default", "aten.expand.default", "aten.t.default",
    "aten.transpose.int", "aten.select.int", "aten.slice.Tensor", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.squeeze.default", "aten.unbind.int", "aten.split_with_sizes.default",
    "aten.split.Tensor", "aten.detach.default", "aten.permute.default", "aten.alias.default",
    "aten.as_strided.default", "aten._reshape_alias.default", "aten.lift_fresh.default",
    "aten.view_as_real.default", "aten.view_as_complex.default",
})


class HostSyncError(RuntimeError):
    """Raised by a strict :class:`HostSyncAudit` at the first operation that would sync the host."""


@dataclass(frozen=True)
class HostSync:
    """One operation that would make the host wait for the device."""

    operation: str
    where: str  # the innermost mag source line that called it ("?" when none did)

    def __str__(self) -> str:
        return f"{self.operation} at {self.where}"


def _caller() -> str:
    """The innermost stack frame in the mag package outside this module, as ``path:line
    (function)``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(_PACKAGE_ROOT) and path != Path(__file__).resolve():
            return f"{path.relative_to(_PACKAGE_ROOT.parent)}:{frame.lineno} ({frame.name})"
    return "?"


def _on_device(value: Any) -> bool:
    return isinstance(value, Tensor) and value.device.type != "cpu"


def _target_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    """The device a ``Tensor.to`` call moves to (None when it only changes the dtype)."""
    candidates = [kwargs.get("device"), *args[1:]]
    for value in candidates:
        if isinstance(value, torch.device | str):
            try:
                return torch.device(value)
            except RuntimeError:  # a string that is not a device (e.g. a memory format name)
                continue
        if isinstance(value, Tensor):
            return value.device
    return None


class HostSyncAudit(TorchFunctionMode):
    """Records (or, ``strict``, raises at) every operation that would sync the host with the device.

    Run the code under audit on a non-CPU device (``meta`` on a CPU-only machine): a CPU run has no
    device to wait for, so nothing is recorded. Usage::

        with HostSyncAudit() as audit:
            gen.generate_block()
        assert not audit.syncs, audit.report()
    """

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.syncs: list[HostSync] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        reason = self._sync_reason(func, args, kwargs)
        if reason is not None:
            sync = HostSync(reason, _caller())
            self.syncs.append(sync)
            if self.strict:
                raise HostSyncError(f"host sync: {sync}")
        return func(*args, **kwargs)

    @staticmethod
    def _sync_reason(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        if func in _DEVICE_TO_HOST and args and _on_device(args[0]):
            return f"{name} reads a device value on the host"
        if func in _FROM_HOST_DATA:
            device = kwargs.get("device")
            if (
                device is not None
                and torch.device(device).type != "cpu"
                and not _on_device(args[0])
            ):
                target = torch.device(device)
                return f"{name}(host data, device={target}) is a blocking host-to-device copy"
        if func in (Tensor.to, Tensor.cuda) and args and isinstance(args[0], Tensor):
            target = torch.device("cuda") if func is Tensor.cuda else _target_device(args, kwargs)
            if target is None or target == args[0].device:
                return None
            # also positional
            non_blocking = kwargs.get("non_blocking", any(a is True for a in args[1:]))
            if args[0].device.type == "cpu" and not non_blocking:
                return f"{name} host -> {target} without non_blocking is a blocking copy"
            if target.type == "cpu":
                return f"{name} device -> host reads a device value on the host"
        if func is Tensor.copy_ and len(args) > 1 and _on_device(args[0]) and isinstance(args[1],
                                                                                         Tensor):
            if args[1].device.type == "cpu" and not kwargs.get("non_blocking",
                                                               len(args) > 2 and args[2]):
                return "Tensor.copy_ from a host tensor without non_blocking is a blocking copy"
        return None

    def report(self) -> str:
        """The recorded syncs, one per line, counted by operation and place."""
        counts = collections.Counter(str(s) for s in self.syncs)
        return "\n".join(f"{n} x {what}" for what, n in counts.most_common()) or "no host syncs"


class _FusedAttention(TorchFunctionMode):
    """Tells the counter that a call of scaled_dot_product_attention is one fused kernel."""

    def __init__(self, counter: KernelCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter.ops["scaled_dot_product_attention"] += 1
        self.counter._fused_depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter._fused_depth -= 1


class KernelCounter(TorchDispatchMode):
    """Counts the operators an eager run dispatches, split into kernels and views.

    ``kernels`` approximates eager launches on a GPU: every operator that is not a view, with fused
    attention as one. Use as a context manager around the code to count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self._fused_depth = 0
        self._attention = _FusedAttention(self)

    def __enter__(self) -> KernelCounter:
        self._attention.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._attention.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if self._fused_depth == 0:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in VIEW_OPS)

    @property
    def views(self) -> int:
        return sum(n for op, n in self.ops.items() if op in VIEW_OPS)

    def top(self, k: int = 15) -> list[tuple[str, int]]:
        """The ``k`` most frequent kernel operators with their counts."""
        return [(op, n) for op, n in self.ops.most_common() if op not in VIEW_OPS][:k]


def count_block_kernels(gen: Any, context: Tensor, *, warmup_blocks: int,
                        width_offsets: Tensor | None = None) -> dict[str, Any]:
    """Eager kernels and host syncs of one streamed block, after ``warmup_blocks`` blocks fill the
    cache.

    ``gen`` is a :class:`~mag.pipelines.StreamingGenerator` reset for enough frames, its model on
    ``meta`` (or any device); ``context`` the prompt embeddings. Returns kernel / view / dtype-cast
    counts of the block, per transformer layer and forward (denoising steps + the write pass,
    doubled under guidance), the most frequent kernels, and the host syncs seen over every block
    streamed here.
    """
    audit = HostSyncAudit()
    with audit:
        gen.set_prompt(context, context if gen.sampler.uses_guidance else None)
        for _ in range(warmup_blocks):
            gen.generate_block(width_offsets=width_offsets)
        with KernelCounter() as counter:
            gen.generate_block(width_offsets=width_offsets)
    forwards = gen.forwards_per_block
    layer_forwards = forwards * gen.model.cfg.num_layers
    return {"kernels": counter.kernels, "views": counter.views,
            "dtype_casts": counter.ops["aten._to_copy.default"],
            "attention_kernels": counter.ops["scaled_dot_product_attention"], "forwards": forwards,
            "kernels_per_layer_forward": counter.kernels / layer_forwards,
            "top_kernels": dict(counter.top(12)), "host_syncs": [str(s) for s in audit.syncs]}
