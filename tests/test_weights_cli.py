"""``mag weights download`` / ``convert``, offline: a local folder stands in for the hub."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from official_files import write_mag_folder, write_self_forcing

from mag.cli import main
from mag.registry import load_model
from mag.weights.cli import RELEASES, download


def _hub(tmp_path: Path, make_dit) -> Path:
    """A local stand-in for the hub: one folder per repo id, in the releases' layouts."""
    hub = tmp_path / "hub"
    mag = hub / RELEASES["mag"].repo_id
    write_mag_folder(make_dit(seed=1), mag / "checkpoints" / "generator")
    write_mag_folder(make_dit(seed=2), mag / "checkpoints" / "memory")
    sf = hub / RELEASES["self-forcing"].repo_id / "checkpoints"
    sf.mkdir(parents=True)
    write_self_forcing(make_dit(seed=3), make_dit(seed=4), sf / "self_forcing_dmd.pt")
    (sf / "ode_init.pt").write_bytes(b"not asked for")
    return hub


def _local_fetch(hub: Path, calls: list):
    """snapshot_download's contract on a local folder: copy the repo's files matching
    allow_patterns."""
    def fetch(*, repo_id, local_dir, revision=None, allow_patterns=None):
        calls.append(repo_id)
        source = hub / repo_id
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = path.relative_to(source).as_posix()
            if allow_patterns is None or any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, Path(local_dir) / rel)
        return local_dir
    return fetch


def test_download_fetches_each_release_prints_its_licence_and_lists_the_weights(tmp_path, make_dit,
                                                                                 capsys,
                                                                                 monkeypatch):
    calls: list = []
    monkeypatch.setattr("mag.weights.cli.snapshot_download", _local_fetch(_hub(tmp_path, make_dit),
                                                                          calls))
    out = tmp_path / "weights"
    assert main(["weights", "download", "mag", "self-forcing", "--local-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert calls == ["xilluill/MAG", "gdhe17/Self-Forcing"]
    assert "CC BY-NC-SA 4.0" in printed and printed.count("licence:") == 2
    assert f"official-mag  {out / 'MAG' / 'checkpoints' / 'generator'}" in printed
    assert f"official-mag  {out / 'MAG' / 'checkpoints' / 'memory'}" in printed
    assert (
        f"self-forcing  {out / 'Self-Forcing' / 'checkpoints' / 'self_forcing_dmd.pt'}" in printed
    )
    assert not (out / "Self-Forcing" / "checkpoints" / "ode_init.pt").exists()  # only the DMD file


def test_download_through_the_real_client_resumes_into_an_existing_folder_offline(tmp_path,
                                                                                  make_dit,
                                                                                  capsys,
                                                                                  monkeypatch):
    """huggingface_hub itself, offline: a local dir already holding the release is used as it is."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    target = tmp_path / "MAG"
    shutil.copytree(_hub(tmp_path, make_dit) / RELEASES["mag"].repo_id, target)
    assert download("mag", target) == target
    assert "licence: CC BY-NC-SA 4.0" in capsys.readouterr().out
    assert (target / "checkpoints" / "generator" / "config.json").is_file()


def test_convert_writes_a_model_file_that_loads_with_the_same_weights(tmp_path, make_dit, capsys):
    dit = make_dit(seed=5)
    folder = write_mag_folder(dit, tmp_path / "MAG" / "memory")
    out = tmp_path / "models" / "memory.safetensors"
    assert main(["weights", "convert", str(folder), "-o", str(out), "--stage", "memory"]) == 0
    assert "official-mag weights" in capsys.readouterr().out
    model, preset, meta = load_model(out, expect_stage=("memory",))
    assert (
        meta["stage"] == "memory"
        and meta["source_format"] == "official-mag"
        and meta["name"] == "memory"
    )
    assert preset.name == "wan-1.3b" and preset.dit.dim == dit.cfg.dim and preset.dit.num_heads == 2
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in model.state_dict().items())


def test_convert_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    convert = ["weights", "convert", str(tmp_path / "empty"), "--stage", "dmd", "-o"]
    cases = [[*convert, str(tmp_path / "o" / "x.safetensors")], [*convert,
                                                                 str(tmp_path / "o" / "x.pt")]]
    for argv, expected in zip(cases, ("holds nothing; expected", "must end in .safetensors"),
                              strict=True):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    with pytest.raises(SystemExit):
        main(["weights", "download", "nothing-like-this"])
