"""Training keeps good work: divergence stops it, bad files are one-line errors, resume falls
back."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY_OVERRIDES, recipe_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mag.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from mag.cli import main
from mag.errors import CheckpointError, ConfigError
from mag.registry import export_model, load_model
from mag.train.recipe import load_recipe, recipe_from_dict
from mag.train.runlog import TrainingDiverged
from mag.train.trainer import Trainer

BLOCK_WEIGHT = "blocks.0.self_attn.q.weight"


def _recipe_file(path, **sections: dict[str, str]) -> str:
    """A tiny TOML recipe; ``sections`` override its keys with TOML literals (``loop={"steps":
    "6"}``)."""
    tables: dict[str, dict[str, str]] = {
        "preset_overrides": {f'"{k}"': str(v) for k, v in TINY_OVERRIDES.items()},
        "loop": {"steps": "4", "batch_size": "2", "log_every": "1", "ckpt_every": "1",
                 "keep_last": "1", "seed": "3"},
        "optim": {"lr": "1e-3", "warmup_steps": "0"},
        "data": {"clip_frames": "6"},
        "data.world": {"pano_width": "64"},
    }
    for name, values in sections.items():
        tables.setdefault(name.replace("__", "."), {}).update(values)
    text = 'name = "guard"\npreset = "tiny"\n' + "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) for name,
        values in tables.items())
    path.write_text(text)
    return str(path)


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mag: error: "), err
    return err[0]


def _rewrite(path, change) -> None:
    """Rewrite a safetensors file with ``change(tensors)`` applied, keeping its metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_an_exploding_learning_rate_stops_training_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    """lr = 1e30 used to log Infinity then NaN, exit 0, and rotate every finite checkpoint away."""
    recipe = _recipe_file(tmp_path / "r.toml", loop={"steps": "6"}, optim={"lr": "1e30"})
    line = _one_line_exit_2(capsys, ["train", "--recipe", recipe, "--out", str(tmp_path / "run"),
                                     "--no-progress"])
    assert "training diverged" in line
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(kept) == 1 and str(kept[0]) in line
    state = load_checkpoint(kept[0])  # loads: it is finite
    assert state.step < 6 and all(torch.isfinite(v).all() for v in state.model.values())


def test_non_finite_weights_are_refused_by_every_loader_and_never_saved(tmp_path):
    Trainer(recipe_from_dict(recipe_dict("causal_fm")), tmp_path / "run", progress=False).run()
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    model_file = export_model(ckpt, tmp_path / "m.safetensors", name="m", stage="causal")
    state = load_checkpoint(ckpt)

    def poison(tensors):
        for key in tensors:
            if key.endswith(BLOCK_WEIGHT):
                tensors[key] = torch.full_like(tensors[key], float("nan"))

    for path in (ckpt, model_file):
        _rewrite(path, poison)
        with pytest.raises(CheckpointError, match="non-finite weights"):
            load_model(path)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(ckpt)
    trainer = Trainer(recipe_from_dict(recipe_dict("causal_fm", steps=4)), tmp_path / "b",
                      progress=False)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="non-finite weights at step 0"):
        trainer.save()
    state.model[BLOCK_WEIGHT] = torch.full_like(state.model[BLOCK_WEIGHT], float("nan"))
    with pytest.raises(CheckpointError, match="non-finite weights"):
        save_checkpoint(tmp_path / "b" / "checkpoints", state)
    assert list_checkpoints(tmp_path / "b" / "checkpoints") == []


def test_resume_falls_back_to_the_newest_checkpoint_that_loads_and_cuts_the_metrics(tmp_path,
                                                                                    capsys):
    data = recipe_dict("causal_fm", steps=4)
    data["loop"].update(ckpt_every=1, keep_last=5)
    straight = Trainer(recipe_from_dict(data), tmp_path / "a", progress=False)
    straight.run()
    Trainer(recipe_from_dict(data), tmp_path / "b", progress=False).run(max_steps=3)
    newest = latest_checkpoint(tmp_path / "b" / "checkpoints")
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a crash outside our writer
    resumed = Trainer(recipe_from_dict(data), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 2
    assert (
        "resuming from step_00000002.safetensors" in resumed.notes[0]
        and newest.name in resumed.notes[0]
    )
    resumed.run()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_resume_with_a_missing_run_folder_is_an_error_not_a_fresh_run(tmp_path, capsys):
    recipe = _recipe_file(tmp_path / "r.toml")
    line = _one_line_exit_2(capsys, ["train", "--recipe", recipe, "--out", str(tmp_path / "typo"),
                                     "--resume", "--no-progress"])
    assert "does not exist" in line and not (tmp_path / "typo").exists()


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("optim", "lr", "nan", "optim.lr must be a finite number"),
    ("optim", "lr", "inf", "optim.lr must be a finite number"),
    ("loop", "batch_size", "true", "loop.batch_size must be an integer"),
    ("objective", "cfg_dropout", '"0.1"', "objective.cfg_dropout must be a finite number"),
    ("optim", "betas", "[0.9, true]", "optim.betas[1] must be a finite number"),
])
def test_recipe_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, section, key, value,
                                                             expected):
    recipe = _recipe_file(tmp_path / "r.toml", **{section: {key: value}})
    line = _one_line_exit_2(capsys, ["train", "--recipe", recipe, "--out", str(tmp_path / "run")])
    assert expected in line and not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    line = _one_line_exit_2(capsys, ["train", "--recipe", str(path), "--out",
                                     str(tmp_path / "run")])
    assert "not UTF-8" in line
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(path)


def test_a_tensor_of_the_wrong_shape_is_a_one_line_error(tmp_path, capsys):
    """In a checkpoint being resumed, and in a recipe's init.model: no RuntimeError traceback."""
    recipe = _recipe_file(tmp_path / "r.toml", loop={"steps": "2"})
    assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "run"), "--no-progress",
                 "--max-steps", "1"]) == 0
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    model_file = export_model(ckpt, tmp_path / "m.safetensors", name="m", stage="causal")

    def reshape(tensors):
        for key in tensors:
            if key.endswith(BLOCK_WEIGHT):
                tensors[key] = tensors[key][:, :-1].contiguous()

    _rewrite(ckpt, reshape)
    _rewrite(model_file, reshape)
    capsys.readouterr()
    line = _one_line_exit_2(capsys, ["train", "--recipe", recipe, "--out", str(tmp_path / "run"),
                                     "--resume", "--no-progress"])
    assert "wrong-shape" in line and BLOCK_WEIGHT in line
    init = _recipe_file(tmp_path / "init.toml", init={"model": f'"{model_file}"'})
    line = _one_line_exit_2(capsys, ["train", "--recipe", init, "--out", str(tmp_path / "run2")])
    assert "wrong-shape" in line


KILL_TRIALS = 5
KILL_SEED = 19
KILL_STEPS = 8
# Kill moments are drawn from this share of an uninterrupted run's time, so most land mid-run.
KILL_WINDOW_SHARE = 0.8
# A zygote imports torch and mag and warms the prompt cache once, then forks one training process
# per folder it reads on stdin and prints its pid; after the test kills it, "reaped". One thread
# everywhere, so the killed runs and the resumes in this process sum floats in the same order.
ZYGOTE = """
import os, sys, torch
torch.set_num_threads(1)
from mag.train.recipe import load_recipe
from mag.text import prompt_cache
from mag.train.trainer import Trainer
recipe = load_recipe(sys.argv[1])
prompt_cache(recipe.build_preset().text_encoder, recipe.data.text_mode)
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        Trainer(recipe, line.strip(), resume=True, progress=False).run()
        os._exit(0)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume_reaches_the_uninterrupted_weights(tmp_path):
    """5 seeded trials: SIGKILL the training process anywhere (mid-step, mid-checkpoint, mid-log
    line), resume, and the final weights equal an uninterrupted run's bit for bit; metrics have no
    repeats."""
    recipe_path = _recipe_file(tmp_path / "r.toml", loop={"steps": str(KILL_STEPS),
                                                          "keep_last": "2"})
    recipe = load_recipe(recipe_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TOKENIZERS_PARALLELISM": "false"}
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, recipe_path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        straight = Trainer(recipe, tmp_path / "straight", progress=False)  # loads the text encoder
        start = time.perf_counter()
        straight.run()
        # what the forked child does first
        Trainer(recipe, tmp_path / "probe", progress=False).close()
        window = time.perf_counter() - start
        expected = {k: v.clone() for k, v in straight.model.state_dict().items()}
        assert zygote.stdout.readline().strip() == "ready"
        rng = random.Random(KILL_SEED)
        resumed_from = []
        for trial in range(KILL_TRIALS):
            out = tmp_path / f"trial{trial}"
            out.mkdir()
            zygote.stdin.write(f"{out}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0, KILL_WINDOW_SHARE * window))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished first: resuming a finished run is a no-op
                pass
            assert zygote.stdout.readline().strip() == "reaped"
            resumed = Trainer(recipe, out, resume=True, progress=False)
            resumed_from.append(resumed.step)
            resumed.run()
            for key, value in expected.items():
                assert torch.equal(value, resumed.model.state_dict()[key]), (trial, key)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(line)["step"] for line in lines] == list(range(1, KILL_STEPS + 1)), (
                trial
            )
        assert min(resumed_from) < KILL_STEPS, resumed_from  # at least one kill landed mid-run
    finally:
        torch.set_num_threads(threads)
        zygote.kill()
        zygote.wait()
