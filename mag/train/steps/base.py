"""What every training step runner shares: keyed random draws, model building, the prompt cache and
the :class:`StepContext`.

Every random draw comes from a generator keyed by ``(seed, step, micro, index, role)``
(:func:`draw_generator`), so resuming is exact and data-parallel ranks draw the single-process
batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mag.config import Preset, config_differences
from mag.data.shards import LatentBatch
from mag.errors import CheckpointError, ConfigError, InputError
from mag.memory import load_memory_model, memory_model_mismatch
from mag.models import WanDiT
from mag.registry import model_stage
from mag.schedulers import FlowMatchScheduler
from mag.text import PromptEmbeddingCache
from mag.train.data import ClipBatch, ClipSource, WorldClipSource
from mag.train.networks import load_network
from mag.train.recall import view_categories
from mag.train.recipe import Recipe

Parallelize = Callable[[nn.Module], nn.Module]

# Roles of :func:`draw_generator`: independent streams for the same (seed, step, micro, index).
ROLE_SAMPLE = 0            # supervised objectives; also what sample_generator draws (4-key form)
ROLE_GENERATOR = 1         # DMD generator step: rollout noise, DMD timesteps and noise
ROLE_CRITIC = 2            # DMD critic step: rollout noise, critic timesteps and noise
ROLE_HISTORY = 3           # DMD history rollout's draws
ROLE_SHARED_GENERATOR = 4  # index 0: exit step and history choice of a generator micro-batch
ROLE_SHARED_CRITIC = 5     # index 0: exit step of a critic micro-batch
ROLE_SHARED_MEMORY = 6     # index 0: first RoPE position of a memory micro-batch
ROLE_SHARED_HORIZON = 7    # index 0: the other scored blocks of a horizon micro-batch


def sample_generator(seed: int, step: int, micro: int, index: int) -> torch.Generator:
    """The CPU generator of one sample of one micro-batch: draws depend on nothing else, so
    resuming, or splitting the batch across data-parallel ranks, reproduces them exactly."""
    state = np.random.SeedSequence([seed, step, micro, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def draw_generator(seed: int, step: int, micro: int, index: int, role: int) -> torch.Generator:
    """Like :func:`sample_generator`, one independent stream per ``role`` (``ROLE_*``)."""
    if role == ROLE_SAMPLE:
        return sample_generator(seed, step, micro, index)
    state = np.random.SeedSequence([seed, step, micro, index, role]).generate_state(1,
                                                                                    dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def build_model(recipe: Recipe, device: torch.device | str = "cpu", *, init: bool = True) -> WanDiT:
    """Build on the meta device, materialise on ``device``, initialise from the recipe seed, then
    load ``init.model`` when the recipe names one and ``init`` (a resumed run takes the
    checkpoint's)."""
    preset = recipe.build_preset()
    with torch.device("meta"):
        model = WanDiT(preset.dit)
    model.to_empty(device=device)
    torch.manual_seed(recipe.loop.seed)
    model.init_weights()
    if init and recipe.init.model:
        load_init_weights(model, recipe.init.model, preset)
    return model


def load_init_weights(model: WanDiT, name_or_path: str, preset: Preset) -> None:
    """Copy the weights of a model file / checkpoint / registry name, or of official weights
    (:func:`mag.train.networks.load_network`), into ``model`` (same ``dit`` config)."""
    source = load_network(name_or_path, preset.dit)
    if source.cfg != preset.dit:
        differences = config_differences(preset.dit, source.cfg)
        raise CheckpointError(f"init.model {name_or_path!r} is a different network: its dit "
                              "config differs"
                              f" from the recipe's ({differences}; recipe vs file)")
    with torch.no_grad():
        model.load_state_dict(source.state_dict())


@dataclass
class StepContext:
    """What every stage reads: the recipe, its preset and schedule, the data and text, the
    device."""

    recipe: Recipe
    preset: Preset
    scheduler: FlowMatchScheduler
    data: ClipSource
    text: PromptEmbeddingCache | None  # None: the shards carry the text states
    empty_context: Tensor
    device: torch.device

    def context(self, batch: ClipBatch | LatentBatch) -> Tensor:
        """Text states ``[B, L, text_dim]`` of a batch on the device: the stored ones of latent
        shards that carry them, else its prompts through the encoder."""
        stored = getattr(batch, "context", None)
        if stored is not None:
            return stored.to(self.device)
        if self.text is None:
            raise InputError("a batch without stored text states, and no text encoder was built")
        return self.text.get(batch.prompts).to(self.device)

    def width_offsets(self, camera_px: Tensor) -> Tensor | None:
        """Camera track ``[B, F]`` in pixels -> width positions in patches (camera-anchored presets
        only)."""
        if not self.preset.dit.camera_rope:
            return None
        return (camera_px / self.preset.dit.patch_size[2]).to(self.device)

    def categories(self, offsets: Tensor) -> Tensor:
        """Recall-signal categories ``[B, F, W]`` of the frames of clips with camera ``offsets: [B,
        F]`` (all ``new`` where they are not the world's pixel columns: latent shards, VAE
        latents)."""
        if not isinstance(self.data, WorldClipSource) or self.preset.video.spatial_compression != 1:
            return torch.zeros(*offsets.shape, self.preset.video.latent_width, dtype=torch.long,
                               device=self.device)
        world = self.data.world
        return view_categories(offsets, world.frame_width, world.pano_width,
                               self.preset.cache.frames_per_block,
                               self.recipe.objective.recall_window_frames).to(self.device)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes, bytes), in name order:
    names the exact weights a run used, whatever file or registry name they came from."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_frozen_memory_model(source: str, ctx: StepContext, field: str) -> tuple[WanDiT,
                                                                                 dict[str, str]]:
    """The stage-1 memory model a run's caches are written by (eval, no gradient) and its checkpoint
    record (source, name, stage, weights digest).

    :func:`mag.memory.load_memory_model` refuses generator files (CheckpointError); a memory model
    of another network than the recipe's is a ConfigError naming ``field``.
    """
    memory, memory_preset, meta = load_memory_model(source, ctx.device)
    mismatch = memory_model_mismatch(ctx.preset, memory_preset, fields=("dit",))
    if mismatch is not None:
        raise ConfigError(f"{field} {source!r} is a different network from the generator: its"
                          f" {mismatch} differs from the recipe's; train the memory model from"
                          " this generator (objective.kind = 'memory')")
    memory.requires_grad_(False)
    record = {"source": str(source), "name": str(meta.get("name", "")),
              "stage": str(model_stage(meta)), "weights_sha256": weights_digest(memory)}
    return memory, record
