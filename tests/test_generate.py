"""Prompt switches with KV re-cache (StreamingGenerator.recache), and ``mag generate``: action and
prompt files, the stream it writes, camera steering on the shipped model, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CAMERA, TINY_OVERRIDES, needs_inductor, random_dit, trained_model_file

from mag.app import DEFAULTS, load_models, sampler_config
from mag.cache import KVCache
from mag.cli import main
from mag.config import get_preset
from mag.errors import InputError
from mag.generate import DEFAULT_PROMPT, frame_shifts, parse_actions, parse_prompts, stream
from mag.io.video import read_mp4
from mag.models.attention import block_causal_mask
from mag.pipelines import SamplerConfig, StreamingGenerator, policy_from_name, writer_for
from mag.schedulers import FlowMatchScheduler

# Cached streaming vs a masked full forward: float32 summation order differs, nothing else.
ATOL = 1e-5
# Latent frames per block in the tiny preset; the window policy keeps 3 sinks + 9 frames (4 blocks).
BLOCK = 3
WINDOW_BLOCKS = 4


@pytest.fixture(scope="module")
def preset():
    return get_preset("tiny", **TINY_OVERRIDES, **CAMERA)


@pytest.fixture(scope="module")
def model(preset):
    return random_dit(preset.dit, seed=1)


def _prompts(preset) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return tuple(torch.randn(1, 4, preset.dit.text_dim, generator=gen) for _ in range(2))


def _latents(preset, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents ``[1, frames, C, H, W]`` and a camera track ``[1, frames]`` (patches) moving
    right."""
    gen = torch.Generator().manual_seed(9)
    video = preset.video
    x = torch.randn(1, frames, video.latent_channels, video.latent_height, video.latent_width,
                    generator=gen)
    return x, torch.arange(frames, dtype=torch.float32)[None] * 0.5


def _stream(model, preset, policy: str, context, latents, offsets, **kwargs) -> StreamingGenerator:
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    cache_policy = policy_from_name(policy, preset)
    gen = StreamingGenerator(model, scheduler, preset, cache_policy, sampler=SamplerConfig("euler",
                                                                                           2),
                             writer=writer_for(cache_policy, **kwargs))
    gen.reset(1, latents.shape[1] + BLOCK)
    gen.set_prompt(context)
    gen.feed(latents, offsets)
    return gen


def _cached(cache: KVCache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """RoPE position -> (K, V) of every cached frame, whatever slot it sits in."""
    tokens = cache.tokens_per_frame
    out = {}
    for slot, position in zip(cache.valid_slots, cache.cached_positions().tolist(), strict=True):
        rows = slice(slot * tokens, (slot + 1) * tokens)
        out[position] = (cache.k[:, :, :, rows].clone(), cache.v[:, :, :, rows].clone())
    return out


def test_recache_without_eviction_equals_a_stream_with_the_new_prompt_from_the_start(model, preset):
    old, new = _prompts(preset)
    latents, offsets = _latents(preset, WINDOW_BLOCKS * BLOCK)
    switched = _stream(model, preset, "window", old, latents, offsets)
    before = _cached(switched.cache)
    switched.recache(new)
    reference = _stream(model, preset, "window", new, latents, offsets)
    after, want = _cached(switched.cache), _cached(reference.cache)
    assert sorted(after) == sorted(want) == list(range(WINDOW_BLOCKS * BLOCK))
    assert switched.cache.valid_slots == reference.cache.valid_slots
    assert (switched.cache.frames_seen,
            switched.cache.frames_retained) == (reference.cache.frames_seen,
                                                                            reference.cache.frames_retained)
    # The prompt reaches the cached K/V (after the first layer), so the equality below is not
    # vacuous.
    assert not torch.allclose(before[WINDOW_BLOCKS * BLOCK - 1][0],
                              want[WINDOW_BLOCKS * BLOCK - 1][0])
    for position, (k, v) in want.items():
        torch.testing.assert_close(after[position][0], k, atol=ATOL, rtol=0)
        torch.testing.assert_close(after[position][1], v, atol=ATOL, rtol=0)
    block_offsets = offsets[:, -BLOCK:] + BLOCK * 0.5
    a = switched.generate_block(torch.Generator().manual_seed(2), block_offsets)
    b = reference.generate_block(torch.Generator().manual_seed(2), block_offsets)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_recache_after_eviction_rewrites_the_retained_blocks_block_causally(model, preset):
    """7 blocks into a 4-block window: the sinks and the last 3 blocks are rewritten under the new
    prompt, each reading the rewritten blocks before it. Reference: one masked full forward over
    those frames."""
    old, new = _prompts(preset)
    blocks = 7
    latents, offsets = _latents(preset, blocks * BLOCK)
    gen = _stream(model, preset, "window", old, latents, offsets)
    positions_before = sorted(_cached(gen.cache))
    slots_before = gen.cache.valid_slots
    gen.recache(new)
    assert sorted(_cached(gen.cache)) == positions_before and gen.cache.valid_slots == slots_before
    kept = [0, 1, 2, *range((blocks - 3) * BLOCK, blocks * BLOCK)]
    assert positions_before == kept
    # One denoising read of the next block through the rewritten cache ...
    noisy = torch.randn(1, BLOCK, *latents.shape[2:], generator=torch.Generator().manual_seed(3))
    t = torch.full((1,), 500.0)
    next_positions = torch.arange(blocks * BLOCK, (blocks + 1) * BLOCK)
    next_offsets = torch.arange(blocks * BLOCK, (blocks + 1) * BLOCK,
                                dtype=torch.float32)[None] * 0.5
    with torch.no_grad():
        cached = model(noisy, t, new, frame_positions=next_positions, kv_cache=gen.cache,
                       width_offsets=next_offsets)
        # ... equals the full forward over [kept clean frames at t=0 ; noisy block], block-causal.
        frames = torch.cat([latents[:, kept], noisy], 1)
        steps = torch.cat([torch.zeros(1, len(kept)), t.expand(1, BLOCK)], 1)
        full = model(frames, steps, new, frame_positions=torch.tensor([*kept,
                                                                       *next_positions.tolist()]),
                     frame_mask=block_causal_mask(len(kept) + BLOCK, BLOCK),
                     width_offsets=torch.cat([offsets[:, kept], next_offsets], 1))
    torch.testing.assert_close(cached, full[:, -BLOCK:], atol=ATOL, rtol=0)
    # Later writes land in the slots the policy would have used without the switch.
    gen.generate_block(torch.Generator().manual_seed(4), next_offsets)
    assert sorted(_cached(gen.cache)) == [0, 1, 2, *range((blocks - 2) * BLOCK,
                                                          (blocks + 1) * BLOCK)]


def test_recache_under_mag_keeps_the_prompt_free_memory(model, preset):
    """The memory model writes with the empty prompt: a switch changes the prompt, not the cache."""
    old, new = _prompts(preset)
    memory = random_dit(preset.dit, seed=2)
    empty = torch.zeros(1, 1, preset.dit.text_dim)
    latents, offsets = _latents(preset, 5 * BLOCK)
    gen = _stream(model, preset, "mag", old, latents, offsets, memory_model=memory,
                  empty_context=empty)
    k, v, context_k = gen.cache.k.clone(), gen.cache.v.clone(), gen.context.k.clone()
    gen.recache(new)
    assert torch.equal(gen.cache.k, k) and torch.equal(gen.cache.v, v)
    assert not torch.allclose(gen.context.k, context_k)


# ---------------------------------------------------------------------------------------------
# mag generate


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_parse_actions_list_and_keyframes(tmp_path):
    listed = parse_actions(_write(tmp_path / "a.json", [0, 4, 4, -4]), 4, 16)
    np.testing.assert_array_equal(listed, [0, 4, 4, -4])
    keyed = parse_actions(_write(tmp_path / "k.json", {"2": 4, "4": -4}), 6, 16)
    np.testing.assert_array_equal(keyed, [0, 0, 4, 4, -4, -4])


@pytest.mark.parametrize("data", [[4, 4], "[4, 4, 4", [4, "x", 4], "[4, NaN, 4]", [4, 40, 4],
                                  {"9": 4}, {"a": 4}, {}, 3])
def test_bad_actions_are_input_errors(data, tmp_path):
    with pytest.raises(InputError):
        parse_actions(_write(tmp_path / "a.json", data), 3, 16)


def test_prompt_schedule_switches_at_block_boundaries(tmp_path):
    path = _write(tmp_path / "p.json", [{"frame": 0, "prompt": "a"}, {"frame": 4, "prompt": "b"}])
    switches = parse_prompts(path, None, 12, BLOCK)
    assert [(s.frame, s.block_frame, s.prompt) for s in switches] == [(0, 0, "a"), (4, 6, "b")]
    later = parse_prompts(_write(tmp_path / "q.json", [{"frame": 3, "prompt": "b"}]), "a", 12,
                          BLOCK)
    assert [(s.block_frame, s.prompt) for s in later] == [(0, "a"), (3, "b")]


@pytest.mark.parametrize("data", [[], [{"frame": 3, "prompt": "b"}], [{"frame": 0, "prompt": ""}],
                                  [{"frame": 0, "prompt": "a"}, {"frame": 0, "prompt": "b"}],
                                  [{"frame": 0, "prompt": "a"}, {"frame": 99, "prompt": "b"}],
                                  [{"frame": 0, "prompt": "a"}, {"frame": 4, "prompt": "b"},
                                   {"frame": 5, "prompt": "c"}],
                                  {"0": "a"}])
def test_bad_prompt_files_are_input_errors(data, tmp_path):
    with pytest.raises(InputError):
        parse_prompts(_write(tmp_path / "p.json", data), None, 12, BLOCK)


def test_frame_shifts_recovers_a_known_pan():
    rng = np.random.default_rng(0)
    panorama = rng.integers(0, 256, (8, 64, 3), dtype=np.uint8)
    track = [0, 4, 8, 8, 4, 2]
    frames = np.stack([panorama[:, x:x + 16] for x in track])
    np.testing.assert_array_equal(frame_shifts(frames, 8), np.diff(track))


def test_shipped_model_follows_the_commanded_velocity(tmp_path):
    """The camera-anchored shipped generator: 6 frames right at 4 px/frame, then 6 left; the content
    shift between consecutive generated frames equals the command."""
    velocities = np.array([4] * 6 + [-4] * 6, dtype=np.float32)
    loaded = load_models(DEFAULTS, with_memory=False)
    switches = parse_prompts(None, DEFAULT_PROMPT, velocities.size, BLOCK)
    result = stream(loaded, "window", sampler_config(DEFAULTS), velocities, switches,
                    progress=False)
    np.testing.assert_array_equal(frame_shifts(result.frames, 8), velocities[1:])


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> Path:
    return trained_model_file(tmp_path_factory.mktemp("gen"), "causal_fm", "test-gen", "causal",
                              CAMERA)


def _generate(generator_file: Path, out: Path, *extra: str) -> int:
    return main(["generate", "--model", str(generator_file), "--memory-model", "", "--sampler",
                 "euler",
                 "--steps", "2", "--frames", "10", "--no-progress", "-o", str(out), *extra])


def test_generate_switches_prompts_and_reports_fps_and_kv(generator_file, tmp_path, capsys):
    prompts = _write(tmp_path / "p.json", [{"frame": 0, "prompt": "a red wall"},
                                           {"frame": 5, "prompt": "a blue sea"}])
    actions = _write(tmp_path / "a.json", {"0": 4, "6": -4})
    assert _generate(generator_file, tmp_path / "out.mp4", "--policy", "window", "--prompts",
                     str(prompts), "--actions", str(actions)) == 0
    printed = capsys.readouterr().out
    assert (
        "prompt switch at frame 6 (asked 5)" in printed
        and " FPS " in printed
        and "KV cache" in printed
    )
    assert read_mp4(tmp_path / "out.mp4").shape[0] == 10


@pytest.mark.parametrize("case", ["policy", "prompts", "actions", "output", "checkpoint", "memory"])
def test_generate_errors_are_one_line(case, generator_file, tmp_path, capsys):
    model, out, extra = generator_file, tmp_path / "out.mp4", ["--policy", "window"]
    if case == "policy":
        extra = ["--policy", "sliding"]
    elif case == "prompts":
        extra += ["--prompts", str(_write(tmp_path / "p.json", "{not json"))]
    elif case == "actions":
        extra += ["--actions", str(_write(tmp_path / "a.json", [4, 4]))]
    elif case == "output":
        out = tmp_path
    elif case == "checkpoint":
        model = tmp_path / "missing.safetensors"
    else:
        extra = ["--policy", "mag"]
    assert _generate(model, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mag: error: "), err


@needs_inductor
def test_compiled_generation_matches_eager_and_leaves_the_models_eager():
    """--compile (TorchInductor) under mag: the frames match the eager stream to within one 8-bit
    level (float sums reordered), and the loaded models are eager again afterwards."""
    velocities = np.full(9, 4, dtype=np.float32)
    loaded = load_models(DEFAULTS, with_memory=True)
    switches = parse_prompts(None, DEFAULT_PROMPT, velocities.size, BLOCK)
    eager = stream(loaded, "mag", sampler_config(DEFAULTS), velocities, switches, progress=False)
    torch._dynamo.reset()
    fast = stream(loaded, "mag", sampler_config(DEFAULTS), velocities, switches, progress=False,
                  compile_model=True)
    torch._dynamo.reset()
    difference = np.abs(fast.frames.astype(np.int16) - eager.frames.astype(np.int16))
    assert difference.max() <= 1 and eager.frames.std() > 10
    assert all("before_cache" not in vars(m.blocks[0]) for m in (loaded.model, loaded.memory))
