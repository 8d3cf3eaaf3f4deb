"""``--dtype``: declared once (mag.io.cli), taken by every command that loads models, and it really
sets the dtype the models stream in."""

from __future__ import annotations

import re

import pytest
import torch

from mag.cli import build_parser, main
from mag.io.cli import DTYPES, dtype_from_args

MODEL_COMMANDS = (("generate",), ("serve",), ("demo",), ("bench", "consistency"), ("bench",
                                                                                   "memory"),
                  ("bench", "quality"), ("bench", "speed"))
REAL_WEIGHTS_COMMANDS = (("generate",), ("serve",), ("bench", "consistency"), ("bench", "speed"))
# The required arguments of each command (parsing only: nothing runs).
REQUIRED = {("generate",): ["-o", "o.mp4"], ("demo",): ["-o", "o"], ("bench", "consistency"): ["-o",
                                                                                               "o"],
            ("bench", "memory"): ["--memory-model", "x", "-o", "o"],
            ("bench", "quality"): ["--models", "x", "-o", "o"], ("bench", "speed"): ["-o",
                                                                                     "o.json"]}
KV_LINE = re.compile(r"KV cache ([\d,]+) bytes")


def _parse(command: tuple[str, ...], *extra: str):
    return build_parser().parse_args([*command, *REQUIRED.get(command, []), *extra])


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_every_model_command_takes_the_shared_dtype_flag_with_one_auto_rule(command):
    assert _parse(command).dtype == "auto"
    assert dtype_from_args(_parse(command)) == torch.float32
    # auto is bfloat16 on CUDA in every command, the downloaded-weights path included
    assert dtype_from_args(_parse(command, "--device", "cuda")) == torch.bfloat16
    if command in REAL_WEIGHTS_COMMANDS:
        assert dtype_from_args(_parse(command, "--device", "cuda", "--wan-dir", "w",
                                      "--weights", "g")) == torch.bfloat16
    assert dtype_from_args(_parse(command, "--device", "cuda", "--dtype", "float32")) == (
        torch.float32)
    assert dtype_from_args(_parse(command, "--dtype", "bfloat16")) == torch.bfloat16
    with pytest.raises(SystemExit):
        _parse(command, "--dtype", "float64")
    assert set(DTYPES) == {"float32", "bfloat16"}


def test_every_model_command_states_the_dtype_rule_in_its_help(capsys):
    for command in MODEL_COMMANDS:
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default auto: bfloat16 on a cuda device" in text and "float32 elsewhere" in text


def test_bfloat16_generate_streams_with_half_the_kv_bytes_of_float32(tmp_path, capsys):
    kv = {}
    for name in DTYPES:
        assert main(["generate", "--frames", "3", "--policy", "window", "--dtype", name,
                     "--no-progress", "-o", str(tmp_path / f"{name}.mp4")]) == 0
        kv[name] = int(KV_LINE.search(capsys.readouterr().out).group(1).replace(",", ""))
    assert kv["bfloat16"] * 2 == kv["float32"] > 0
