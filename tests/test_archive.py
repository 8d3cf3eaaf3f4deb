"""The ``archive`` policy: bounded until the ring evicts, retrieval by view or by keys, re-assigned
positions that equal keys written there, bounded GPU slots and an archive that spills to disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_dit

from mag.cache import ArchiveCache, ArchivePolicy, MagPolicy, retained_frames
from mag.cache.archive import coverage_order
from mag.cache.rotary import temporal_shift_tables
from mag.cache.store import FrameArchive
from mag.config import get_preset
from mag.memory import MemoryWriter
from mag.models.layers import apply_rotary, rotation_tables
from mag.pipelines import StreamingGenerator
from mag.pipelines.writers import policy_from_name

TOLERANCE = 1e-5
F = 3
SINKS, RING, RETRIEVED = 3, 2, 2
TEXT_TOKENS = 3
# 8x8 frames, 4x4 patches: 2x2 tokens, a view 2 patches wide; positions cap at 64 (the stream of the
# long test is longer).
SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "dit.text_dim": 16, "dit.freq_dim": 16, "dit.rope_max_positions": 64,
         "video.height": 8, "video.width": 8}
VIEW = 2
# Camera (patches) of blocks 1..8: a pan that never comes back; block 9 returns to block 2's view.
PAN = (10, 20, 30, 40, 50, 60, 70, 80)
RETURN_BLOCK, RETURN_VIEW, SEEN_AT_BLOCK = 9, 20, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(camera: bool, policy, seed: int = 0):
    preset = get_preset("tiny", **SMALL, **({"dit.camera_rope": True} if camera else {}))
    generator, memory = random_dit(preset.dit, seed), random_dit(preset.dit, seed + 1)
    text = torch.randn(1, TEXT_TOKENS, preset.dit.text_dim,
                       generator=torch.Generator().manual_seed(seed))
    empty = torch.zeros(1, TEXT_TOKENS, preset.dit.text_dim)
    gen = StreamingGenerator.for_preset(generator, preset, policy,
                                        writer=MemoryWriter(memory, empty))
    return preset, gen, memory, text, empty


def _latents(blocks: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(1, blocks * F, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _cameras(blocks: int) -> torch.Tensor:
    views = [0, *PAN, RETURN_VIEW][:blocks]
    return torch.tensor(views, dtype=torch.float64).repeat_interleave(F)[None]


def _archive_policy(**kwargs) -> ArchivePolicy:
    return ArchivePolicy(SINKS, RING, RETRIEVED, **kwargs)


def _layer0_key(memory, latents: torch.Tensor, position: int, camera: float | None, empty):
    """Layer-0 key of one clean frame written by ``memory`` at RoPE ``position``: it depends on the
    frame alone, so it is what the cache must hand out for that frame read at that position."""
    captured = {}
    block = memory.blocks[0]
    original = block.before_cache

    def spy(*args):
        q, k, v = original(*args)
        captured["k"] = k
        return q, k, v

    block.before_cache = spy
    try:
        with torch.no_grad():
            memory(latents, torch.zeros(1), empty, frame_positions=[position],
                   width_offsets=None if camera is None else torch.tensor([[camera]]))
    finally:
        del block.before_cache
    return captured["k"]


def test_archive_is_bounded_exactly_until_the_ring_first_evicts():
    torch.manual_seed(0)
    latents = _latents(4)
    outputs = {}
    for name, policy in (("archive", _archive_policy()), ("bounded", MagPolicy(SINKS, RING))):
        _, gen, _, text, _ = _setup(False, policy)
        gen.reset(batch_size=1, horizon_frames=4 * F)
        gen.set_prompt(text)
        blocks = [gen.predict_block_teacher_forced(latents[:, b * F:(b + 1) * F],
                                                   torch.Generator().manual_seed(b))
                  for b in range(4)]
        outputs[name] = (torch.cat(blocks, 1), gen.cache)
    # Blocks 0..3 read at most sinks + 2 ring frames: block 3 is the first whose write evicts.
    assert torch.equal(outputs["archive"][0], outputs["bounded"][0])
    assert len(outputs["archive"][1].archive) == 1


def test_a_return_retrieves_the_frame_of_its_view_at_positions_of_a_short_stream():
    _, gen, memory, text, empty = _setup(True, _archive_policy())
    latents, cameras = _latents(RETURN_BLOCK + 1), _cameras(RETURN_BLOCK + 1)
    history = RETURN_BLOCK * F
    gen.reset(batch_size=1, horizon_frames=history + F)
    gen.set_prompt(text)
    gen.feed(latents[:, :history], cameras[:, :history])
    cache = gen.cache
    assert isinstance(cache, ArchiveCache) and len(cache.archive) == RETURN_BLOCK - 1 - RING
    cache.prepare_block(history, cameras[:, history:])
    slots = list(cache.valid_slots)
    frames = cache.slot_frames[0, slots]
    retrieved = sorted(frames[np.array(slots) >= SINKS + RING].tolist())
    # The frame of block 2 (its view) and, among frames that do not overlap, the newest archived.
    newest_archived = (RETURN_BLOCK - RING - 1) * F + F - 1
    assert retrieved == [SEEN_AT_BLOCK * F + F - 1, newest_archived]
    assigned = cache.assigned_positions()[0]
    reference = _archive_policy().reference_frames(F)
    assert cache.rope_position(history) == reference
    # Sinks, retrieved (oldest first), ring: the layout of a 15-frame stream, one block apart.
    layout = [int(a) for _, a in sorted(zip(frames.tolist(), assigned.tolist(), strict=True))]
    assert layout == [0, 1, 2, 5, 8, 11, 14]
    # Every key read (sinks, ring, retrieved) is the key of its frame written at its new position.
    keys, _ = cache.read(0)
    tokens = cache.tokens_per_frame
    for i, (frame, position) in enumerate(zip(frames.tolist(), assigned.tolist(), strict=True)):
        expected = _layer0_key(memory, latents[:, frame:frame + 1], position,
                               float(cameras[0, frame]), empty)
        torch.testing.assert_close(keys[:, :, i * tokens:(i + 1) * tokens], expected,
                                   atol=TOLERANCE, rtol=0)


def test_without_a_camera_retrieval_follows_content_similarity():
    _, gen, _, text, _ = _setup(False, ArchivePolicy(SINKS, RING, 1))
    latents = _latents(RETURN_BLOCK)
    # Block 8 (the newest ring frame when block 9 is prepared) shows block 2's content again.
    latents[:, 8 * F:9 * F] = latents[:, SEEN_AT_BLOCK * F:(SEEN_AT_BLOCK + 1) * F]
    gen.reset(batch_size=1, horizon_frames=(RETURN_BLOCK + 1) * F)
    gen.set_prompt(text)
    gen.feed(latents)
    cache = gen.cache
    cache.prepare_block(RETURN_BLOCK * F, None)
    # One slot, six archived frames: the one of the same content must win.
    assert cache.slot_frames[0, SINKS + RING] == SEEN_AT_BLOCK * F + F - 1


def test_gpu_slots_stay_fixed_and_positions_bounded_past_the_rope_table():
    preset, gen, _, text, _ = _setup(True, _archive_policy())
    blocks = 30  # 90 frames: past dit.rope_max_positions = 64
    gen.reset(batch_size=1, horizon_frames=blocks * F)
    gen.set_prompt(text)
    capacity = gen.cache.k.shape
    views = torch.arange(blocks * F, dtype=torch.float64)[None] % 7
    for b in range(blocks):
        gen.generate_block(torch.Generator().manual_seed(b), views[:, b * F:(b + 1) * F])
    cache = gen.cache
    assert cache.k.shape == capacity and cache.capacity_frames == SINKS + RING + RETRIEVED
    assert len(cache.archive) == blocks - 1 - RING
    assert cache.archive.nbytes == len(cache.archive) * cache.bytes_per_frame
    cache.prepare_block(blocks * F, views[:, -F:])
    assigned = cache.assigned_positions()
    assert assigned.min() >= 0 and assigned.max() < cache.rope_position(blocks * F)
    # The host-only replay (KV accounting of `mag bench speed`) counts the same slots.
    replayed = retained_frames(_archive_policy(), preset, [F, 3 * F, 4 * F, blocks * F])
    assert replayed == [SINKS, SINKS + RING, SINKS + RING + 1, len(cache.valid_slots)]


def test_shifting_a_rotated_key_equals_rotating_it_at_the_new_position():
    preset = get_preset("tiny", **SMALL, **{"dit.camera_rope": True})
    model = random_dit(preset.dit)
    x = torch.randn(1, preset.dit.num_heads, 3 * 4, preset.dit.head_dim)
    offsets = torch.tensor([[1.5, 2.0, 7.0]])
    at = [5, 9, 2]
    shifts = torch.tensor([[4, -6, 30]])
    rotated = apply_rotary(x, *rotation_tables(*model.rope(torch.tensor(at), 2, 2, offsets)))
    cos, sin = temporal_shift_tables(shifts, 4, preset.dit.head_dim, preset.dit.rope_theta)
    moved = apply_rotary(rotated, cos, sin)
    target = torch.tensor(at) + shifts[0]
    expected = apply_rotary(x, *rotation_tables(*model.rope(target, 2, 2, offsets)))
    torch.testing.assert_close(moved, expected, atol=TOLERANCE, rtol=0)


def test_archive_spills_to_disk_and_reads_back_what_it_stored(tmp_path):
    shape = (2, 1, 2, 4, 8)  # layers, batch, heads, tokens, head_dim
    frame_bytes = 2 * int(np.prod(shape)) * 4
    archive = FrameArchive(shape, torch.float32, pin=False, host_bytes=frame_bytes,
                           spill_dir=tmp_path, chunk_frames=2)
    frames = [(torch.randn(shape), torch.randn(shape)) for _ in range(7)]
    for i, (k, v) in enumerate(frames):
        archive.append(k, v, stored_position=i, frame_index=3 * i, camera=None, descriptor=None)
    assert archive.disk_bytes > 0 and archive.host_bytes_used <= 2 * 2 * frame_bytes
    assert len(list(tmp_path.glob("mag-archive-*/chunk_*.bin"))) == archive.disk_bytes // (
        2 * frame_bytes)
    for i, (k, v) in enumerate(frames):
        assert torch.equal(archive.frame(i, 0), torch.stack([k[:, 0], v[:, 0]]))
    archive.clear()
    assert not list(tmp_path.glob("mag-archive-*"))


def test_archive_is_a_memory_policy_by_name():
    preset = get_preset("tiny")
    policy = policy_from_name("archive", preset)
    assert isinstance(policy, ArchivePolicy) and policy.name == "archive"
    assert policy.capacity_frames(10_000, F) == (preset.cache.memory_sink_frames
                                                 + preset.cache.archive_ring_slots
                                                 + preset.cache.archive_retrieval_slots)


def test_retrieval_covers_the_view_before_repeating_it():
    # A block looking at patches 0..11 (cameras 0, 2, 4; views 8 wide). The archive saw that place
    # on three sweeps at camera 0 (newest) and once at camera 4 (oldest), and once far away.
    cameras = np.array([4.0, 0.0, 0.0, 0.0, 40.0])
    block = np.array([0.0, 2.0, 4.0])
    scores = np.clip(8 - np.abs(cameras[:, None] - block[None, :]), 0, None).max(axis=1)
    top_k = np.lexsort((-np.arange(5), -scores))[:2]
    assert sorted(cameras[top_k].tolist()) == [0.0, 0.0]  # overlap alone: one view twice
    chosen = coverage_order(cameras, block, 8, scores, 2)
    # The whole view: equal gains go to the newest sweep of camera 0, then camera 4 adds 8..11.
    assert chosen.tolist() == [3, 0]
    # With the view covered, the remaining slots go by overlap, newest first; the far frame last.
    assert coverage_order(cameras, block, 8, scores, 5).tolist()[-1] == 4
