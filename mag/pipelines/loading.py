"""Loading a trained generator, and compiling the models a stream runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mag.config import Preset
from mag.errors import ConfigError, InputError
from mag.models.compile import CompiledModules, compile_failure, compile_model
from mag.models.dit import WanDiT
from mag.pipelines.streaming import StreamingGenerator
from mag.registry import GENERATOR_STAGES, load_model


def load_generator(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[WanDiT, Preset,
                                                                                  dict[str, Any]]:
    """The generator stored in a training checkpoint or model file (EMA weights when present).

    One loading path for the whole package: this is :func:`mag.registry.load_model`, which also
    takes the names of shipped models.

    Returns:
        ``(model, preset, metadata)`` with the model in eval mode and the preset from the ``preset``
        metadata; ``metadata`` keeps the recipe (``recipe.data.world`` is the training world).
    Raises:
        CheckpointError: missing, corrupt or foreign file, no preset metadata, weights that do not
        fit, or
            a memory model (stage ``memory``) where a generator is expected.
    """

    return load_model(path, device=device, expect_stage=GENERATOR_STAGES)


def compile_stream(gen: StreamingGenerator, context: Tensor, *, width_offsets: Tensor | None = None,
                   mode: str = "default") -> tuple[list[CompiledModules], str | None]:
    """``torch.compile`` the models a stream runs (the generator, and the memory model that writes
    its cache) and stream one throw-away block so that compiling is not part of the caller's timing.

    Returns the handles to restore the eager models with (:meth:`CompiledModules.restore`) and None,
    or, when the compiler fails, no handles (the models are eager again) and a one-line description
    of the failure. The stream is left mid-way: the caller resets it
    (:meth:`StreamingGenerator.reset`) before using it.

    Args:
        context: ``[B, L, text_dim]`` prompt embeddings for the warm-up block.
        width_offsets: ``[B, F]`` camera positions of the warm-up block (camera-anchored models).
    """
    models = [gen.model]
    writer_model = getattr(gen.writer, "model", None)
    if isinstance(writer_model, WanDiT) and writer_model is not gen.model:
        models.append(writer_model)
    compiled = [compile_model(m, mode=mode) for m in models]
    try:
        gen.reset(context.shape[0], gen.frames_per_block)
        gen.set_prompt(context)
        gen.generate_block(torch.Generator(device=gen.device).manual_seed(0), width_offsets)
    except Exception as err:  # backend compiler errors surface on the first forward
        for c in compiled:
            c.restore()
        if isinstance(err, (ConfigError, InputError)):
            raise
        return [], compile_failure(err)
    return compiled, None
