"""Weight sources: each upstream format is told apart by what is on disk and read to the same
network."""

from __future__ import annotations

import pytest
import torch
from official_files import write_diffusers_folder, write_mag_folder, write_self_forcing
from safetensors.torch import save_file

from mag.errors import CheckpointError
from mag.registry import SHIPPED_DIR
from mag.weights import detect_source, dit_fields_from_state, read_external_dit

SHAPE_FIELDS = ("in_channels", "out_channels", "dim", "ffn_dim", "num_heads", "num_layers",
                "text_dim", "freq_dim", "patch_size", "eps", "qk_norm", "cross_attn_norm")


def _fields(dit) -> dict:
    return {k: getattr(dit.cfg, k) for k in SHAPE_FIELDS}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_format_is_detected_and_read_to_the_same_network(tmp_path, make_dit):
    dit = make_dit(seed=1, eps=1e-5)
    other = make_dit(seed=2, eps=1e-5)
    mag_dir = write_mag_folder(dit, tmp_path / "MAG" / "generator")
    wan_dir = write_mag_folder(dit, tmp_path / "Wan2.1-T2V-1.3B")
    (wan_dir / "Wan2.1_VAE.pth").write_bytes(b"")  # what makes a folder the Wan2.1 release
    diffusers_root = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    write_diffusers_folder(dit, diffusers_root / "transformer")
    sf = write_self_forcing(other, dit, tmp_path / "self_forcing_dmd.pt")
    cases = {mag_dir: "official-mag",
             mag_dir / "diffusion_pytorch_model.safetensors": "official-mag",
             wan_dir: "wan2.1", diffusers_root: "diffusers",
             diffusers_root / "transformer": "diffusers"}
    for path, kind in cases.items():
        read = read_external_dit(path)
        assert read.source.kind == kind, path
        assert _same(read.state, dit.state_dict()), path
        assert {k: read.dit_fields[k] for k in SHAPE_FIELDS} == _fields(dit), path
    read = read_external_dit(sf, shapes_from=detect_source(wan_dir))
    assert read.source.kind == "self-forcing" and _same(read.state, dit.state_dict())  # EMA first
    assert {k: read.dit_fields[k] for k in SHAPE_FIELDS} == _fields(dit)
    assert _same(read_external_dit(sf, use_ema=False).state, other.state_dict())


def test_a_bare_checkpoint_takes_wans_head_width_when_nothing_says_the_heads(tmp_path, make_dit):
    dit = make_dit(dim=256, num_heads=2)
    path = write_self_forcing(dit, dit, tmp_path / "sf.pt")
    assert read_external_dit(path).dit_fields["num_heads"] == 2  # 256 / Wan's 128-wide heads


def test_a_mag_model_file_is_told_apart_and_sent_to_the_registry():
    shipped = sorted(SHIPPED_DIR.glob("*.safetensors"))[0]
    assert detect_source(shipped).kind == "mag-model"
    with pytest.raises(CheckpointError, match="mag model file"):
        read_external_dit(shipped)


def test_unknown_things_name_what_was_found_and_what_was_expected(tmp_path, make_dit):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(CheckpointError, match=r"holds notes\.txt, sub/; expected .*Self-Forcing "
                                              r"\.pt"):
        detect_source(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist; expected a mag model file"):
        detect_source(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"unknown suffix '\.txt'"):
        detect_source(tmp_path / "notes.txt")
    bare = tmp_path / "sub" / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in make_dit().state_dict().items()}, str(bare))
    with pytest.raises(CheckpointError, match="without mag metadata and without a config.json"):
        detect_source(bare)
    torch.save({"something": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"holds 1 entries \(e.g. \['something'\]\), not a "
                                              r"DiT"):
        read_external_dit(tmp_path / "x.pt")


def test_shapes_read_from_a_state_dict_match_the_config_it_was_built_with(make_dit):
    for overrides in ({}, {"cross_attn_norm": False}, {"qk_norm": False, "patch_size": (1, 1, 1)}):
        dit = make_dit(**overrides)
        fields = dit_fields_from_state(dit.state_dict(), num_heads=dit.cfg.num_heads)
        assert {k: fields[k] for k in SHAPE_FIELDS if k != "eps"} == {
            k: v for k, v in _fields(dit).items() if k != "eps"}
