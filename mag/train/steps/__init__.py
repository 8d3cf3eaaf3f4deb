"""Training step runners: what one optimiser step computes for each objective kind of a recipe.

``supervised`` (``teacher_fm``, ``causal_fm``, ``ode``), ``memory`` and ``horizon`` give one loss
per micro-batch and the trainer owns the optimiser loop; ``dmd`` owns its own step (two networks on
a schedule). The chain of objectives and the recipes: docs/training.md.
"""

from mag.train.steps.base import (
    ROLE_GENERATOR,
    ROLE_SAMPLE,
    ROLE_SHARED_MEMORY,
    StepContext,
    build_model,
    draw_generator,
    sample_generator,
)
from mag.train.steps.dmd import MEMORY_MODEL_METADATA, DMDStep
from mag.train.steps.horizon import HorizonDraws, HorizonStep
from mag.train.steps.memory import MemoryDraws, MemoryStep
from mag.train.steps.supervised import FlowMatchingStep, ODEStep, SampleDraws

SupervisedStep = FlowMatchingStep | ODEStep | MemoryStep | HorizonStep

__all__ = ["MEMORY_MODEL_METADATA", "ROLE_GENERATOR", "ROLE_SAMPLE", "ROLE_SHARED_MEMORY",
           "DMDStep", "HorizonDraws", "HorizonStep",
           "FlowMatchingStep", "MemoryDraws", "MemoryStep", "ODEStep", "SampleDraws", "StepContext",
           "SupervisedStep", "build_model", "draw_generator", "sample_generator"]
