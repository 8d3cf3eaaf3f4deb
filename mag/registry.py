"""Model files: exporting a trained generator, and the registry of models shipped with the package.

A *model file* is one safetensors file holding inference weights (the EMA weights of a training run)
and, as metadata, everything needed to use and reproduce it: the preset, the recipe, the world it
was trained on, the git commit and the training cost. Shipped models live in ``mag/shipped/`` and
are listed by ``mag models``; anywhere a command takes ``--model`` it accepts a registry name, a
model file or a training checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mag.checkpoint import is_dcp_checkpoint, latest_checkpoint, load_checkpoint, read_dcp_full
from mag.config import Preset, preset_from_dict
from mag.errors import CheckpointError
from mag.io.cli import add_out_argument
from mag.io.files import SAFETENSORS_SUFFIXES, atomic_path, check_output
from mag.models import WanDiT
from mag.weights import load_into

MODEL_FORMAT = "mag-model-v1"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
STAGES = ("teacher", "causal", "dmd", "memory", "mag-generator")
# Stages whose model can sit in a generator slot (stream, benchmark); "memory" only writes
# compressed K/V.
GENERATOR_STAGES = ("teacher", "causal", "dmd", "mag-generator")
# Shipped names that stand for another shipped file: alias -> (target, why).
SHIPPED_ALIASES = {
    "tiny-horizon-memory": ("tiny-memory", "tiny-horizon was trained reading tiny-memory's cache;"
                                           " the memory model was not retrained"),
}
# Stage of a training checkpoint without "stage" metadata, from its recipe's objective kind.
STAGE_OF_OBJECTIVE = {"teacher_fm": "teacher", "causal_fm": "causal", "ode": "causal", "dmd": "dmd",
                      "memory": "memory", "horizon": "causal"}


@dataclass(frozen=True)
class ModelInfo:
    """One entry of ``mag models``: what the file is and what it cost to make."""

    name: str
    stage: str
    preset: str
    path: Path
    size_bytes: int
    params: int
    train_steps: int
    # wall time in training steps, all sittings (on train_device's kind of machine)
    train_minutes: float
    train_device: str  # device of the last sitting, e.g. "cuda x2 threads"
    recipe: str
    commit: str
    alias_of: str = ""  # the shipped model this name stands for ("" for a file of its own)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["path"] = str(self.path)
        return out


def export_model(checkpoint: str | Path, out: str | Path, *, name: str, stage: str,
                 use_ema: bool = True) -> Path:
    """Write the inference weights of training ``checkpoint`` as a model file (atomic; never onto
    the checkpoint itself, nor with a stage label that contradicts the checkpoint's objective)."""
    if stage not in STAGES:
        raise CheckpointError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    check_output(out, suffixes=SAFETENSORS_SUFFIXES, inputs=(checkpoint,))
    state = (
        read_dcp_full(checkpoint) if is_dcp_checkpoint(checkpoint) else load_checkpoint(checkpoint)
    )
    weights = state.ema if use_ema and state.ema is not None else state.model
    meta = state.metadata
    recorded = model_stage(meta)
    if recorded is not None and (recorded == "memory") != (stage == "memory"):
        raise CheckpointError(f"{checkpoint} was trained as a {recorded!r} model; it cannot be "
                              "exported as"
                              f" --stage {stage} (a memory model and a generator share one "
                              "architecture,"
                              " so the label is all that tells them apart)")
    recipe = meta.get("recipe", {})
    metadata = {
        "format": MODEL_FORMAT,
        "name": name,
        "stage": stage,
        "preset": json.dumps(meta.get("preset")),
        "recipe": json.dumps(recipe),
        "world": json.dumps(recipe.get("data", {}).get("world", {})),
        "commit": str(meta.get("commit", "unknown")),
        "train_steps": str(state.step),
        "train_seconds": str(meta.get("train_seconds", 0.0)),
        "train_device": f"{meta.get('device', 'cpu')} x{meta.get('threads', '?')} threads",
        "weights": "ema" if use_ema and state.ema is not None else "raw",
    }
    out = Path(out)
    try:
        with atomic_path(out, suffixes=SAFETENSORS_SUFFIXES, inputs=(checkpoint,)) as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
    except OSError as err:
        raise CheckpointError(f"could not write model file {out}: {err}") from err
    return out


def _read_model_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({err})") from err


def model_info(path: str | Path) -> ModelInfo:
    path = Path(path)
    meta = _read_model_metadata(path)
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a mag model file (format {meta.get('format')!r})")
    preset = json.loads(meta["preset"])
    with safe_open(str(path), framework="pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    recipe = json.loads(meta.get("recipe", "{}"))
    return ModelInfo(
        name=meta["name"], stage=meta["stage"], preset=preset["name"], path=path,
        size_bytes=path.stat().st_size, params=params, train_steps=int(meta.get("train_steps", 0)),
        train_minutes=round(float(meta.get("train_seconds", 0.0)) / 60, 1),
        train_device=meta.get("train_device", "?"), recipe=recipe.get("name", "?"),
        commit=meta.get("commit", "unknown"),
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shipped_models() -> dict[str, ModelInfo]:
    """Models that ship with the package, by name."""
    if not SHIPPED_DIR.is_dir():
        return {}
    infos = {info.name: info for info in map(model_info,
                                               sorted(SHIPPED_DIR.glob("*.safetensors")))}
    for alias, (target, why) in SHIPPED_ALIASES.items():
        if target in infos:
            infos[alias] = dataclasses.replace(infos[target], name=alias, alias_of=target, note=why)
    return infos


def resolve_model(name_or_path: str | Path) -> Path:
    """A registry name or a file path -> an existing file; unknown names list the shipped ones."""
    shipped = shipped_models()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)].path
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = ", ".join(sorted(shipped)) or "none"
    raise CheckpointError(f"no model named or at {str(name_or_path)!r}; shipped models: {names}")


def load_model(name_or_path: str | Path, device: torch.device | str = "cpu", *,
               expect_stage: Sequence[str] | None = None) -> tuple[WanDiT, Preset, dict[str, Any]]:
    """Load a model from a registry name, a model file or a training checkpoint (EMA weights).

    ``expect_stage`` guards against a file in the wrong slot (a memory model and a generator share
    one architecture, so the wrong one would load and run silently): a file whose stage is known and
    not in ``expect_stage`` is refused. A file with no stage information (a training checkpoint from
    before stages were recorded) passes unless a memory model is expected, which must say that it is
    one.

    Returns the model (eval mode), its preset and the decoded metadata.
    """
    path = resolve_model(name_or_path)
    meta = _read_model_metadata(path)
    if meta.get("format") == MODEL_FORMAT:
        weights = load_file(str(path))
        decoded = {k: _maybe_json(v) for k, v in meta.items()}
    else:

        state = load_checkpoint(path)
        weights = state.ema if state.ema is not None else state.model
        decoded = dict(state.metadata)
    if not isinstance(decoded.get("preset"), dict):
        raise CheckpointError(f"{path} carries no preset metadata; cannot build its model")
    if expect_stage is not None:
        _check_stage(path, model_stage(decoded), tuple(expect_stage))
    preset = preset_from_dict(decoded["preset"])
    with torch.device("meta"):
        model = WanDiT(preset.dit)
    model.to_empty(device=device)
    model.init_weights()  # non-persistent buffers (RoPE tables); parameters are overwritten below
    load_into(model, weights, f"{path} ({preset.name} preset)")
    return model.eval(), preset, decoded


def model_stage(metadata: dict[str, Any]) -> str | None:
    """The training stage recorded in decoded metadata (``stage``, else the recipe's objective), or
    None."""
    stage = metadata.get("stage")
    if isinstance(stage, str):
        return stage
    recipe = metadata.get("recipe")
    objective = recipe.get("objective") if isinstance(recipe, dict) else None
    kind = objective.get("kind") if isinstance(objective, dict) else None
    return STAGE_OF_OBJECTIVE.get(kind) if isinstance(kind, str) else None


def _check_stage(path: Path, stage: str | None, expected: tuple[str, ...]) -> None:
    wanted = " / ".join(expected)
    if stage is None:
        if "memory" in expected:
            raise CheckpointError(f"{path} does not say which stage it is; a {wanted} model is "
                                  "expected here."
                                  " Export it with `mag export --stage memory`")
        return
    if stage in expected:
        return
    if stage == "memory":
        hint = (
            "; pass it as the memory model (mag.memory.load_memory_model) and load a generator here"
        )
    elif "memory" in expected:
        hint = "; a generator cannot compress memory: load the stage-1 memory model file here"
    else:
        hint = ""
    raise CheckpointError(f"{path} holds a {stage!r} model but a {wanted} model is expected "
                          f"here{hint}")


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# ---------------------------------------------------------------------------------------------- CLI

def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="list the models shipped with the package",
                                   description="List shipped models: name, stage, preset, size, "
                                               "cost.")
    models.add_argument("--json", action="store_true", help="print one JSON object")
    models.set_defaults(func=_cmd_models)

    export = subparsers.add_parser("export", help="turn a training checkpoint into a model file",
                                   description="Write the EMA weights of a training checkpoint, "
                                               "with its"
                                               " preset, recipe, commit and training cost, as one "
                                               "file.")
    export.add_argument("checkpoint", help="training checkpoint (step_*.safetensors or "
                                           "step_*.dcp) or run"
                                           " folder")
    add_out_argument(export, "output .safetensors")
    export.add_argument("--name", required=True, help="model name (e.g. tiny-causal)")
    export.add_argument("--stage", required=True, choices=STAGES)
    export.add_argument("--raw", action="store_true", help="export the raw weights instead of the "
                                                           "EMA")
    export.set_defaults(func=_cmd_export)


def _cmd_models(args: argparse.Namespace) -> int:
    infos = shipped_models()
    if args.json:
        print(json.dumps({name: info.to_json() for name, info in infos.items()}, indent=2))
        return 0
    if not infos:
        print("no models ship with this package yet")
        return 0
    print(f"{'name':<20}{'stage':<15}{'preset':<8}{'params':>11}{'size':>8}{'steps':>7}"
          f"{'train min':>11}  last trained on")
    for info in infos.values():
        print(f"{info.name:<20}{info.stage:<15}{info.preset:<8}{info.params:>11,}"
              f"{info.size_bytes / 1e6:>7.1f}M{info.train_steps:>7}{info.train_minutes:>11}"
              f"  {info.train_device}" + (f" (= {info.alias_of}: {info.note})"
                                          if info.alias_of else ""))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    source = Path(args.checkpoint)
    if source.is_dir() and not is_dcp_checkpoint(source):
        found = latest_checkpoint(source / "checkpoints") or latest_checkpoint(source)
        if found is None:
            raise CheckpointError(f"no checkpoints in {source}")
        source = found
    out = export_model(source, args.out, name=args.name, stage=args.stage, use_ema=not args.raw)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from {source}")
    return 0
