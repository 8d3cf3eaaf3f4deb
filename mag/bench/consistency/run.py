"""The consistency benchmark's runner: every cache policy streams the same episodes with the same
noise (``seed`` and the first episode of each batch), next to the ``repeat-last`` and
``oracle-copy`` rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mag.bench.consistency.episodes import BenchEpisode, within_window
from mag.bench.consistency.scores import (
    REFERENCE_ROWS,
    ConsistencyConfig,
    ConsistencyResult,
    RowScores,
    score_episode,
)
from mag.cache import CachePolicy
from mag.codecs import Codec, frames_to_tensor, get_codec_for, tensor_to_frames
from mag.config import Preset
from mag.errors import ConfigError
from mag.models.dit import WanDiT
from mag.pipelines import (
    CacheWriter,
    StreamingGenerator,
    check_policy_name,
    policy_from_name,
    writer_for,
)
from mag.schedulers import FlowMatchScheduler

# ---------------------------------------------------------------------------------------------
# Runner


def _groups(episodes: Sequence[BenchEpisode], batch_size: int) -> list[list[int]]:
    """Episode indices sharing ``(switch_frame, num_generate)``, in chunks of at most
    ``batch_size``."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, ep in enumerate(episodes):
        by_shape.setdefault((ep.switch_frame, ep.num_generate), []).append(i)
    chunks = []
    for key in sorted(by_shape):
        members = by_shape[key]
        chunks.extend(members[j:j + batch_size] for j in range(0, len(members), batch_size))
    return chunks


def _choose_strip_episode(episodes: Sequence[BenchEpisode], within: Sequence[np.ndarray]) -> int:
    """The first episode with a beyond-window revisit, else the first with any revisit, else 0."""
    for i, ep in enumerate(episodes):
        if ((ep.history_match >= 0) & ~within[i]).any():
            return i
    for i, ep in enumerate(episodes):
        if (ep.history_match >= 0).any():
            return i
    return 0


def _check_codec(codec: Codec) -> None:
    if codec.temporal_compression != 1:
        raise ConfigError(
            "the consistency benchmark matches generated and history frames one to one, which "
            "needs a"
            f" codec without temporal compression; codec {codec.name!r} compresses time"
            f" {codec.temporal_compression}x"
        )


def stream_episodes(gen: StreamingGenerator, codec: Codec, episodes: Sequence[BenchEpisode],
                    context: Tensor, teacher_forced: bool, noise: torch.Generator,
                    generation_context: Tensor | None = None, *,
                    on_block: Callable[[], None] | None = None) -> np.ndarray:
    """Feed the history of same-shape episodes and generate the rest; uint8 ``[B, n, H, W, 3]``.

    The benchmark's per-episode streaming loop, shared with ``mag demo``. ``context``: ``[B, L,
    text_dim]`` prompt embeddings; ``generation_context`` (default ``context``): the prompt
    embeddings after the switch; ``noise`` seeds every block, so two policies given equal seeds see
    equal noise; ``on_block`` is called after each generated block (a progress bar).
    """
    s, n = episodes[0].switch_frame, episodes[0].num_generate
    block = gen.frames_per_block
    video = torch.stack([frames_to_tensor(ep.frames[:s + n]) for ep in episodes])
    latents = codec.encode(video.to(gen.device))
    offsets = _width_offsets(gen.model, episodes, s + n)
    gen.reset(len(episodes), s + n)
    gen.set_prompt(context)
    gen.feed(latents[:, :s], None if offsets is None else offsets[:, :s])
    if generation_context is not None:
        gen.set_prompt(generation_context)
    blocks = []
    for start in range(s, s + n, block):
        frames = slice(start, start + block)
        block_offsets = None if offsets is None else offsets[:, frames]
        if teacher_forced:
            blocks.append(gen.predict_block_teacher_forced(latents[:, frames], noise,
                                                           block_offsets))
        else:
            blocks.append(gen.generate_block(noise, block_offsets))
        if on_block is not None:
            on_block()
    decoded = codec.decode(torch.cat(blocks, 1))
    return np.stack([tensor_to_frames(v) for v in decoded])


def _width_offsets(model: WanDiT, episodes: Sequence[BenchEpisode], frames: int) -> Tensor | None:
    """Camera positions in patches ``[B, frames]`` for camera-anchored models, else None.

    The benchmark gives a camera-anchored model the ground-truth camera path (it is a
    camera-controlled world model); the frames themselves are still generated from memory alone.
    """
    if not model.cfg.camera_rope:
        return None
    if any(ep.camera_px is None for ep in episodes):
        raise ConfigError("this model is camera-anchored (dit.camera_rope) and needs a camera "
                          "track per"
                          " episode; real-video folders have none")
    track = torch.from_numpy(np.stack([ep.camera_px[:frames] for ep in episodes]))
    return (track / model.cfg.patch_size[2]).to(model.patch_embedding.weight.device)


def build_policies(names: Sequence[str], preset: Preset, *, memory_model: WanDiT | None = None,
                   empty_context: Tensor | None = None) -> dict[str, tuple[CachePolicy,
                                                                           CacheWriter | None]]:
    """Cache policies and their writers by name; ``mag`` / ``bounded`` are written by
    ``memory_model`` run with ``empty_context`` (``[1, L, text_dim]``, the empty prompt), which must
    then be given."""
    built = {}
    for name in names:
        policy = policy_from_name(check_policy_name(name,
                                                    has_memory_model=memory_model is not None),
                                  preset)
        built[name] = (policy, writer_for(policy, memory_model=memory_model,
                                          empty_context=empty_context))
    return built


def run_consistency(model: WanDiT, preset: Preset, episodes: Sequence[BenchEpisode],
                    encode_prompts: Callable[[list[str]], Tensor], config: ConsistencyConfig, *,
                    progress: bool = True, memory_model: WanDiT | None = None,
                    empty_context: Tensor | None = None,
                    codec: Codec | None = None) -> ConsistencyResult:
    """Run every policy and the reference rows on ``episodes``; see the module docstring.

    Args:
        encode_prompts: prompts -> ``[B, L, text_dim]`` text embeddings (e.g. a
        PromptEmbeddingCache.get). memory_model: the stage-1 memory model that writes the cache
        under ``mag`` / ``bounded``
            (same preset as the generator, see :func:`mag.memory.check_memory_model`).
        empty_context: ``[1, L, text_dim]`` embeddings of the empty prompt that the memory model
        reads. codec: the codec frames go through (default: the preset's, built here; real weights
        pass the
            Wan2.1 folder's VAE, which the frame-aligned protocol refuses for its temporal
            compression).
    """
    from tqdm.auto import tqdm

    if not episodes:
        raise ConfigError("the benchmark needs at least one episode")
    if config.batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {config.batch_size}")
    policies = build_policies(config.policies, preset, memory_model=memory_model,
                              empty_context=empty_context)
    codec = codec if codec is not None else get_codec_for(preset.video)
    _check_codec(codec)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    within = [within_window(ep.frame_indices, ep.history_match, preset.cache) for ep in episodes]
    strip = _choose_strip_episode(episodes, within)
    strip_frames: dict[str, np.ndarray] = {}

    references = {name: RowScores(name) for name in REFERENCE_ROWS}
    for i, ep in enumerate(episodes):
        s, n = ep.switch_frame, ep.num_generate
        repeat = np.repeat(ep.frames[s - 1:s], n, axis=0)
        oracle = ep.frames[np.maximum(ep.history_match, 0)]
        references["repeat-last"].frames.append(score_episode(repeat, ep, with_lpips=config.lpips))
        references["oracle-copy"].frames.append(
            score_episode(oracle, ep, with_lpips=config.lpips, only_revisited=True))
        if i == strip:
            # Frames without a history match have nothing to copy: shown black in the strip.
            strip_frames["repeat-last"] = repeat
            strip_frames["oracle-copy"] = np.where((ep.history_match >= 0)[:, None, None, None],
                                                   oracle, 0)

    chunks = _groups(episodes, config.batch_size)
    rows: dict[str, RowScores] = {}
    for name, (policy, writer) in policies.items():
        gen = StreamingGenerator(model, scheduler, preset, policy, sampler=config.sampler,
                                 writer=writer)
        per_episode: list[dict[str, dict[str, np.ndarray]] | None] = [None] * len(episodes)
        bar = tqdm(total=len(episodes), desc=f"{name} ({config.mode})", unit="episode",
                   disable=not progress)
        for chunk in chunks:
            members = [episodes[i] for i in chunk]
            noise = torch.Generator(device=gen.device).manual_seed(
                config.seed * 1_000_003 + chunk[0]
            )
            context = encode_prompts([ep.prompt for ep in members]).to(gen.device)
            after = (
                encode_prompts([""] * len(members)).to(gen.device)
                if config.empty_prompt_after_switch
                else None
            )
            frames = stream_episodes(gen, codec, members, context, config.teacher_forced, noise,
                                     after)
            for i, pred in zip(chunk, frames, strict=True):
                per_episode[i] = score_episode(pred, episodes[i], with_lpips=config.lpips)
                if i == strip:
                    strip_frames[name] = pred
            bar.update(len(chunk))
        bar.close()
        rows[name] = RowScores(name, [scores for scores in per_episode if scores is not None])
    return ConsistencyResult(list(episodes), rows, references, within, strip, strip_frames)
