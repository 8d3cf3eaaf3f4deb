"""``mag train`` and ``mag plot``: run a recipe (optionally resuming) and draw its training
curves."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mag.errors import InputError
from mag.io.cli import add_out_argument, add_runtime_arguments, set_threads
from mag.io.files import FIGURE_SUFFIXES, SAFETENSORS_SUFFIXES, check_output, save_figure
from mag.objectives.dmd import SELF_FORCING_GUIDANCE_SCALE
from mag.objectives.ode import save_ode_pairs
from mag.train.distributed import destroy, init_distributed
from mag.train.recipe import load_recipe

# Euler steps of the teacher's ODE in `mag train ode-pairs` (Self-Forcing samples its teacher with
# 48; 48 puts the levels 1000, 750, 500, 250 on the grid).
DEFAULT_ODE_STEPS = 48
SECONDS_PER_MINUTE = 60.0
PLOT_DPI = 120
DEFAULT_FIGURE_SUFFIX = ".png"


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a recipe (teacher, causal init, DMD, ...); ode-pairs for the ODE init",
        description="Train one recipe into an output folder with resumable checkpoints, or "
                    "(ode-pairs)"
                    " write the teacher trajectories the 'ode' objective regresses.")
    train.add_argument("--recipe", help="TOML recipe file (see recipes/); required unless a "
                                        "subcommand")
    add_out_argument(train, "run folder: checkpoints/, metrics.jsonl, recipe.json", required=False)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint "
                                                             "in --out")
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many more steps (a time-boxed sitting); resume later")
    train.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                       help="stop with a checkpoint at the first log step after this many "
                            "minutes; resume"
                            " later with --resume")
    add_runtime_arguments(train)  # under torchrun each worker uses cuda:LOCAL_RANK
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still "
                                                                  "written)")
    train.add_argument("--plan", action="store_true",
                       help="print per-GPU memory and step FLOPs of --recipe on --gpus x --nodes "
                            "GPUs (meta"
                            " device, nothing allocated) instead of training")
    train.add_argument("--gpus", type=int, default=1, help="GPUs per node for --plan (default "
                                                           "%(default)s)")
    train.add_argument("--nodes", type=int, default=1, help="nodes for --plan (default "
                                                            "%(default)s)")
    train.set_defaults(func=_train)

    tools = train.add_subparsers(dest="train_command", metavar="SUBCOMMAND", required=False)
    pairs = tools.add_parser(
        "ode-pairs", help="sample teacher ODE trajectories for the 'ode' objective",
        description="Integrate the teacher's guided ODE (many Euler steps) on world clips' "
                    "prompts and store"
                    " its state at the few-step levels and its endpoint in one safetensors file.")
    pairs.add_argument("--teacher", required=True, help="teacher model file, checkpoint or "
                                                        "registry name")
    add_out_argument(pairs, "output .safetensors", dest="pairs_out")
    pairs.add_argument("--clips", type=int, required=True, help="number of clips (trajectories)")
    pairs.add_argument("--steps", type=int, default=DEFAULT_ODE_STEPS,
                       help="Euler steps; the few-step levels must fall on the grid (default "
                            "%(default)s)")
    pairs.add_argument("--guidance-scale", type=float, default=SELF_FORCING_GUIDANCE_SCALE,
                       help="CFG scale x0_u + s (x0_c - x0_u), 1 = off (default %(default)s)")
    pairs.add_argument("--frames", type=int, default=None,
                       help="latent frames per clip (default: the teacher recipe's "
                            "data.clip_frames)")
    pairs.add_argument("--seed", type=int, default=0, help="seed of the clips' prompts and noise")
    pairs.add_argument("--batch", type=int, default=8, help="clips sampled together")
    add_runtime_arguments(pairs, dest_prefix="pairs_")
    pairs.add_argument(
        "--no-progress", dest="pairs_no_progress", action="store_true", help="no progress bar"
    )
    pairs.set_defaults(func=_ode_pairs)

    plot = subparsers.add_parser("plot", help="plot training curves from metrics.jsonl",
                                 description="Draw loss and recall-signal curves of one or more "
                                             "runs.")
    plot.add_argument("metrics", nargs="+", help="metrics.jsonl files (or run folders)")
    add_out_argument(plot, "output PNG")
    plot.add_argument("--smooth", type=int, default=20, help="moving-average window in log records")
    plot.set_defaults(func=_plot)


def _train(args: argparse.Namespace) -> int:
    """Train one recipe; under torchrun (``RANK``/``WORLD_SIZE`` set) every worker joins the group
    first."""

    if args.plan:
        return _plan(args)
    if not args.recipe or not args.out:
        raise InputError("mag train needs --recipe and --out (or a subcommand: mag train "
                         "ode-pairs ...)")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise InputError("--time-limit must be a positive number of minutes, got "
                         f"{args.time_limit}")
    set_threads(args.threads)
    from mag.train.mesh import needs_process_group  # lazy: FSDP/DCP add ~1.5 s to `mag` start
    from mag.train.trainer import Trainer  # lazy: torch.distributed.checkpoint adds ~1.5 s

    recipe = load_recipe(args.recipe)
    ctx = init_distributed(args.device, single_group=needs_process_group(recipe.parallel))
    try:
        trainer = Trainer(recipe, args.out, resume=args.resume, progress=not args.no_progress,
                          dist=ctx)
        _print_notes(trainer.notes, ctx.is_main)
        limit_s = None if args.time_limit is None else args.time_limit * SECONDS_PER_MINUTE
        try:
            result = trainer.run(max_steps=args.max_steps, time_limit_s=limit_s)
        finally:
            _print_notes(trainer.notes, ctx.is_main)
    finally:
        destroy(ctx)
    if ctx.is_main:
        stopped = (f" (time limit of {args.time_limit} min; resume with --resume)"
                   if result.stopped_early else "")
        print(f"step {result.step}: loss {result.last_loss:.4f}; checkpoint "
              f"{result.checkpoint}{stopped}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``mag train --plan``: the recipe's memory per GPU and step FLOPs, with and without
    checkpointing."""
    from mag.train.plan import plan_training  # lazy: FSDP and DCP imports add ~1.5 s to `mag` start

    if not args.recipe:
        raise InputError("mag train --plan needs --recipe")
    if args.gpus < 1 or args.nodes < 1:
        raise InputError(f"--gpus and --nodes must be >= 1, got {args.gpus} and {args.nodes}")
    print(plan_training(load_recipe(args.recipe), args.gpus, args.nodes).format())
    return 0
def _print_notes(notes: list[str], is_main: bool) -> None:
    """What the trainer decided on its own (a resume fallback, a stale lock), once, on stderr."""
    if is_main:
        for note in notes:
            print(f"mag: note: {note}", file=sys.stderr)
    notes.clear()


def _ode_pairs(args: argparse.Namespace) -> int:
    """Write the ODE-regression pairs of a teacher (``mag train ode-pairs``)."""
    import time

    from mag.train.ode_pairs import make_ode_pairs  # lazy: as Trainer in _train

    set_threads(args.pairs_threads)
    check_output(args.pairs_out, suffixes=SAFETENSORS_SUFFIXES, inputs=(args.teacher,))
    start = time.perf_counter()
    pairs = make_ode_pairs(args.teacher, args.clips, num_steps=args.steps,
                           guidance_scale=args.guidance_scale, seed=args.seed, frames=args.frames,
                           batch_size=args.batch, device=args.pairs_device,
                           progress=not args.pairs_no_progress)
    out = save_ode_pairs(args.pairs_out, pairs)
    print(f"wrote {out}: {len(pairs)} trajectories of {pairs.x0.shape[1]} frames at levels"
          f" {[round(t, 1) for t in pairs.timesteps.tolist()]} ({time.perf_counter() - start:.1f} "
          "s)")
    return 0


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"no metrics file at {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{n} is not JSON ({err.msg})") from err
    return records


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        finite = [a for a in acc if not math.isnan(a)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def plot_path(out: str) -> Path:
    """The file ``mag plot -o`` writes: a name without a suffix gets ``.png`` (as matplotlib would
    add); another suffix must be a figure format. Checked before any metrics are read."""
    path = Path(out)
    if not path.suffix:
        path = path.with_name(path.name + DEFAULT_FIGURE_SUFFIX)
    return check_output(path, suffixes=FIGURE_SUFFIXES, what="plot")


def _plot(args: argparse.Namespace) -> int:
    if args.smooth < 1:
        raise InputError(f"--smooth must be >= 1 log record, got {args.smooth}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = plot_path(args.out)
    runs = [(source, read_metrics(source)) for source in args.metrics]
    # DMD runs log the critic's loss as `loss` and the generator's separately; flow-matching runs
    # log the loss by view category. The right panel shows whichever the runs have.
    dmd = any("generator_loss" in r for _, records in runs for r in records)
    fig, (ax_loss, ax_right) = plt.subplots(1, 2, figsize=(11, 4))
    for source, records in runs:
        steps = [r["step"] for r in records]
        label = Path(source).parent.name if Path(source).is_file() else Path(source).name
        main = "critic loss" if dmd else "loss"
        ax_loss.plot(steps, _smooth([r["loss"] for r in records], args.smooth), label=f"{label} "
                                                                                      f"{main}")
        keys = (("generator_loss", "-"),) if dmd else (("loss_new", ":"), ("loss_recent", "--"),
                                                        ("loss_recall", "-"))
        for key, style in keys:
            if any(key in r for r in records):
                vals = [r.get(key, math.nan) for r in records]
                name = "generator" if dmd else key[5:]
                ax_right.plot(steps, _smooth(vals, args.smooth), style, label=f"{label} {name}")
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log",
                title="critic (fake-score) loss" if dmd else "training loss")
    ax_right.set(xlabel="step", ylabel="loss", yscale="log",
                 title="DMD generator loss" if dmd else "loss by view category (recall = seen "
                                                        "long ago)")
    for ax in (ax_loss, ax_right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, out, dpi=PLOT_DPI)
    except OSError as err:
        raise InputError(f"cannot write {out}: {err.strerror}") from err
    print(f"wrote {out}")
    return 0
