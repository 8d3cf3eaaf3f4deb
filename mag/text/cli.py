"""``mag text table``: write a prompt table (the text encoder's outputs for a known prompt set)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mag.config import build_registered
from mag.errors import InputError
from mag.io.cli import add_out_argument
from mag.io.files import SAFETENSORS_SUFFIXES, check_output
from mag.io.text import check_text
from mag.text import PROMPT_TABLE_ENV, TEXT_ENCODERS, write_prompt_table
from mag.world import THEMES, theme_prompts

# The tiny preset's encoder and mode (recipes use pooled MiniLM).
DEFAULT_ENCODER = "minilm"
DEFAULT_MODE = "pooled"


def register(subparsers: argparse._SubParsersAction) -> None:
    text = subparsers.add_parser("text", help="text-encoder utilities (prompt tables)",
                                 description="Text-encoder utilities.")
    commands = text.add_subparsers(dest="text_command", metavar="COMMAND", required=True)
    t = commands.add_parser(
        "table", help="encode a fixed prompt set into one file (MAG_PROMPT_TABLE=FILE uses it)",
        description="Encode every prompt the panorama world can write (plus the empty prompt and "
                    "any"
                    " --prompt) with a text encoder and save the embeddings, so that training and"
                    " benchmarks run where the encoder is not installed: set "
                    "MAG_PROMPT_TABLE=FILE.")
    add_out_argument(t, "output .safetensors file")
    t.add_argument("--encoder", default=DEFAULT_ENCODER, help="text encoder registry name "
                                                              "(minilm, umt5)")
    t.add_argument("--mode", default=DEFAULT_MODE, choices=("pooled", "tokens"), help="minilm "
                                                                                      "output mode")
    t.add_argument("--prompt", action="append", default=[], help="an extra prompt (repeatable)")
    t.add_argument("--no-world", action="store_true", help="leave out the panorama world's prompts")
    t.set_defaults(func=_table)


def _table(args: argparse.Namespace) -> int:

    prompts = [""] + [check_text(p, "--prompt") for p in args.prompt]
    if not args.no_world:
        prompts += [p for theme in THEMES.values() for p in theme_prompts(theme)]
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as "
                         f"{out / 'prompts.safetensors'}")
    check_output(out, suffixes=SAFETENSORS_SUFFIXES)
    kwargs = {"mode": args.mode} if args.encoder == "minilm" else {}
    encoder = build_registered("text encoder", TEXT_ENCODERS, args.encoder, **kwargs)
    write_prompt_table(encoder, prompts, out)
    print(f"wrote {out}: {len(dict.fromkeys(prompts))} prompts of {encoder.name} "
          f"({encoder.fingerprint});"
          f" use it with {PROMPT_TABLE_ENV}={out}")
    return 0
