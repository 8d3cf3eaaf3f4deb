"""``mag weights download`` (the upstream releases, through huggingface_hub) and ``mag weights
convert``.

Downloads go through ``huggingface_hub.snapshot_download`` into ``--local-dir``: files already
complete are skipped and interrupted ones resume, so re-running the command finishes a broken
download. Each release's licence is printed before anything is fetched; afterwards every weights
folder found in the download is listed with its detected format, ready to pass to ``mag generate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from mag.errors import CheckpointError, InputError
from mag.io.cli import add_out_argument
from mag.io.paths import check_output_file
from mag.weights.model import BASE_PRESET, preset_for, write_model_file
from mag.weights.sources import WeightSource, detect_source, read_external_dit

__all__ = ["RELEASES", "Release", "download", "find_weights", "register"]

# Stages a converted file can be labelled with (mag.registry.STAGES).
CONVERT_STAGES = ("teacher", "causal", "dmd", "memory", "mag-generator")
# How deep below a download folder weights folders are looked for.
SCAN_DEPTH = 3


@dataclass(frozen=True)
class Release:
    """One upstream release on the hub: where it is, what to fetch, and its licence."""

    repo_id: str
    folder: str
    licence: str
    allow_patterns: tuple[str, ...] | None = None


RELEASES: dict[str, Release] = {
    "wan": Release("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B",
                   "Apache-2.0 (Wan2.1 base model: DiT, VAE, UMT5 text encoder)"),
    "mag": Release("xilluill/MAG", "MAG",
                   "CC BY-NC-SA 4.0 (MAG generator and memory model: non-commercial use only, "
                   "share alike,"
                   " attribution)"),
    "self-forcing": Release("gdhe17/Self-Forcing", "Self-Forcing",
                            "CC BY-NC-SA 4.0 (Self-Forcing DMD generator: non-commercial use "
                            "only, share"
                            " alike, attribution)", ("checkpoints/self_forcing_dmd.pt",)),
}

Fetch = Callable[..., str]


def download(name: str, local_dir: str | Path, *, fetch: Fetch | None = None,
             revision: str | None = None) -> Path:
    """Fetch release ``name`` into ``local_dir`` (resumable; see the module docstring); returns the
    folder.

    ``fetch`` stands in for ``huggingface_hub.snapshot_download`` (same keyword arguments).
    """
    release = RELEASES[name]
    target = Path(local_dir)
    print(f"{release.repo_id} -> {target}\n  licence: {release.licence}", flush=True)
    (fetch or snapshot_download)(repo_id=release.repo_id, local_dir=str(target), revision=revision,
          allow_patterns=list(release.allow_patterns) if release.allow_patterns else None)
    return target


def find_weights(folder: Path, depth: int = SCAN_DEPTH) -> Iterator[WeightSource]:
    """Every weights folder or ``.pt`` under ``folder`` (itself included) whose format is
    recognised."""
    try:
        yield detect_source(folder)
        return
    except CheckpointError:
        pass
    for pt in sorted(folder.glob("*.pt")):
        yield detect_source(pt)
    if depth > 0:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield from find_weights(sub, depth - 1)


# ---------------------------------------------------------------------------------------------- CLI

def register(subparsers: argparse._SubParsersAction) -> None:
    weights = subparsers.add_parser("weights", help="download the upstream releases; convert to a "
                                                    "model file",
                                    description="Download Wan2.1 / MAG / Self-Forcing weights, or "
                                                "convert"
                                                " any supported weights into one mag model file.")
    sub = weights.add_subparsers(dest="weights_command", metavar="SUBCOMMAND", required=True)
    get = sub.add_parser("download", help="fetch releases from the Hugging Face hub (resumable)",
                         description="Fetch releases into --local-dir/<release folder>, printing "
                                     "each licence"
                                     " first; re-run to resume. Releases: "
                                     + "; ".join(f"{k}: {r.repo_id}" for k, r in RELEASES.items()))
    get.add_argument("releases", nargs="+", choices=[*RELEASES, "all"], help="what to fetch")
    get.add_argument("--local-dir", default="weights", help="parent folder (default ./weights)")
    get.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    get.set_defaults(func=_cmd_download)

    convert = sub.add_parser("convert", help="write any supported weights as one mag model file",
                             description="Read an official MAG folder, a Wan2.1 folder, a "
                                         "diffusers folder or"
                                         " a Self-Forcing .pt and write a mag model file "
                                         "(safetensors with"
                                         " its preset and stage as metadata).")
    convert.add_argument("source", help="weights folder or file")
    add_out_argument(convert, "output .safetensors")
    convert.add_argument("--stage", required=True, choices=CONVERT_STAGES,
                         help="what the weights are (a memory model and a generator share one "
                              "architecture)")
    convert.add_argument("--name", default=None, help="model name (default: the output file's "
                                                      "stem)")
    convert.add_argument("--wan-dir", default=None,
                         help="Wan2.1 folder whose config.json gives the heads of a bare .pt")
    convert.add_argument("--raw", action="store_true", help="Self-Forcing: the raw generator, not "
                                                            "the EMA")
    convert.set_defaults(func=_cmd_convert)


def _cmd_download(args: argparse.Namespace) -> int:
    names = list(RELEASES) if "all" in args.releases else list(dict.fromkeys(args.releases))
    for name in names:
        folder = download(name, Path(args.local_dir) / RELEASES[name].folder,
                          revision=args.revision)
        found = list(find_weights(folder))
        for source in found:
            print(f"  {source.kind:<13} {source.path}")
        if not found:
            print(f"  no weights recognised under {folder}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if Path(args.out).suffix != ".safetensors":
        raise InputError(f"--out must end in .safetensors, got {Path(args.out).name}")
    shapes_from = detect_source(args.wan_dir) if args.wan_dir else None
    weights = read_external_dit(args.source, use_ema=not args.raw, shapes_from=shapes_from)
    preset = preset_for(weights)
    out = check_output_file(args.out)  # after the source is read: bad input leaves nothing on disk
    write_model_file(weights, preset, out, name=args.name or out.stem, stage=args.stage)
    params = sum(t.numel() for t in weights.state.values())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {weights.source.kind} weights, "
          f"{params:,}"
          f" parameters, preset {BASE_PRESET} (dim {preset.dit.dim}, {preset.dit.num_layers} "
          "layers),"
          f" stage {args.stage}")
    return 0
