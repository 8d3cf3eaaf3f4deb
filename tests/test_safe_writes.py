"""One writer for every file (temp + fsync + rename, refusals checked first) and one writer per run
folder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from helpers import folder_tree, recipe_dict

from mag.checkpoint import latest_checkpoint
from mag.cli import main
from mag.errors import InputError
from mag.io.files import atomic_path, check_output, write_json, write_text
from mag.io.lock import RunFolderBusy, RunLock
from mag.train.recipe import recipe_from_dict
from mag.train.trainer import Trainer


def test_a_symlink_a_fifo_and_a_device_node_are_refused_not_replaced(tmp_path):
    target = tmp_path / "kept.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.json")
    for name in ("link.json", "fifo.json"):
        with pytest.raises(InputError, match="refusing to replace"):
            write_json(tmp_path / name, {"a": 1})
    with pytest.raises(InputError, match="a device node"):
        write_text("/dev/null", "x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "{}"
    assert stat.S_ISFIFO((tmp_path / "fifo.json").lstat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("the writer failed half way")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_the_suffix_must_match_the_format_and_the_input_is_never_the_output(tmp_path):
    source = tmp_path / "in.safetensors"
    source.write_bytes(b"checkpoint")
    with pytest.raises(InputError, match=r"must end in \.mp4"):
        check_output(tmp_path / "x.avi", suffixes=(".mp4",))
    with pytest.raises(InputError, match="is the input"):
        check_output(tmp_path / "in.safetensors", inputs=(source,))
    (tmp_path / "alias.safetensors").symlink_to(source)
    with pytest.raises(InputError, match="symbolic link"):
        check_output(tmp_path / "alias.safetensors", inputs=(source,))
    assert source.read_bytes() == b"checkpoint"


def test_world_preview_refuses_a_wrong_suffix_before_rendering(tmp_path, capsys):
    """``-o x.avi`` used to get mp4 data under that name; now one line, exit 2, nothing written."""
    before = folder_tree(tmp_path)
    assert main(["world", "preview", "--frames", "4", "-o", str(tmp_path / "x.avi")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".mp4" in err[0]
    assert folder_tree(tmp_path) == before


def test_generate_refuses_an_unwritable_output_before_loading_any_model(tmp_path, capsys,
                                                                        monkeypatch):
    import mag.demo

    def no_loading(*args, **kwargs):
        raise AssertionError("the output must be checked before any model loads")

    monkeypatch.setattr(mag.demo, "load_models", no_loading)
    (tmp_path / "dir.mp4").mkdir()
    for out in ("x.avi", "dir.mp4"):
        assert main(["generate", "--frames", "3", "-o", str(tmp_path / out), "--no-progress"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_export_onto_its_own_checkpoint_is_refused_and_the_checkpoint_kept(tmp_path, capsys):
    Trainer(recipe_from_dict(recipe_dict("causal_fm")), tmp_path / "run", progress=False).run()
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    before = folder_tree(tmp_path)
    assert main(["export", str(ckpt), "-o", str(ckpt), "--name", "t", "--stage", "causal"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "-o", str(ckpt), "--name", "t", "--stage",
                 "causal"]) == 2
    assert folder_tree(tmp_path) == before


def test_export_refuses_a_memory_label_on_a_generator_checkpoint(tmp_path, capsys):
    Trainer(recipe_from_dict(recipe_dict("causal_fm")), tmp_path / "run", progress=False).run()
    out = tmp_path / "m.safetensors"
    assert main(["export", str(tmp_path / "run"), "-o", str(out), "--name", "m", "--stage",
                 "memory"]) == 2
    assert "'causal'" in capsys.readouterr().err and not out.exists()


def test_plot_reports_the_file_it_really_writes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert main(["plot", str(run), "-o", str(tmp_path / "curve")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curve.png'}"
    assert (tmp_path / "curve.png").stat().st_size > 0 and not (tmp_path / "curve").exists()
    assert main(["plot", str(run), "-o", str(tmp_path / "curve.txt")]) == 2


def test_a_second_writer_of_a_run_folder_gets_a_clear_error(tmp_path):
    with RunLock(tmp_path / "run") as held:
        assert (tmp_path / "run" / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunFolderBusy, match=f"in use by process {os.getpid()}"):
            Trainer(recipe_from_dict(recipe_dict("causal_fm")), tmp_path / "run", progress=False)
        assert held.held
    assert not (tmp_path / "run" / ".lock").exists()
    # the refused run wrote nothing
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_a_second_mag_train_process_into_the_same_folder_exits_2(tmp_path):
    """Two `mag train` into one --out: the second is refused while the first holds the folder."""
    hold = ("import time; from mag.io.lock import RunLock;"
            f" lock = RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True);"
            " time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = tmp_path / "r.toml"
        recipe.write_text('name = "two"\npreset = "tiny"\n[loop]\nsteps = 1\n')
        done = subprocess.run([sys.executable, "-m", "mag", "train", "--recipe", str(recipe),
                               "--out",
                               str(tmp_path / "run"), "--no-progress"], capture_output=True,
                               text=True,
                              timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mag: error: run folder {tmp_path / 'run'} is in use by process {holder.pid} "
        f"{os.uname().nodename}"
        f" (lock file {tmp_path / 'run' / '.lock'}); wait for it to finish or choose another "
        "output folder"]


def test_a_stale_lock_of_a_dead_process_is_detected_and_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(f"{dead} somehost\n")
    trainer = Trainer(recipe_from_dict(recipe_dict("causal_fm")), tmp_path / "run", progress=False)
    trainer.run()
    assert any(f"process {dead} somehost" in note for note in trainer.notes)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
