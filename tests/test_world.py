import numpy as np
import pytest

from mag.errors import ConfigError, InputError
from mag.world import (
    NUM_TEST_EPISODES,
    SPLIT_SEEDS,
    THEMES,
    WorldConfig,
    get_world_config,
    last_seen,
    make_clip,
    make_episode,
    render_frames,
    sample_clip,
)

SUBPIXEL = WorldConfig(integer_motion=False)


def _same_episode(a, b):
    return (a.frames.tobytes() == b.frames.tobytes() and a.offsets.tobytes() == b.offsets.tobytes()
            and a.velocities.tobytes() == b.velocities.tobytes() and a.prompt == b.prompt
            and a.switch_frame == b.switch_frame and a.turn_frame == b.turn_frame)


def test_same_split_and_index_gives_identical_bytes():
    assert _same_episode(make_episode("test", 5), make_episode("test", 5))
    assert _same_episode(make_episode("val", 5, config=SUBPIXEL), make_episode("val", 5,
                                                                               config=SUBPIXEL))


def test_explicit_seed_base_is_reproducible_and_overrides_the_split_range():
    a = make_episode("test", 2, seed_base=1234)
    assert a.seed == 1236
    assert _same_episode(a, make_episode("test", 2, seed_base=1234))
    assert _same_episode(a, make_episode("val", 2, seed_base=1234))
    assert not _same_episode(a, make_episode("test", 2))


def test_splits_use_disjoint_seed_ranges_and_differ():
    ranges = sorted(SPLIT_SEEDS.values(), key=lambda r: r.start)
    assert all(lo.stop <= hi.start for lo, hi in zip(ranges, ranges[1:], strict=False))
    assert len(SPLIT_SEEDS["test"]) >= NUM_TEST_EPISODES == 176
    for index in range(3):
        episodes = [make_episode(split, index) for split in ("train", "val", "test")]
        assert len({e.seed for e in episodes}) == 3
        assert len({e.frames.tobytes() for e in episodes}) == 3


def test_unknown_split_and_bad_index_raise_config_error():
    with pytest.raises(ConfigError, match="unknown split 'dev'; valid splits: train, val, test"):
        make_episode("dev", 0)
    with pytest.raises(ConfigError, match="index"):
        make_episode("test", -1)
    with pytest.raises(ConfigError, match="out of range"):
        make_episode("test", len(SPLIT_SEEDS["test"]))


@pytest.mark.parametrize("config", [WorldConfig(), SUBPIXEL], ids=["integer", "subpixel"])
def test_revisited_offsets_render_identical_frames(config):
    revisits = 0
    for index in range(4):
        ep = make_episode("test", index, config=config)
        seen, _ = ep.last_seen()
        for t in np.flatnonzero(seen >= 0):
            assert ep.offsets[t] == ep.offsets[seen[t]]
            np.testing.assert_array_equal(ep.frames[t], ep.frames[seen[t]])
            revisits += 1
        if not config.integer_motion:  # the sub-pixel world really is sub-pixel
            assert np.any(ep.offsets % 1 != 0)
    assert revisits > 40


def test_render_integer_offsets_are_exact_wrapped_slices():
    pano = make_episode("test", 0).panorama
    frames = render_frames(pano, np.array([0.0, 250.0, 250.0 + 256, -6.0]))
    np.testing.assert_array_equal(frames[0], pano[:, :32])
    wrapped = np.concatenate([pano[:, 250:], pano[:, :26]], axis=1)
    for i in (1, 2, 3):
        np.testing.assert_array_equal(frames[i], wrapped)


def test_render_subpixel_interpolates_between_columns():
    pano = make_episode("test", 1).panorama
    half = render_frames(pano, np.array([10.5]))[0].astype(np.float32)
    expected = (pano[:, 10:42].astype(np.float32) + pano[:, 11:43]) / 2
    assert np.abs(half - expected).max() <= 0.5 + 1e-6
    quarter = render_frames(pano, np.array([10.25, 10.25]))
    np.testing.assert_array_equal(quarter[0], quarter[1])


def test_render_rejects_bad_inputs():
    pano = make_episode("test", 0).panorama
    with pytest.raises(InputError, match="uint8"):
        render_frames(pano.astype(np.float32), np.zeros(2))
    with pytest.raises(InputError, match="finite 1-D"):
        render_frames(pano, np.array([np.nan]))
    with pytest.raises(InputError, match="does not fit"):
        render_frames(pano, np.zeros(1), frame_width=300)


@pytest.mark.parametrize("config", [WorldConfig(), SUBPIXEL], ids=["integer", "subpixel"])
def test_switch_frame_is_a_block_boundary_one_block_after_the_turn(config):
    block = config.block_frames
    for index in range(20):
        ep = make_episode("test", index, config=config)
        assert ep.switch_frame % block == 0
        assert block <= ep.switch_frame - ep.turn_frame < 2 * block
        outward, back = (
            np.sign(ep.velocities[0]),
            np.sign(ep.velocities[ep.turn_frame : ep.switch_frame]),
        )
        assert np.all(back == -outward)  # the history already shows the camera going back


def test_history_before_the_switch_covers_the_revisited_views():
    config = WorldConfig()
    for index in range(10):
        ep = make_episode("test", index, config=config)
        seen, gap = ep.last_seen()
        # return leg reaches the start
        back_at_start = int(np.flatnonzero(ep.offsets == ep.offsets[0])[-1])
        assert back_at_start > ep.switch_frame
        after = np.arange(ep.switch_frame, back_at_start + 1)
        assert np.all((seen[after] >= 0) & (seen[after] < ep.switch_frame))
        assert np.all(gap[after] == after - seen[after])
        assert np.all(np.diff(gap[after]) > 0)  # views further back were seen longer ago
        # Past the start the views are new (until the camera has gone all the way round the
        # cylinder).
        assert np.all(seen[back_at_start + 1:back_at_start + 2 * config.block_frames] == -1)


def test_last_seen_finds_the_latest_same_view_and_wraps_around():
    offsets = np.array([0.0, 1.0, 2.0, 1.0, 0.0, 5.0], dtype=np.float32)
    assert last_seen(offsets, 3) == (1, 2)
    assert last_seen(offsets, 4) == (0, 4)
    assert last_seen(offsets, 5) == (-1, -1)
    assert last_seen(offsets, 0) == (-1, -1)
    assert last_seen(np.array([1.0, 257.0]), 1, period=256) == (0, 1)
    assert last_seen(np.array([1.0, 257.0]), 1) == (-1, -1)


def test_velocities_are_the_camera_moves_between_frames():
    for config in (WorldConfig(), SUBPIXEL):
        ep = make_episode("test", 7, config=config)
        moved = (np.diff(ep.offsets.astype(np.float64)) - ep.velocities[1:] + 128) % 256 - 128
        assert np.abs(moved).max() < 1e-3
        assert ep.velocities[0] != 0


def test_longer_episodes_only_extend_the_return_leg():
    short = make_episode("test", 3)
    long = make_episode("test", 3, config=WorldConfig(episode_frames=200))
    np.testing.assert_array_equal(long.frames[:96], short.frames)
    assert long.switch_frame == short.switch_frame


def test_prompt_names_the_theme_but_not_the_layout():
    config = WorldConfig(themes=("lava cave",))
    a, b = make_episode("test", 0, config=config), make_episode("test", 1, config=config)
    assert a.theme == b.theme == "lava cave"
    assert THEMES["lava cave"].scene in a.prompt and THEMES["lava cave"].scene in b.prompt
    assert not np.array_equal(a.panorama, b.panorama)
    themes = {make_episode("test", i).theme for i in range(30)}
    assert len(themes) >= 4


def test_sample_clip_draws_reproducible_train_worlds_that_turn_back():
    a, b = sample_clip(7, 24), sample_clip(np.random.default_rng(7), 24)
    assert a.seed == b.seed and a.seed in SPLIT_SEEDS["train"]
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.frames.shape == (24, 32, 32, 3) and a.offsets.shape == a.velocities.shape == (24,)
    rng = np.random.default_rng(0)
    easy = get_world_config("recall-easy")
    for _ in range(10):
        clip = sample_clip(rng, 12, easy)
        assert 0 < clip.turn_frame <= 12 - easy.block_frames
        assert np.all(np.isin(np.abs(clip.velocities), (0, 4)))  # patch-aligned motion or a pause
        assert np.all((clip.offsets - clip.offsets[0]) % 4 == 0)


def test_switching_texture_or_stripes_off_keeps_the_same_layout():
    seed, config = 99, WorldConfig(themes=("neon city",))  # a theme with stripes and texture
    textured = make_clip(seed, 8, config).panorama.astype(np.int16)
    untextured = make_clip(seed, 8, config.replace(texture_scale=0.0)).panorama.astype(np.int16)
    no_stripes = make_clip(seed, 8, config.replace(texture_scale=0.0, stripes=False)).panorama
    noise = np.abs(textured - untextured)
    # same picture, plus noise
    assert noise.max() > 0 and noise.mean() < THEMES["neon city"].texture_levels
    stripe_area = np.any(no_stripes != untextured, axis=-1).mean()
    assert 0 < stripe_area < 0.2  # only the stripe patches changed
    flat = make_clip(seed, 8, config.replace(texture_scale=0.0, stripes=False,
                                             background_wave_levels=0.0))
    # Without texture and background wave, neighbouring pixels in a row are mostly equal (flat
    # regions).
    assert np.mean(np.all(flat.panorama[:, 1:] == flat.panorama[:, :-1], axis=-1)) > 0.8


@pytest.mark.parametrize("changes, message", [
    ({"frame_width": 256}, "must fit in the panorama"),
    ({"speed_range_px": (1.5, 3.5), "speed_quantum_px": 4}, "contains no multiple"),
    ({"themes": ("moon base",)}, "unknown theme"),
    ({"episode_frames": 40}, "too short"),
    ({"texture_scale": -1.0}, "texture_scale"),
    ({"background_wave_levels": float("nan")}, "background_wave_levels"),
    ({"excursion_frames_range": (10, 5)}, "low <= high"),
    ({"colors_per_panorama": 9}, "palette"),
    ({"block_frames": 0}, "positive int"),
    ({"nope": 1}, "no field"),
])
def test_world_config_rejects_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        WorldConfig().replace(**changes)


def test_named_worlds():
    assert get_world_config() == WorldConfig()
    assert get_world_config("recall-easy", episode_frames=60).episode_frames == 60
    with pytest.raises(ConfigError, match="valid worlds"):
        get_world_config("hard")


def test_multi_leg_training_clips_oscillate_and_revisit():
    from mag.world import get_world_config, sample_clip

    cfg = get_world_config("recall-easy", legs_range=(4, 4), excursion_frames_range=(4, 6),
                           pause_frames_range=(0, 0))
    clip = sample_clip(3, 30, cfg)
    moving = clip.velocities[clip.velocities != 0]
    turns = int((np.sign(moving[1:]) != np.sign(moving[:-1])).sum())
    assert turns == 3  # four legs
    seen, gap = clip.last_seen()
    assert (seen[clip.turn_frame:] >= 0).mean() > 0.5  # later legs mostly revisit earlier views
    # The default two-leg world is untouched by the legs knob.
    base = get_world_config("recall-easy")
    a = sample_clip(5, 30, base)
    b = sample_clip(5, 30, base.replace(legs_range=(2, 2)))
    assert np.array_equal(a.offsets, b.offsets)
