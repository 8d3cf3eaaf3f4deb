"""The MAG memory model: training mask, reconstruction objective, compression while streaming,
bounded memory, and loading guards. Tiny random models; each test runs in about a second."""

from __future__ import annotations

import pytest
import torch
from helpers import random_dit

from mag.cache import FullPolicy, KVCache, MagPolicy, valid_slot_positions
from mag.checkpoint import TrainingState, save_checkpoint
from mag.config import get_preset
from mag.errors import CheckpointError, ConfigError, InputError
from mag.memory import (
    MemoryWriter,
    load_memory_model,
    memory_training_mask,
    sample_memory_timesteps,
    sample_start_position,
)
from mag.models import WanDiT, last_frame_memory_mask
from mag.objectives.memory import memory_reconstruction_loss
from mag.pipelines import (
    GeneratorWriter,
    StreamingGenerator,
    load_generator,
    policy_from_name,
    writer_for,
)
from mag.registry import GENERATOR_STAGES, export_model, load_model
from mag.schedulers import FlowMatchScheduler

TOLERANCE = 1e-5
BATCH = 2
TEXT_TOKENS = 3
F = 3
# 8x8 frames with 4x4 patches: 4 tokens per frame, blocks of 3 frames (as tests/test_streaming.py).
SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "dit.text_dim": 16,
         "dit.freq_dim": 16, "dit.rope_max_positions": 64, "video.height": 8, "video.width": 8}
NOISE_SEED = 7
# Long-horizon KV checks write random K/V through the cache API for this many blocks.
LONG_HORIZON_BLOCKS = 3000

# The mask for 2 blocks, drawn: rows are queries [c0..c5 ; n0..n5], columns keys in the same order.
MASK_TWO_BLOCKS = """
111000 000000
111000 000000
111000 000000
001111 000000
001111 000000
001111 000000
001000 111000
001000 111000
001000 111000
001001 000111
001001 000111
001001 000111
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU they contend (10-40x
    slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _preset(**extra):
    return get_preset("tiny", **{**SMALL, **extra})


def _random_model(preset, seed: int = 0) -> WanDiT:
    return random_dit(preset.dit, seed)


def _frame_shape(preset):
    return (preset.video.latent_channels, preset.video.height, preset.video.width)


def _text(preset, batch: int, seed: int):
    return torch.randn(batch, TEXT_TOKENS, preset.dit.text_dim,
                       generator=torch.Generator().manual_seed(seed))


def _retained_after(frames_done: int, sink_frames: int, memory_slots: int | None) -> list[int]:
    """Slow twin of MagPolicy: the stream frames a cache holds after ``frames_done`` frames."""
    kept = [f for f in range(frames_done) if f < sink_frames or f % F == F - 1]
    sinks, compressed = kept[:sink_frames], kept[sink_frames:]
    return sinks + (compressed if memory_slots is None else compressed[-memory_slots:])


# ---------------------------------------------------------------------------------------------
# The training mask


def test_memory_training_mask_matches_the_drawn_layout():
    expected = torch.tensor([[c == "1" for c in row.replace(" ", "")]
                             for row in MASK_TWO_BLOCKS.strip().splitlines()])
    assert torch.equal(memory_training_mask(6, F), expected)
    # Clean rows are what a compressed-memory write pass sees (no sinks).
    assert torch.equal(memory_training_mask(12, F)[:12, :12], last_frame_memory_mask(12, F))
    with pytest.raises(InputError, match="multiple of the block size 3"):
        memory_training_mask(7, F)


def _dependence(model, num_blocks: int, rows: slice) -> torch.Tensor:
    """Which input frames of ``[clean ; noisy]`` the outputs ``rows`` depend on: ``[2N]`` bool (grad
    != 0)."""
    n = num_blocks * F
    x = torch.randn(1, 2 * n, 4, 4, 4, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    t = torch.cat([torch.zeros(1, n), torch.full((1, n), 625.0)], 1)
    context = torch.randn(1, TEXT_TOKENS, model.cfg.text_dim)
    out = model(x, t, context, frame_positions=torch.arange(n).repeat(2),
                frame_mask=memory_training_mask(n, F))
    out[:, rows].square().sum().backward()
    return x.grad.abs().sum(dim=(0, 2, 3, 4)) != 0


@pytest.mark.parametrize("block", [0, 1, 3])
def test_noisy_block_sees_only_retained_frames_of_blocks_up_to_its_own(make_dit, block):
    # One layer: an output depends on exactly the keys its mask row allows (deeper layers carry each
    # block's content into its retained frame, which is the point of the memory model).
    num_blocks = 4
    n = num_blocks * F
    depends = _dependence(make_dit(num_layers=1), num_blocks, slice(n + block * F,
                                                                    n + (block + 1) * F))
    frames = torch.arange(n)
    retained_upto = (frames % F == F - 1) & (frames // F <= block)
    own_noisy = frames // F == block
    assert torch.equal(depends, torch.cat([retained_upto, own_noisy]))
    # c0, c1 of every block: exactly zero gradient
    assert not depends[:n][frames % F != F - 1].any()


@pytest.mark.parametrize("block", [0, 2])
def test_clean_queries_never_depend_on_noisy_inputs(make_dit, block):
    num_blocks = 4
    n = num_blocks * F
    depends = _dependence(make_dit(num_layers=2), num_blocks, slice(block * F, (block + 1) * F))
    frames = torch.arange(n)
    assert not depends[n:].any()
    # own block, earlier ones through retained frames
    assert torch.equal(depends[:n], frames // F <= block)


# ---------------------------------------------------------------------------------------------
# The reconstruction objective


def test_reconstruction_loss_equals_streaming_reconstruction_from_compressed_memory():
    """Parallel training pass == write each block with MemoryWriter, then denoise it from the
    cache."""
    preset = _preset()
    memory = _random_model(preset, seed=1)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    num_blocks, start = 4, 6
    n = num_blocks * F
    draws = torch.Generator().manual_seed(2)
    x0 = torch.randn(BATCH, n, *_frame_shape(preset), generator=draws)
    noise = torch.randn(x0.shape, generator=draws)
    t_block = sample_memory_timesteps(scheduler, BATCH, num_blocks, draws)
    empty = _text(preset, 1, seed=9)
    with torch.no_grad():
        loss = memory_reconstruction_loss(memory, scheduler, x0, empty, noise, t_block, start)

    writer = MemoryWriter(memory, empty)
    cache = KVCache.for_model(preset.dit, MagPolicy(), tokens_per_frame=4, horizon_frames=n,
                              frames_per_block=F, batch_size=BATCH)
    t_frame = t_block.repeat_interleave(F, 1)
    x_t = scheduler.add_noise(x0, noise, t_frame)
    errors = []
    with torch.no_grad():
        for b in range(num_blocks):
            block = slice(b * F, (b + 1) * F)
            positions = torch.arange(start + b * F, start + (b + 1) * F)
            writer.write(cache, x0[:, block], positions)
            out = memory(x_t[:, block], t_frame[:, block], empty.expand(BATCH, -1, -1),
                         frame_positions=positions, kv_cache=cache)
            errors.append((scheduler.to_x0(out, x_t[:, block], t_frame[:, block]) - x0[:,
                                                                                       block]) ** 2)
    streamed = torch.cat(errors, 1)
    assert cache.num_valid_frames == num_blocks  # one compressed frame per block
    assert (streamed - loss.per_element).abs().max().item() <= 1e-4 * streamed.abs().max().item()
    assert torch.allclose(loss.loss, loss.per_element.mean())


def test_reconstruction_loss_trains_the_model_and_checks_its_inputs():
    preset = _preset()
    memory = _random_model(preset, seed=1).train()
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    x0 = torch.randn(BATCH, 2 * F, *_frame_shape(preset))
    noise = torch.randn_like(x0)
    t = sample_memory_timesteps(scheduler, BATCH, 2)
    empty = _text(preset, 1, seed=9)
    out = memory_reconstruction_loss(memory, scheduler, x0, empty, noise, t, 0)
    out.loss.backward()
    assert out.per_element.shape == x0.shape and torch.isfinite(out.loss)
    assert memory.patch_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="multiple of the block size 3"):
        memory_reconstruction_loss(memory, scheduler, x0, empty, noise, t, 4)
    with pytest.raises(InputError, match="exceed dit.rope_max_positions=64"):
        memory_reconstruction_loss(memory, scheduler, x0, empty, noise, t, 60)
    with pytest.raises(InputError, match="timestep_per_block must be"):
        memory_reconstruction_loss(memory, scheduler, x0, empty, noise, t[:, 0], 0)
    with pytest.raises(InputError, match="do not split into 4 equal blocks"):
        memory_reconstruction_loss(memory, scheduler, x0, empty, noise, torch.zeros(BATCH, 4), 0)
    with pytest.raises(InputError, match="noise"):
        memory_reconstruction_loss(memory, scheduler, x0, empty, noise[:, :F], t, 0)


def test_random_draws_stay_on_the_few_step_list_and_block_grid():
    scheduler = FlowMatchScheduler(_preset().scheduler, "x0")
    draws = sample_memory_timesteps(scheduler, 64, 8, torch.Generator().manual_seed(0))
    levels = scheduler.few_step_timesteps()
    assert draws.shape == (64, 8)
    assert torch.isin(draws, levels).all() and set(draws.unique().tolist()) == set(levels.tolist())
    gen = torch.Generator().manual_seed(0)
    starts = {sample_start_position(12, F, 24, gen) for _ in range(200)}
    assert starts == {0, 3, 6, 9, 12}
    with pytest.raises(InputError, match="does not fit"):
        sample_start_position(30, F, 24)


# ---------------------------------------------------------------------------------------------
# Compression while streaming


def _reference_stream(gen_model, mem_model, scheduler, preset, text, empty, num_blocks, sink_frames,
                      memory_slots, memory_sees_sinks=False):
    """Generate blocks with full forwards (no incremental cache) under the equivalent compressed
    masks.

    For block i: ONE parallel memory-model pass over the whole history writes every history frame's
    K/V into a full cache, each clean block seeing its own block and the compressed frames the
    policy held when it was written (and the uncompressed sinks, for the released MAG's ``official``
    policy); then the generator denoises block i reading only the frames the policy keeps. Block i
    draws its noise from a generator seeded ``NOISE_SEED + i``.
    """
    batch = text.shape[0]
    history = torch.zeros(batch, 0, *_frame_shape(preset))
    levels = list(scheduler.few_step_timesteps())
    for i in range(num_blocks):
        n = i * F
        cache, mask = None, None
        if n:
            write_mask = torch.zeros(n, n, dtype=torch.bool)
            for b in range(i):
                write_mask[b * F:(b + 1) * F, b * F:(b + 1) * F] = True
                compressed = [f for f in _retained_after(b * F, sink_frames, memory_slots)
                              if memory_sees_sinks or f % F == F - 1]
                write_mask[b * F:(b + 1) * F, compressed] = True
            # the write pass IS the training mask's clean rows
            if sink_frames == 0 and memory_slots is None:
                assert torch.equal(write_mask, memory_training_mask(n, F)[:n, :n])
            cache = KVCache.for_model(preset.dit, FullPolicy(), tokens_per_frame=4,
                                      horizon_frames=n, frames_per_block=F, batch_size=batch)
            mem_model(history, torch.zeros(batch), empty.expand(batch, -1, -1),
                      frame_mask=write_mask, kv_cache=cache, cache_write=True)
            visible = torch.zeros(n, dtype=torch.bool)
            visible[_retained_after(n, sink_frames, memory_slots)] = True
            mask = torch.cat([visible.expand(F, n), torch.ones(F, F, dtype=torch.bool)], 1)
        positions = torch.arange(n, n + F)
        noise_gen = torch.Generator().manual_seed(NOISE_SEED + i)
        x = torch.randn(batch, F, *_frame_shape(preset), generator=noise_gen)
        for step, t in enumerate(levels):
            tb = t.expand(batch)
            out = gen_model(x, tb, text, frame_positions=positions, frame_mask=mask, kv_cache=cache)
            x0 = scheduler.to_x0(out, x, tb)
            last = step + 1 == len(levels)
            x = x0 if last else scheduler.renoise(x0, levels[step + 1].expand(batch), noise_gen)
        history = torch.cat([history, x], 1)
    return history


def _stream(gen: StreamingGenerator, text: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``num_blocks`` blocks, block b from noise seeded ``NOISE_SEED + b``: ``[B, num_blocks * F,
    ...]``."""
    gen.reset(BATCH, num_blocks * F)
    gen.set_prompt(text)
    with torch.no_grad():
        return torch.cat([gen.generate_block(torch.Generator().manual_seed(NOISE_SEED + b))
                          for b in range(num_blocks)], 1)


@pytest.mark.parametrize(("sink_frames", "memory_slots", "name"),
                         [(0, None, "mag"), (3, None, "mag"), (1, None, "mag"), (3, 2, "bounded"),
                          (2, 3, "official")],
                         ids=["mag", "mag-sinks", "mag-partial-sink", "bounded-ring",
                              "official-ring"])
def test_streaming_with_memory_model_equals_full_forwards_with_compressed_masks(sink_frames,
                                                                                memory_slots, name):
    preset = _preset(**{"cache.memory_sink_frames": sink_frames,
                        "cache.memory_slots": memory_slots or 64})
    num_blocks = 5
    generator_model, memory_model = _random_model(preset, seed=0), _random_model(preset, seed=1)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    text, empty = _text(preset, BATCH, seed=5), _text(preset, 1, seed=9)
    policy = policy_from_name(name, preset)
    writer = writer_for(policy, memory_model=memory_model, empty_context=empty)
    gen = StreamingGenerator(generator_model, scheduler, preset, policy, writer=writer)
    assert gen.writer is writer
    streamed = _stream(gen, text, num_blocks)
    with torch.no_grad():
        reference = _reference_stream(generator_model, memory_model, scheduler, preset, text, empty,
                                      num_blocks, sink_frames, memory_slots, name == "official")
    assert (streamed - reference).abs().max().item() <= TOLERANCE
    assert streamed.abs().max() > 0.1
    kept = _retained_after(num_blocks * F, sink_frames, memory_slots)
    assert sorted(valid_slot_positions(gen.cache)) == kept
    # Sensitivity: the generator compressing its own blocks (the downsample ablation) streams
    # differently.
    self_written = StreamingGenerator(generator_model, scheduler, preset, policy,
                                      writer=GeneratorWriter(generator_model))
    assert (streamed[:, F:] - _stream(self_written, text, num_blocks)[:, F:]).abs().max() > 1e-3


def test_official_memory_model_reads_the_sinks_and_hiding_them_changes_the_stream():
    preset = _preset(**{"cache.memory_sink_frames": 2, "cache.memory_slots": 3})
    generator_model, memory_model = _random_model(preset, seed=0), _random_model(preset, seed=1)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    text, empty = _text(preset, BATCH, seed=5), _text(preset, 1, seed=9)
    streams = {}
    for policy in (policy_from_name("official", preset), MagPolicy(2, 3)):
        writer = writer_for(policy, memory_model=memory_model, empty_context=empty)
        gen = StreamingGenerator(generator_model, scheduler, preset, policy, writer=writer)
        streams[policy.name] = _stream(gen, text, 3)
        assert (policy.memory_view(gen.cache, F) is None) == (policy.name == "official")
    assert streams["official"].shape == streams["bounded"].shape
    # same plan
    torch.testing.assert_close(streams["official"][:, :2 * F], streams["bounded"][:, :2 * F])
    assert (streams["official"][:, 2 * F:] - streams["bounded"][:, 2 * F:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# KV bytes: mag = full / 3 (+ sinks), bounded stays within its budget


def _write_random_block(cache: KVCache, start: int, generator: torch.Generator) -> None:
    """One block's write through the cache API with random K/V (cheap stand-in for a model pass)."""
    pending = cache.begin_write(F)
    shape = (cache.batch_size, cache.num_heads, F * cache.tokens_per_frame, cache.head_dim)
    for layer in range(cache.num_layers):
        cache.write(layer, torch.randn(shape, generator=generator), torch.randn(shape,
                                                                                generator=generator),
                    pending)
    cache.commit(pending, torch.arange(start, start + F))


def _mag_frames(frames_done: int, sink_frames: int) -> int:
    """Frames kept by ``mag``: every frame of a full cache over 3, plus the sinks' uncompressed
    extra."""
    return len(_retained_after(frames_done, sink_frames, None))


@pytest.mark.parametrize("sink_frames", [0, 3])
def test_mag_kv_bytes_are_a_third_of_full_at_every_horizon(sink_frames):
    preset = _preset(**{"cache.memory_sink_frames": sink_frames})
    generator_model, memory_model = _random_model(preset, seed=0), _random_model(preset, seed=1)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    text, empty = _text(preset, BATCH, seed=5), _text(preset, 1, seed=9)
    mag = StreamingGenerator(generator_model, scheduler, preset, policy_from_name("mag", preset),
                             writer=MemoryWriter(memory_model, empty))
    full = StreamingGenerator(generator_model, scheduler, preset, FullPolicy())
    num_blocks = 6
    for gen in (mag, full):
        gen.reset(BATCH, num_blocks * F)
        gen.set_prompt(text)
    bpf = mag.cache.bytes_per_frame
    assert bpf == full.cache.bytes_per_frame
    # sinks kept in full instead of 1 frame per block
    sink_extra = (sink_frames - sink_frames // F) * bpf
    with torch.no_grad():
        for b in range(num_blocks):  # the real models for the first blocks
            mag.generate_block(torch.Generator().manual_seed(b))
            full.generate_block(torch.Generator().manual_seed(b))
            assert full.cache.nbytes == (b + 1) * F * bpf
            assert mag.cache.nbytes * F == full.cache.nbytes + F * sink_extra
    # Long horizon: the same policy on a cache sized for it, random K/V written through the cache
    # API.
    cache = KVCache.for_model(preset.dit, mag.policy, tokens_per_frame=4, frames_per_block=F,
                              horizon_frames=LONG_HORIZON_BLOCKS * F, batch_size=1)
    draws = torch.Generator().manual_seed(0)
    for b in range(LONG_HORIZON_BLOCKS):
        _write_random_block(cache, b * F, draws)
        full_bytes = (b + 1) * F * cache.bytes_per_frame
        if (
            cache.nbytes * F
            != full_bytes + F * (sink_frames - sink_frames // F) * cache.bytes_per_frame
        ):
            raise AssertionError(f"block {b}: mag {cache.nbytes} bytes, full {full_bytes}")
    assert cache.num_valid_frames == _mag_frames(LONG_HORIZON_BLOCKS * F, sink_frames)


def test_bounded_kv_bytes_and_attended_frames_stop_growing():
    sinks, slots = 3, 4
    preset = _preset(**{"cache.memory_sink_frames": sinks, "cache.memory_slots": slots})
    generator_model, memory_model = _random_model(preset, seed=0), _random_model(preset, seed=1)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    policy = policy_from_name("bounded", preset)
    gen = StreamingGenerator(generator_model, scheduler, preset, policy,
                             writer=MemoryWriter(memory_model, _text(preset, 1, 9)))
    real_blocks = 8
    gen.reset(BATCH, real_blocks * F)
    gen.set_prompt(_text(preset, BATCH, seed=5))
    cache = gen.cache
    budget = (sinks + slots) * cache.bytes_per_frame
    assert cache.capacity_bytes == budget  # allocated once, whatever the horizon
    assert policy.capacity_frames(10 ** 6, F) == sinks + slots
    sizes = []
    with torch.no_grad():
        for b in range(real_blocks):  # the real models while the ring fills and starts evicting
            gen.generate_block(torch.Generator().manual_seed(b))
            sizes.append(cache.nbytes)
    assert sizes == [len(_retained_after(b * F, sinks, slots)) * cache.bytes_per_frame
                     for b in range(1, real_blocks + 1)]
    assert sizes[-1] == budget  # full since block 5: 3 sinks + 4 compressed frames
    # Then random K/V through the cache API to a long horizon: never above the budget.
    draws = torch.Generator().manual_seed(0)
    largest = 0
    for b in range(real_blocks, LONG_HORIZON_BLOCKS):
        _write_random_block(cache, b * F, draws)
        largest = max(largest, cache.nbytes)
    assert largest == budget and cache.num_valid_frames == sinks + slots
    # The ring holds the sinks and the newest compressed frames: the oldest were evicted.
    assert sorted(valid_slot_positions(cache)) == _retained_after(LONG_HORIZON_BLOCKS * F, sinks,
                                                                  slots)
    assert cache.frames_seen == LONG_HORIZON_BLOCKS * F
    # The memory model reads the compressed frames only: sink frames 0 and 1 stay hidden from it.
    view = policy.memory_view(cache, F)
    assert [slot for slot, ok in zip(cache.valid_slots, view, strict=True) if not ok] == [0, 1]


# ---------------------------------------------------------------------------------------------
# Policy names and writer guards


def test_window_and_compressed_policies_take_their_own_sink_counts():
    preset = _preset(**{"cache.sink_frames": 2, "cache.memory_sink_frames": 0})
    assert policy_from_name("window", preset).sink_frames == 2
    assert policy_from_name("downsample", preset).sink_frames == 0
    for name in ("mag", "bounded"):
        assert policy_from_name(name, preset).sink_frames == 0


def test_mag_and_bounded_by_name_need_a_memory_model():
    preset = _preset()
    for name in ("mag", "bounded"):
        with pytest.raises(ConfigError, match=rf"policy '{name}' needs the trained MAG memory "
                                              r"model.*"
                                              r"memory_model=load_memory_model\(path\)"):
            writer_for(policy_from_name(name, preset))
    memory_model, empty = _random_model(preset, seed=1), _text(preset, 1, 9)
    mag = policy_from_name("mag", preset)
    with pytest.raises(ConfigError, match="empty_context not given"):
        writer_for(mag, memory_model=memory_model)
    bounded = policy_from_name("bounded", preset)
    writer = writer_for(mag, memory_model=memory_model, empty_context=empty)
    assert isinstance(mag, MagPolicy) and isinstance(writer, MemoryWriter)
    assert (mag.name, mag.sink_frames, mag.memory_slots) == ("mag", preset.cache.memory_sink_frames,
                                                             None)
    assert (bounded.name, bounded.memory_slots) == ("bounded", preset.cache.memory_slots)
    assert writer.model is memory_model
    downsample = policy_from_name("downsample", preset)
    assert writer_for(downsample, memory_model=memory_model, empty_context=empty) is None
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    with pytest.raises(ConfigError, match="policy 'mag' has no memory-model writer"):
        StreamingGenerator(_random_model(preset, seed=0), scheduler, preset, MagPolicy(3))


def test_memory_writer_refuses_uncompressed_caches_and_foreign_architectures():
    preset = _preset()
    memory_model, empty = _random_model(preset, seed=1), _text(preset, 1, 9)
    block = torch.randn(BATCH, F, *_frame_shape(preset))
    writer = MemoryWriter(memory_model, empty)
    full = KVCache.for_model(preset.dit, FullPolicy(), tokens_per_frame=4, horizon_frames=F,
                             frames_per_block=F, batch_size=BATCH)
    with pytest.raises(ConfigError, match="needs a MagPolicy.*got policy 'full'"):
        writer.write(full, block, torch.arange(F))
    wide = _preset(**{"dit.num_heads": 4})
    other = KVCache.for_model(wide.dit, MagPolicy(), tokens_per_frame=4, horizon_frames=F,
                              frames_per_block=F, batch_size=BATCH)
    with pytest.raises(ConfigError, match="must share the generator's architecture"):
        writer.write(other, block, torch.arange(F))
    batched = MemoryWriter(memory_model, _text(preset, 3, 9))
    cache = KVCache.for_model(preset.dit, MagPolicy(), tokens_per_frame=4, horizon_frames=F,
                              frames_per_block=F, batch_size=BATCH)
    with pytest.raises(InputError, match="empty context has batch 3"):
        batched.write(cache, block, torch.arange(F))


# ---------------------------------------------------------------------------------------------
# Loading guards


def _model_file(tmp_path, preset, model, stage: str | None, recipe: dict | None = None):
    """A training checkpoint, exported as a model file of ``stage`` (None: the raw checkpoint)."""
    metadata = {"preset": preset.to_dict(), "kind": "training"}
    if recipe is not None:
        metadata["recipe"] = recipe
    state = TrainingState(step=3, model=model.state_dict(), ema=None, optimizer=None, rng={},
                          metadata=metadata, extra={})
    checkpoint = save_checkpoint(tmp_path / f"ckpt-{stage}", state)
    if stage is None:
        return checkpoint
    return export_model(checkpoint, tmp_path / f"{stage}.safetensors", name=f"tiny-{stage}",
                        stage=stage)


def test_memory_and_generator_files_cannot_be_swapped(tmp_path):
    preset = _preset()
    memory_model = _random_model(preset, seed=1)
    memory_file = _model_file(tmp_path, preset, memory_model, "memory")
    dmd_file = _model_file(tmp_path, preset, _random_model(preset, seed=0), "dmd")

    loaded, loaded_preset, meta = load_memory_model(memory_file)
    assert meta["stage"] == "memory" and loaded_preset == preset
    assert torch.equal(loaded.head.head.weight, memory_model.head.head.weight)
    with pytest.raises(CheckpointError, match="holds a 'dmd' model but a memory model is expected "
                                              "here"):
        load_memory_model(dmd_file)
    with pytest.raises(
        CheckpointError,
        match="holds a 'memory' model but a teacher / causal / "
        "dmd /"
        " mag-generator model is expected.*load_memory_model",
    ):
        load_generator(memory_file)
    with pytest.raises(CheckpointError, match="'memory' model"):
        load_model(memory_file, expect_stage=GENERATOR_STAGES)
    assert load_generator(dmd_file)[2]["stage"] == "dmd"


def test_training_checkpoints_are_judged_by_their_recipe_objective(tmp_path):
    preset = _preset()
    model = _random_model(preset, seed=0)
    causal = _model_file(tmp_path / "causal", preset, model, None,
                         recipe={"objective": {"kind": "causal_fm"}})
    with pytest.raises(CheckpointError, match="holds a 'causal' model but a memory model"):
        load_memory_model(causal)
    unknown = _model_file(tmp_path / "unknown", preset, model, None)
    with pytest.raises(CheckpointError,
                       match="does not say which stage.*mag export --stage memory"):
        load_memory_model(unknown)
    load_generator(unknown)  # older generator checkpoints carry no stage and still load
    memory = _model_file(tmp_path / "memory", preset, model, None,
                         recipe={"objective": {"kind": "memory"}})
    assert isinstance(load_memory_model(memory)[0], WanDiT)


def test_memory_model_mismatch_names_the_first_differing_field():
    from mag.memory import memory_model_mismatch

    generator = get_preset("tiny")
    assert memory_model_mismatch(generator, generator) is None
    layers = get_preset("tiny", **{"dit.num_layers": 2})
    assert memory_model_mismatch(generator,
                                 layers) == "dit (num_layers: 4 vs 2; generator vs memory model)"
    block = get_preset("tiny", **{"cache.frames_per_block": 2})
    assert memory_model_mismatch(generator, block) == ("cache.frames_per_block (3 vs 2; generator "
                                                       "vs memory"
                                                       " model)")
    video = get_preset("tiny", **{"video.height": 16})
    assert memory_model_mismatch(generator, video).startswith("video (height: 32 vs 16")
    assert memory_model_mismatch(generator, video, fields=("dit", "cache.frames_per_block")) is None
