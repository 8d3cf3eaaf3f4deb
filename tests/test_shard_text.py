"""Shards that carry UMT5 states train without a text encoder.

Three generated mp4 files are encoded with a tiny random Wan VAE and a tiny random UMT5; training
from those shards with the encoder made impossible must feed each clip exactly its stored states,
and take the empty prompt from the shard folder. Shards without text states and a UMT5 preset with
no weights are a one-line error before any model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import write_captioned_videos
from safetensors.torch import load_file

import mag.train.data as train_data
import mag.train.steps.supervised as supervised
import mag.train.trainer as trainer_module
from mag.cli import main
from mag.codecs import WanVAECodec
from mag.data.encode import encode_videos
from mag.data.shards import CONTEXT, EMPTY_FILE, LatentShardSource, read_index, shard_name
from mag.errors import ConfigError
from mag.text import UMT5Encoder, minilm_path
from mag.train.recipe import recipe_from_dict
from mag.train.trainer import Trainer

CLIPS, FRAMES, SIZE, SHARD, TOKENS = 3, 6, 32, 2, 16
CAPTIONS = ["a red ball rolls", "waves on a beach", "a cat, sleeping"]
TINY_UMT5_DIM = 32
# 2 layers of width 32, 32x32 video -> 4x4 latents of the tiny VAE's 4 channels, tiny UMT5 text.
PRESET_OVERRIDES = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
                    "dit.freq_dim": 16, "dit.text_dim": TINY_UMT5_DIM, "dit.in_channels": 4,
                    "dit.out_channels": 4, "video.height": SIZE, "video.width": SIZE,
                    "video.latent_channels": 4, "text_encoder": "umt5", "text_max_tokens": TOKENS}
BOGUS_WEIGHTS = "/nonexistent/umt5-weights"


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = WanVAECodec.tiny_random().video_frames(FRAMES)
    return write_captioned_videos(tmp_path_factory.mktemp("videos"), CAPTIONS, frames, SIZE)


@pytest.fixture(scope="module")
def umt5() -> UMT5Encoder:
    return UMT5Encoder.tiny_random(minilm_path(), seed=0, max_tokens=TOKENS)


def _encode(videos: Path, out: Path, text: UMT5Encoder | None) -> Path:
    return encode_videos(videos, videos / "captions.csv", out, frames=FRAMES,
                         codec=WanVAECodec.tiny_random(), codec_name="wan-vae", text=text,
                         text_name="umt5" if text is not None else "none", shard_size=SHARD,
                         progress=False)


def _recipe(shards: Path, text_encoder_path: str) -> dict[str, Any]:
    return {"name": "shard-text", "preset": "wan-1.3b", "preset_overrides": PRESET_OVERRIDES,
            "objective": {"kind": "causal_fm", "cfg_dropout": 0.0},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "loop": {"steps": 2, "batch_size": 2, "grad_accum": 1, "seed": 4, "log_every": 1,
                     "ckpt_every": 2},
            "data": {"source": "shards", "shards": str(shards), "clip_frames": FRAMES,
                     "text_encoder_path": text_encoder_path}}


def _no_encoder(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the text encoder was built")


def test_encode_stores_the_empty_prompt_once_and_names_it_in_the_index(videos, umt5, tmp_path):
    out = _encode(videos, tmp_path / "shards", umt5)
    assert read_index(out)["empty_context"] == EMPTY_FILE
    source = LatentShardSource(out, FRAMES, seed=0, micro_batch=1, grad_accum=1)
    assert source.has_context and source.text_encoder == "umt5"
    assert torch.equal(source.empty_context(), umt5.encode([""]).float())


def test_training_from_shards_with_text_feeds_the_stored_states_and_builds_no_encoder(
        videos, umt5, tmp_path, monkeypatch):
    shards = _encode(videos, tmp_path / "shards", umt5)
    monkeypatch.setattr(train_data, "prompt_cache", _no_encoder)
    monkeypatch.setattr("mag.text.get_text_encoder", _no_encoder)
    fed: list[torch.Tensor] = []
    loss_fn = supervised.causal_flow_matching_loss

    def recording(model, scheduler, video, context, *args: Any, **kwargs: Any):
        fed.append(context.detach().clone())
        return loss_fn(model, scheduler, video, context, *args, **kwargs)

    monkeypatch.setattr(supervised, "causal_flow_matching_loss", recording)
    recipe = recipe_from_dict(_recipe(shards, BOGUS_WEIGHTS))
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    assert trainer.text is None
    assert torch.equal(trainer.empty_context, umt5.encode([""]).float())
    result = trainer.run()
    assert result.step == 2 and np.isfinite(result.last_loss)

    stored = torch.cat([load_file(str(shards / shard_name(k)))[CONTEXT] for k in range(2)])
    order = LatentShardSource(shards, FRAMES, seed=4, micro_batch=2, grad_accum=1)
    assert len(fed) == 2
    for step, context in enumerate(fed):
        rows = [order.row(step, 0, i) for i in range(2)]
        assert torch.equal(context, stored[rows])


def test_shards_without_text_and_no_umt5_weights_are_a_one_line_error_before_any_model(
        videos, tmp_path, monkeypatch, capsys):
    shards = _encode(videos, tmp_path / "shards", None)
    monkeypatch.setattr(trainer_module, "build_model", _no_encoder)
    data = _recipe(shards, "")
    recipe = tmp_path / "recipe.toml"
    overrides = ", ".join(f'"{k}" = {v!r}'.replace("'", '"') for k, v in PRESET_OVERRIDES.items())
    recipe.write_text(
        f'name = "shard-text"\npreset = "wan-1.3b"\npreset_overrides = {{ {overrides} }}\n'
        '[objective]\nkind = "causal_fm"\n[loop]\nsteps = 2\nbatch_size = 2\n'
        f'[data]\nsource = "shards"\nshards = "{data["data"]["shards"]}"\nclip_frames = {FRAMES}\n')
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "carries no text states" in err
    assert "text_encoder_path" in err


def test_stored_text_of_another_width_is_a_one_line_error_before_any_model(videos, umt5, tmp_path,
                                                                            monkeypatch):
    shards = _encode(videos, tmp_path / "shards", umt5)
    monkeypatch.setattr(trainer_module, "build_model", _no_encoder)
    data = _recipe(shards, "")
    data["preset_overrides"] = {**PRESET_OVERRIDES, "dit.text_dim": 2 * TINY_UMT5_DIM}
    with pytest.raises(ConfigError, match="text states of shape"):
        Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
