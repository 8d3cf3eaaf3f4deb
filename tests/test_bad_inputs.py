"""Every documented command with bad values: one line on stderr, exit 2, nothing on disk changed.

One table: each row is a command line (``{t}`` a scratch folder holding a finished tiny run,
``{ck}`` its checkpoint, ``{run}`` its run folder) and a phrase its error line must contain.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from helpers import folder_tree, recipe_dict

from mag.checkpoint import latest_checkpoint
from mag.cli import main
from mag.train.recipe import recipe_from_dict
from mag.train.trainer import Trainer

# A non-UTF-8 byte of a command line reaches Python as a lone surrogate (surrogateescape).
BAD_BYTE = "\udce9"

CASES: list[tuple[str, str]] = [
    # world
    ("world preview --frames 0 -o {t}/p.mp4", "--frames"),
    ("world preview --fps 0 -o {t}/p.mp4", "fps"),
    ("world preview --scale 0 -o {t}/p.mp4", "scale"),
    ("world preview --crf 99 -o {t}/p.mp4", "crf"),
    ("world preview --index -1 -o {t}/p.mp4", "index"),
    ("world preview --split nope -o {t}/p.mp4", "--split"),
    ("world preview -o {t}/p.avi", ".mp4"),
    ("world show --every 0 -o {t}/s.png", "--every"),
    ("world show -o {t}/s.jpg", ".png"),
    # train
    ("train --recipe {t}/missing.toml -o {t}/r", "recipe not found"),
    ("train --recipe {t}/nan.toml -o {t}/r", "optim.lr must be a finite number"),
    ("train --recipe {t}/latin1.toml -o {t}/r", "not UTF-8"),
    ("train --recipe {t}/good.toml -o {t}/r --max-steps 0", "--max-steps"),
    ("train --recipe {t}/good.toml -o {t}/r --time-limit -1", "--time-limit"),
    ("train --recipe {t}/good.toml -o {t}/r --time-limit nan", "--time-limit"),
    ("train --recipe {t}/good.toml -o {t}/r --threads 0", "--threads"),
    ("train --recipe {t}/good.toml -o {t}/r --device bogus", "--device"),
    ("train --recipe {t}/good.toml -o {t}/nowhere --resume", "does not exist"),
    ("train --recipe {t}/good.toml -o {run}", "--resume"),
    ("train ode-pairs --teacher tiny-teacher --clips 1 -o {t}/pairs.txt", ".safetensors"),
    ("train ode-pairs --teacher tiny-teacher --clips 0 -o {t}/pairs.safetensors", "--clips"),
    ("train ode-pairs --teacher tiny-teacher --clips 1 --batch 0 -o {t}/pairs.safetensors",
     "batch size"),
    # plot, export, models, info
    ("plot {t}/nothing -o {t}/c.png", "no metrics"),
    ("plot {run} -o {t}/c.txt", ".png"),
    ("plot {run} --smooth 0 -o {t}/c.png", "--smooth"),
    ("export {ck} -o {ck} --name x --stage causal", "is the input"),
    ("export {run} -o {t}/m.safetensors --name x --stage memory", "cannot be exported"),
    ("export {run} -o {t}/m.bin --name x --stage causal", ".safetensors"),
    ("export {t}/missing.safetensors -o {t}/m.safetensors --name x --stage causal", "not found"),
    ("info --preset bogus", "preset"),
    ("models --bogus", "unrecognized"),
    # bench
    ("bench consistency --episodes 0 -o {t}/b", "episode"),
    ("bench consistency --episodes 100000000 -o {t}/b", "100000000"),
    ("bench consistency --batch-size 0 -o {t}/b", "batch"),
    ("bench consistency --policies bogus -o {t}/b", "bogus"),
    ("bench consistency --videos {t}/nowhere -o {t}/b", "--videos"),
    ("bench consistency --device cuda -o {t}/b", "CUDA"),
    ("bench consistency --episodes 1 -o {ck}", "not a folder"),
    ("bench memory --memory-model tiny-memory --episodes 0 -o {t}/b", "--episodes"),
    ("bench memory --memory-model tiny-memory -o {ck}", "not a folder"),
    ("bench memory --memory-model tiny-memory --batch-size 0 -o {t}/b", "batch"),
    ("bench quality --models tiny-causal --clips 1 -o {t}/b", "--clips"),
    ("bench quality --models tiny-causal --frames 0 -o {t}/b", "--frames"),
    ("bench quality --models tiny-causal -o {ck}", "not a folder"),
    ("bench speed --random-weights --frames 0 -o {t}/s.json", "frames"),
    ("bench speed --random-weights --rounds 0 -o {t}/s.json", "rounds"),
    ("bench speed --random-weights -o {t}/s.txt", ".json"),
    # text
    ("text table --no-world --prompt x -o {t}/t.txt", ".safetensors"),
    (f"text table --no-world --prompt {BAD_BYTE} -o {{t}}/t.safetensors", "UTF-8"),
    ("text table --encoder bogus -o {t}/t.safetensors", "bogus"),
    # demo, generate, serve
    ("demo --episode -1 -o {t}/d", "episode"),
    ("demo --steps 0 -o {t}/d", "steps"),
    ("demo --device bogus -o {t}/d", "--device"),
    ("generate --frames 0 -o {t}/g.mp4", "--frames"),
    ("generate --frames 1000000000000 -o {t}/g.mp4", "--frames"),
    ("generate --velocity nan -o {t}/g.mp4", "velocity"),
    ("generate --velocity 1e9 -o {t}/g.mp4", "velocity"),
    ("generate --policy bogus -o {t}/g.mp4", "bogus"),
    ("generate --steps 0 -o {t}/g.mp4", "steps"),
    ("generate --device cuda -o {t}/g.mp4", "CUDA"),
    (f"generate --prompt {BAD_BYTE} -o {{t}}/g.mp4", "UTF-8"),
    ("generate -o {t}/g.avi", ".mp4"),
    ("serve --port 70000", "--port"),
    ("serve --max-frames 0 --port 0", "max-frames"),
    (f"serve --prompt {BAD_BYTE}", "UTF-8"),
    ("serve --device bogus", "--device"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A finished 2-step run and the recipe files the table names."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = recipe_dict("causal_fm")
    Trainer(recipe_from_dict(data), root / "run", progress=False).run()
    (root / "good.toml").write_text('name = "good"\npreset = "tiny"\n[loop]\nsteps = 2\n')
    (root / "nan.toml").write_text('name = "nan"\npreset = "tiny"\n[optim]\nlr = nan\n')
    (root / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    return root


@pytest.mark.parametrize(("command", "expected"), CASES, ids=[c for c, _ in CASES])
def test_a_bad_value_is_one_line_exit_2_and_nothing_changes(scratch, command, expected, capsys):
    ck = latest_checkpoint(scratch / "run" / "checkpoints")
    argv = [arg.format(t=scratch, ck=ck, run=scratch / "run") for arg in shlex.split(command)]
    before = folder_tree(scratch)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err
    assert len(lines) == 1 and expected in lines[0], lines
    assert folder_tree(scratch) == before
