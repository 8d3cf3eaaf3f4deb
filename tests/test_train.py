"""Training stack: teacher forcing matches streaming, exact resume, safe checkpoints, recall
signal."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from mag.cache import FullPolicy, KVCache
from mag.checkpoint import (
    TrainingState,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from mag.errors import CheckpointError, ConfigError
from mag.objectives.flow_matching import teacher_forcing_mask
from mag.train.recall import NEW, RECALL, RECENT, view_categories
from mag.train.recipe import load_recipe, recipe_from_dict
from mag.train.trainer import Trainer

TINY_OVERRIDES = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
                  "dit.freq_dim": 16, "video.height": 16, "video.width": 16}


def _recipe(steps: int = 4, **changes):
    data = {
        "name": "test", "preset": "tiny", "preset_overrides": dict(TINY_OVERRIDES),
        "loop": {"steps": steps, "batch_size": 2, "grad_accum": 2, "log_every": 1, "ckpt_every": 2,
                 "keep_last": 5, "seed": 7},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9},
        "data": {"clip_frames": 6, "world": {"pano_width": 64}},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        data.setdefault(section, {})[field] = value
    return recipe_from_dict(data)


def test_teacher_forcing_mask_reproduces_streaming_with_a_full_cache(make_dit):
    """The parallel [clean ; noisy] pass sees, for noisy block i, exactly what streaming block i
    sees."""
    model = make_dit()
    cfg, fpb, blocks, h, w = model.cfg, 3, 3, 4, 4
    frames = fpb * blocks
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(1, frames, cfg.in_channels, h, w, generator=gen)
    noisy = torch.randn(1, frames, cfg.in_channels, h, w, generator=gen)
    t = torch.tensor([[700.0] * 3 + [300.0] * 3 + [500.0] * 3])
    ctx = torch.randn(1, 3, cfg.text_dim, generator=gen)
    with torch.no_grad():
        seq = torch.cat([clean, noisy], 1)
        ts = torch.cat([torch.zeros_like(t), t], 1)
        parallel = model(seq, ts, ctx, frame_positions=torch.arange(frames).repeat(2),
                         frame_mask=teacher_forcing_mask(frames, fpb))[:, frames:]
        cache = KVCache.for_model(cfg, FullPolicy(), tokens_per_frame=(h // 2) * (w // 2),
                                  horizon_frames=frames, frames_per_block=fpb)
        for b in range(blocks):
            sl = slice(b * fpb, (b + 1) * fpb)
            out = model(noisy[:, sl], t[:, sl], ctx, frame_positions=range(sl.start, sl.stop),
                        kv_cache=cache)
            assert (out - parallel[:, sl]).abs().max() <= 1e-5
            model(clean[:, sl], torch.zeros(1), ctx, frame_positions=range(sl.start, sl.stop),
                  kv_cache=cache, cache_write=True)


def test_teacher_forcing_mask_layout():
    m = teacher_forcing_mask(6, 3)
    assert m[:3, :3].all() and not m[:3, 3:].any()           # clean block 0: own block only
    assert m[3:6, :6].all() and not m[3:6, 6:].any()          # clean block 1: clean blocks 0-1
    assert not m[6:9, :6].any() and m[6:9, 6:9].all()         # noisy block 0: itself only
    assert m[9:, :3].all() and not m[9:, 3:9].any() and m[9:, 9:].all()  # noisy block 1


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    straight = Trainer(_recipe(steps=4), tmp_path / "a", progress=False)
    straight.run()
    first = Trainer(_recipe(steps=4), tmp_path / "b", progress=False)
    first.run(max_steps=2)
    del first
    resumed = Trainer(_recipe(steps=4), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key, value in straight.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[key]), f"ema {key}"
    state_a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    state_b = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    for pid, slots in state_a.optimizer["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, state_b.optimizer["state"][pid][name]), (pid, name)
    # The run actually trained: weights moved away from the initialisation.
    fresh = Trainer(_recipe(steps=4), tmp_path / "c", progress=False)
    assert any(not torch.equal(a[k], v) for k, v in _params(fresh).items())


def test_checkpoint_rng_state_round_trip_replays_the_same_draws(tmp_path):
    # Training draws come from per-sample generators, so the bitwise resume test cannot see the
    # global RNG; the checkpoint still carries it (anything drawing from it after a resume must
    # replay the same numbers).
    torch.manual_seed(123)
    state = TrainingState(step=1, model={"w": torch.zeros(1)}, ema=None, optimizer=None,
                          rng=capture_rng(), metadata={}, extra={})
    path = save_checkpoint(tmp_path, state)
    expected = torch.rand(8)
    torch.manual_seed(456)  # move the RNG elsewhere, as a new process would be
    restore_rng(load_checkpoint(path).rng)
    assert torch.equal(torch.rand(8), expected)


def test_checkpoint_metadata_names_recipe_and_commit(tmp_path):
    Trainer(_recipe(steps=2), tmp_path, progress=False).run()
    state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert state.step == 2
    assert state.metadata["recipe"]["name"] == "test"
    assert state.metadata["commit"]
    assert state.metadata["preset"]["dit"]["dim"] == 32
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 and '"loss_recall"' in records[0]


def test_corrupt_checkpoint_gives_clear_error_and_nothing_is_overwritten(tmp_path):
    Trainer(_recipe(steps=2), tmp_path, progress=False).run()
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated, as by a crash outside our atomic write
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(_recipe(steps=4), tmp_path, resume=True, progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert before == after


def test_resume_with_an_incompatible_recipe_is_refused(tmp_path):
    Trainer(_recipe(steps=2), tmp_path, progress=False).run()
    files = list_checkpoints(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="optim.lr"):
        Trainer(_recipe(steps=4, **{"optim.lr": 5e-4}), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(_recipe(steps=4), tmp_path, progress=False)
    assert list_checkpoints(tmp_path / "checkpoints") == files
    # Training longer is a compatible change.
    Trainer(_recipe(steps=3), tmp_path, resume=True, progress=False).run()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003.safetensors"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    Trainer(_recipe(steps=6, **{"loop.keep_last": 2, "loop.ckpt_every": 1}), tmp_path,
            progress=False).run()
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000005.safetensors", "step_00000006.safetensors"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert "model.blocks.0.self_attn.q.weight" in load_file(
        str(tmp_path / "checkpoints" / names[-1])
    )


def test_recipe_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[loop]\nbatch_size = 3\ngrad_accum = 2\n")
    with pytest.raises(ConfigError, match="divisible"):
        load_recipe(bad)
    bad.write_text("name = 'x'\n[objective]\nkind = 'magic'\n")
    with pytest.raises(ConfigError, match="objective.kind"):
        load_recipe(bad)
    bad.write_text("name = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.toml")


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.toml"))
    assert recipes, "recipes/ should ship at least one recipe"
    for path in recipes:
        load_recipe(path)


def test_view_categories_on_a_hand_made_backtrack():
    # 8-px frames on a 64-px panorama, 4 px/frame right for 3 frames, then back; blocks of 1 frame.
    offsets = torch.tensor([[0.0, 4, 8, 4, 0, 0]])
    cat = view_categories(offsets, frame_width=8, panorama_width=64, frames_per_block=1,
                          window_frames=2)
    assert (cat[0, 0] == NEW).all()                      # nothing seen before
    assert (cat[0, 1, :4] == RECENT).all() and (cat[0, 1, 4:] == NEW).all()
    # frame 2 showed 8..15, frame 1 showed 4..11
    assert (cat[0, 3] == RECENT).all()
    # frame 4 shows 0..7: columns 0..3 last seen at frame 0 (gap 4 > window 2), 4..7 at frame 3 (gap
    # 1)
    assert (cat[0, 4, :4] == RECALL).all() and (cat[0, 4, 4:] == RECENT).all()
    assert (cat[0, 5] == RECENT).all()


def test_cli_train_then_plot(tmp_path, capsys):
    from mag.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'name = "cli"\npreset = "tiny"\n[preset_overrides]\n'
        + "".join(f'"{k}" = {v}\n' for k, v in TINY_OVERRIDES.items())
        + "[loop]\nsteps = 2\nbatch_size = 1\nlog_every = 1\nckpt_every = 1\n[data]\nclip_frames "
          "= 6\n"
    )
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run")


def test_export_registry_round_trip_and_errors(tmp_path, capsys):
    from mag.cli import main
    from mag.registry import load_model, model_info

    Trainer(_recipe(steps=2), tmp_path / "run", progress=False).run()
    out = tmp_path / "m.safetensors"
    assert main(["export", str(tmp_path / "run"), "-o", str(out), "--name", "t", "--stage",
                 "causal"]) == 0
    info = model_info(out)
    assert (info.name, info.stage, info.preset, info.train_steps) == ("t", "causal", "tiny", 2)
    model, preset, meta = load_model(out)
    state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), state.ema[name]), name  # the EMA weights are what ships
    assert preset.dit.dim == 32 and meta["world"]["pano_width"] == 64
    # A training checkpoint loads the same way.
    model2, _, _ = load_model(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(),
                                                 strict=True))
    with pytest.raises(CheckpointError, match="shipped models"):
        load_model("no-such-model")
    out.write_bytes(out.read_bytes()[:100])
    assert main(["models", "--json"]) == 0
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out)
    capsys.readouterr()


def test_time_limit_stops_at_a_log_step_with_a_checkpoint_and_resumes_exactly(tmp_path):
    """A lent machine's lease ends: the run stops cleanly, and resuming reaches the uninterrupted
    weights."""
    straight = Trainer(_recipe(steps=4), tmp_path / "a", progress=False)
    straight.run()
    first = Trainer(_recipe(steps=4), tmp_path / "b", progress=False)
    result = first.run(time_limit_s=1e-9)  # already past the deadline after the first step
    assert result.stopped_early and result.step == 1
    assert result.checkpoint is not None and result.checkpoint.name == "step_00000001.safetensors"
    resumed = Trainer(_recipe(steps=4), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 1
    assert not resumed.run(time_limit_s=3600).stopped_early
    for key, value in _params(straight).items():
        assert torch.equal(value, _params(resumed)[key]), key
    with pytest.raises(ConfigError, match="time limit"):
        resumed.run(time_limit_s=0)


def test_log_records_average_the_interval_not_its_last_step():
    """A DMD generator loss exists on one step in five: the record must carry it, not the last
    step's NaN."""
    from mag.train.runlog import interval_mean

    nan = float("nan")
    steps = [{"loss": torch.tensor(1.0), "generator_loss": torch.tensor(2.0),
              "category_mean": torch.tensor([[1.0, nan]]), "category_count": torch.tensor([[3.0,
                                                                                            0.0]])},
             {"loss": torch.tensor(3.0), "generator_loss": torch.tensor(nan),
              "category_mean": torch.tensor([[5.0, 4.0]]), "category_count": torch.tensor([[1.0,
                                                                                            2.0]])}]
    out = interval_mean(steps)
    assert out["loss"].item() == 2.0 and out["generator_loss"].item() == 2.0
    assert torch.allclose(out["category_mean"], torch.tensor([[(3 * 1.0 + 5.0) / 4, 4.0]]))
    assert torch.equal(out["category_count"], torch.tensor([[4.0, 2.0]]))
    assert interval_mean(steps[1:])["generator_loss"].isnan()
