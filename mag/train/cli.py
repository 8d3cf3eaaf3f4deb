"""``mag train`` and ``mag plot``: run a recipe (optionally resuming) and draw its training curves."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mag.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a recipe (teacher, causal init, ...)",
        description="Train one recipe into an output folder with resumable checkpoints.")
    train.add_argument("--recipe", required=True, help="TOML recipe file (see recipes/)")
    train.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, recipe.json")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many more steps (a time-boxed sitting); resume later")
    train.add_argument("--device", default="cpu",
                       help="torch device (cpu, cuda); under torchrun each worker uses cuda:LOCAL_RANK")
    train.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    train.set_defaults(func=_train)

    plot = subparsers.add_parser("plot", help="plot training curves from metrics.jsonl",
                                 description="Draw loss and recall-signal curves of one or more runs.")
    plot.add_argument("metrics", nargs="+", help="metrics.jsonl files (or run folders)")
    plot.add_argument("-o", "--out", required=True, help="output PNG")
    plot.add_argument("--smooth", type=int, default=20, help="moving-average window in log records")
    plot.set_defaults(func=_plot)


def _train(args: argparse.Namespace) -> int:
    """Train one recipe; under torchrun (``RANK``/``WORLD_SIZE`` set) every worker joins the group first."""
    import torch

    from mag.train.distributed import destroy, init_distributed
    from mag.train.recipe import load_recipe
    from mag.train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    ctx = init_distributed(args.device)
    try:
        trainer = Trainer(recipe, args.out, resume=args.resume, progress=not args.no_progress, dist=ctx)
        result = trainer.run(max_steps=args.max_steps)
    finally:
        destroy(ctx)
    if ctx.is_main:
        print(f"step {result.step}: loss {result.last_loss:.4f}; checkpoint {result.checkpoint}")
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


def _plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
    for source in args.metrics:
        records = read_metrics(source)
        steps = [r["step"] for r in records]
        label = Path(source).parent.name if Path(source).is_file() else Path(source).name
        ax_loss.plot(steps, _smooth([r["loss"] for r in records], args.smooth), label=f"{label} loss")
        for key, style in (("loss_new", ":"), ("loss_recent", "--"), ("loss_recall", "-")):
            if any(key in r for r in records):
                vals = [r.get(key, math.nan) for r in records]
                ax_recall.plot(steps, _smooth(vals, args.smooth), style, label=f"{label} {key[5:]}")
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax_recall.set(xlabel="step", ylabel="loss", yscale="log",
                  title="loss by view category (recall = seen long ago)")
    for ax in (ax_loss, ax_recall):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as err:
        raise InputError(f"cannot write {out}: {err.strerror}") from err
    print(f"wrote {out}")
    return 0
