"""Weight loading: every layout and file format lands on our names; bad checkpoints fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mag.errors import CheckpointError
from mag.weights import (
    detect_format,
    diffusers_to_wan,
    load_into,
    load_state_dict_any,
    wan_to_diffusers,
)


def _ours(make_dit) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in make_dit().state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_through_diffusers_names(make_dit):
    ours = _ours(make_dit)
    theirs = wan_to_diffusers(ours)
    assert (
        "condition_embedder.time_proj.weight" in theirs
        and "blocks.1.attn2.to_out.0.weight" in theirs
    )
    assert "blocks.0.norm2.weight" in theirs and "blocks.0.scale_shift_table" in theirs
    assert detect_format(theirs) == "diffusers"
    assert _same(diffusers_to_wan(theirs), ours)
    assert _same(load_state_dict_any(theirs), ours)


def test_diffusers_names_cover_the_real_diffusers_model(make_dit, diffusers_twin):
    theirs = diffusers_twin(make_dit().cfg)
    mapped = wan_to_diffusers(_ours(make_dit))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_diffusers_names_equal_diffusers_own_converter_tensor_for_tensor(make_dit):
    # An independent reference for the key map: diffusers' converter of original Wan2.1 checkpoints.
    # Every parameter of make_dit is random and distinct, so a swapped pair of names (say norm_q /
    # norm_k) puts another tensor under the name and fails here even though every shape matches.
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ours = _ours(make_dit)
    reference = convert_wan_transformer_to_diffusers(dict(ours))
    mapped = wan_to_diffusers(ours)
    assert mapped.keys() == reference.keys()
    assert all(mapped[k] is reference[k] for k in mapped)
    assert _same(diffusers_to_wan(reference), ours)


def test_self_forcing_checkpoint_prefers_ema(tmp_path, make_dit):
    raw, ema = _ours(make_dit), {k: v + 1 for k, v in _ours(make_dit).items()}
    ckpt = {
        "generator": {f"model.{k}": v for k, v in raw.items()},
        "generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in ema.items()},
        "critic": {"model.head.head.weight": torch.zeros(1)},
    }
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(ckpt, path)
    assert _same(load_state_dict_any(path), ema)
    assert _same(load_state_dict_any(path, use_ema=False), raw)
    model = make_dit(seed=5)
    load_into(model, load_state_dict_any(path))
    assert torch.equal(model.head.modulation, ema["head.modulation"])


def test_safetensors_single_and_sharded_files_load(tmp_path, make_dit):
    ours = _ours(make_dit)
    save_file(ours, tmp_path / "model.safetensors")
    assert _same(load_state_dict_any(tmp_path / "model.safetensors"), ours)

    theirs = wan_to_diffusers(ours)
    keys = sorted(theirs)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    folder = tmp_path / "transformer"
    folder.mkdir()
    for name, shard_keys in shards.items():
        save_file({k: theirs[k] for k in shard_keys}, folder / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert _same(load_state_dict_any(folder), ours)


def test_torch_save_file_loads(tmp_path, make_dit):
    ours = _ours(make_dit)
    torch.save(ours, tmp_path / "weights.pth")
    assert _same(load_state_dict_any(tmp_path / "weights.pth"), ours)


def test_wrong_shape_and_missing_keys_are_named(make_dit):
    model = make_dit()
    bad = _ours(make_dit)
    bad["blocks.1.ffn.0.weight"] = torch.zeros(3, 3)
    expected = r"1 wrong-shape \(blocks\.1\.ffn\.0\.weight: checkpoint \[3, 3\] vs model \[48, 24\]"
    with pytest.raises(CheckpointError, match=expected):
        load_into(model, bad)
    missing = _ours(make_dit)
    del missing["head.modulation"]
    missing["extra.weight"] = torch.zeros(1)
    expected = r"1 missing \(head\.modulation\), 1 unexpected \(extra\.weight\)"
    with pytest.raises(CheckpointError, match=expected):
        load_into(model, missing)


def test_missing_and_truncated_files_are_checkpoint_errors(tmp_path, make_dit):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state_dict_any(tmp_path / "nope.safetensors")
    save_file(_ours(make_dit), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state_dict_any(tmp_path / "cut.safetensors")
    torch.save(_ours(make_dit), tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_state_dict_any(tmp_path / "cut.pt")


def test_unknown_layout_and_unmapped_keys_are_rejected(make_dit):
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint layout"):
        load_state_dict_any({"foo.weight": torch.zeros(1)})
    theirs = wan_to_diffusers(_ours(make_dit))
    theirs["condition_embedder.image_embedder.ff.net.0.proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="image_embedder"):
        load_state_dict_any(theirs)
