"""Exponential moving average of model weights (fp32 shadow copy)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mag.errors import CheckpointError


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step.

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name,
            p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise CheckpointError(f"EMA state lacks {sorted(missing)[:5]}")
        wrong = [f"{k}: {list(state[k].shape)} vs {list(v.shape)}" for k, v in self.shadow.items()
                 if state[k].shape != v.shape]
        if wrong:
            raise CheckpointError(f"EMA state does not fit the model: {len(wrong)} wrong-shape "
                                  f"({wrong[0]})")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (e.g. for evaluation or export)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))
