"""The training loop: AdamW, warm-up, clipping, accumulation, EMA, logging, atomic checkpoints,
resume.

Exact resume by construction: every step's data and noise come from generators seeded by ``(seed,
step, micro_batch)`` and the checkpoint restores weights, EMA, optimiser state and the global RNG,
so N steps equal N/2 + resume + N/2 bitwise on CPU. Under ``torchrun`` rank ``r`` of ``W`` trains on
a disjoint slice of the same global batch with the model sharded by FSDP2; only the main rank writes
files, and checkpoints hold full tensors in the single-process format. docs/training.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mag.checkpoint import (
    TrainingState,
    capture_rng,
    git_commit,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from mag.errors import CheckpointError, ConfigError, InputError
from mag.io.files import write_json
from mag.io.lock import RunLock
from mag.schedulers import FlowMatchScheduler
from mag.text import prompt_cache
from mag.train.data import clip_source, text_inputs
from mag.train.dcp import Trained, check_memory_record, load_dcp, save_dcp
from mag.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    has_group,
)
from mag.train.ema import EMA
from mag.train.mesh import make_parallelize
from mag.train.parallelize import (
    full_model_state,
    full_optimizer_state,
    gather_full,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
    local_value,
    shard_like,
)
from mag.train.recall import CATEGORY_NAMES, category_losses
from mag.train.recipe import Recipe
from mag.train.resume import resume_state
from mag.train.runlog import (
    CATEGORY_STATS,
    NullFile,
    check_record,
    cut_metrics,
    diverged,
    interval_mean,
    to_host,
)
from mag.train.steps import (
    MEMORY_MODEL_METADATA,
    DMDStep,
    FlowMatchingStep,
    HorizonStep,
    MemoryStep,
    ODEStep,
    SampleDraws,
    StepContext,
    SupervisedStep,
    build_model,
    sample_generator,
)
from mag.weights import load_into, nonfinite_keys

__all__ = ["Parallelize", "SampleDraws", "TrainResult", "Trainer", "build_model", "prompt_cache",
           "sample_generator"]

Parallelize = Callable[[nn.Module], nn.Module]
# Per-step statistics that are not averaged over ranks when logged.
DIVERGENCE_HINT = "lower optim.lr or optim.grad_clip, then resume with --resume"


@dataclass
class TrainResult:
    step: int
    last_loss: float
    checkpoint: Path | None
    metrics_path: Path
    stopped_early: bool = False  # the time limit ended the run before its target step


class Trainer:
    """Runs one recipe into ``out_dir`` (``checkpoints/``, ``metrics.jsonl``, ``recipe.json``).

    The objective kind picks the step runner (:mod:`mag.train.steps`): flow matching, ODE regression
    and memory reconstruction give one loss per micro-batch and run in :meth:`train_step`'s loop;
    DMD runs its own generator/critic step. ``self.model`` is always the trained network (the
    generator in DMD), whose EMA is what ``mag export`` ships.

    ``dist`` places this process in a data-parallel group (its device then replaces ``device``); the
    model is prepared by ``parallelize`` (default: the recipe's ``[parallel]`` section through
    :func:`mag.train.mesh.make_parallelize`: sharded whenever a process group exists, activation
    checkpointing when asked).
    """

    def __init__(self, recipe: Recipe, out_dir: str | Path, *, resume: bool = False,
                 device: torch.device | str = "cpu", progress: bool = True,
                 dist: DistributedContext | None = None,
                 parallelize: Parallelize | None = None) -> None:
        self.recipe = recipe.validate()
        self.preset = recipe.build_preset()
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.dist = dist if dist is not None else DistributedContext(device=torch.device(device))
        self.device = self.dist.device
        self.progress = progress
        self.is_main = self.dist.is_main
        loop = recipe.loop
        self.sample_indices = self.dist.batch_slice(loop.batch_size // loop.grad_accum)
        self.scheduler = FlowMatchScheduler(self.preset.scheduler, self.preset.dit.prediction)
        if resume and not self.out_dir.is_dir():
            raise InputError(f"cannot resume: run folder {self.out_dir} does not exist; check "
                             "--out, or"
                             " drop --resume to start a new run")
        # what the trainer decided on its own (fallbacks), printed by the CLI
        self.notes: list[str] = []
        # The folder is this trainer's from here until run() ends (or close()); only the main rank
        # writes.
        self._lock = RunLock(self.out_dir) if self.is_main else None
        self._acquire()
        try:
            self._setup(resume, parallelize)
        except BaseException:
            self.close()
            raise

    def _acquire(self) -> None:
        if self._lock is not None and not self._lock.held:
            self._lock.acquire()
            if self._lock.stale:
                self.notes.append(f"{self._lock.path} was left by process {self._lock.stale}, "
                                  "which has"
                                  " ended; taking the folder over")

    def close(self) -> None:
        """Give the run folder up (run() does this when it returns)."""
        if self._lock is not None:
            self._lock.release()

    def _setup(self, resume: bool, parallelize: Parallelize | None) -> None:
        recipe = self.recipe
        existing = latest_checkpoint(self.ckpt_dir)
        if existing is not None and not resume:
            raise CheckpointError(
                f"{self.ckpt_dir} already holds checkpoints (latest {existing.name}); pass "
                "--resume to"
                " continue that run or choose another output directory"
            )
        resume_state: TrainingState | Path | None = self._load_resume_state() if resume else None
        # Data and text first: a run that cannot get text states fails before any model exists.
        # Shards that carry text states stand in for the encoder (none is built).
        self.data = clip_source(self.preset, recipe.data, recipe.loop)
        self.text, empty = text_inputs(self.preset, recipe.data, self.data)
        self.empty_context = empty.to(self.device)

        # Every rank builds the full model from the recipe seed (or init.model), then shards it: all
        # start from the single-process weights. The EMA shadow is built after sharding, so it is
        # sharded like the parameters (elementwise, hence the same math) and gathered only when
        # saved. A resumed run takes its weights from the checkpoint and does not read init.model.
        self.model = build_model(recipe, self.device, init=resume_state is None)
        shard_frozen: Parallelize | None = None
        if parallelize is None:
            parallelize, shard_frozen = make_parallelize(recipe.parallel, self.dist,
                                                         grouped=has_group())
        self.model = parallelize(self.model)
        self.ema = EMA(self.model, recipe.optim.ema_decay)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=recipe.optim.lr, betas=recipe.optim.betas,
            weight_decay=recipe.optim.weight_decay,
        )
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in train steps, summed over all sittings

        ctx = StepContext(recipe, self.preset, self.scheduler, self.data, self.text,
                          self.empty_context,
                           self.device)
        kind = recipe.objective.kind
        self.dmd: DMDStep | None = (DMDStep(ctx, self.model, self.dist, parallelize, shard_frozen)
                                    if kind == "dmd" else None)
        self.runner: SupervisedStep | DMDStep = (
            self.dmd if self.dmd is not None else ODEStep(ctx) if kind == "ode"
            else MemoryStep(ctx) if kind == "memory" else HorizonStep(ctx) if kind == "horizon"
            else FlowMatchingStep(ctx))
        # The frozen memory model the run's caches are written with (mag rollouts, horizon).
        self.memory_record: dict[str, str] = getattr(self.runner, "memory_record", {})
        if resume_state is not None:
            self._restore(resume_state)

    # ------------------------------------------------------------------ resume
    def _load_resume_state(self) -> TrainingState | Path | None:
        return resume_state(self.ckpt_dir, self.recipe, self.notes)

    def _trained(self) -> dict[str, Trained]:
        """The networks a checkpoint carries with their optimisers (generator; DMD's critic)."""
        nets = {"model": Trained(self.model, self.optimizer)}
        if self.dmd is not None:
            nets["critic"] = Trained(self.dmd.critic, self.dmd.critic_optimizer)
        return nets

    def _restore(self, state: TrainingState | Path) -> None:
        """Load a full checkpoint (from any world size); a sharded model keeps only its own
        shards."""
        if isinstance(state, Path):
            metadata = load_dcp(state, self._trained(), self.ema.state_dict())
            check_memory_record(metadata.get(MEMORY_MODEL_METADATA), self.memory_record)
            self.step = int(metadata["step"])
            self.train_seconds = float(metadata.get("train_seconds", 0.0))
            return
        sharded = is_sharded(self.model)
        if sharded:
            load_full_model_state(self.model, state.model)
        else:
            load_into(self.model, state.model, f"checkpoint of step {state.step}")
        if state.ema is not None:
            self.ema.load_state_dict(shard_like(state.ema,
                                                self.ema.state_dict()) if sharded else state.ema)
        if state.optimizer is not None:
            if sharded:
                load_full_optimizer_state(self.model, self.optimizer, state.optimizer)
            else:
                self.optimizer.load_state_dict(state.optimizer)
        if self.dmd is not None:
            self.dmd.load_state(state.extra, state.metadata)
        check_memory_record(state.metadata.get(MEMORY_MODEL_METADATA), self.memory_record)
        restore_rng(state.rng)
        self.step = state.step
        self.train_seconds = float(state.metadata.get("train_seconds", 0.0))

    def save(self) -> Path | None:
        """Write a checkpoint of full tensors; the path on the main rank, None elsewhere.

        Under FSDP this gathers the shards (a collective: every rank calls it) and only the main
        rank writes; the others wait at a barrier, so the file exists when any rank returns. With
        ``parallel.checkpoint = "dcp"`` every rank writes its own shards instead
        (:mod:`mag.train.dcp`).
        """
        if self.recipe.parallel.checkpoint == "dcp":
            path = save_dcp(self.ckpt_dir, self.step, self._trained(), self.ema.state_dict(),
                            self._metadata(), self.dist, self.recipe.loop.keep_last)
            return path if self.is_main else None
        if is_sharded(self.model):
            model = full_model_state(self.model)
            ema = gather_full(self.ema.state_dict(), self.dist)
            optimizer = full_optimizer_state(self.model, self.optimizer)
        else:
            model, ema = self.model.state_dict(), self.ema.state_dict()
            optimizer = self.optimizer.state_dict()
        extra, extra_metadata = self.dmd.state() if self.dmd is not None else ({}, {})
        bad = nonfinite_keys(model) + nonfinite_keys(ema)
        if bad:
            raise diverged(f"non-finite weights at step {self.step} ({bad[0]})",
                           latest_checkpoint(self.ckpt_dir), DIVERGENCE_HINT)
        if not self.is_main:
            barrier(self.dist)
            return None
        metadata = {**self._metadata(), **extra_metadata}
        state = TrainingState(step=self.step, model=dict(model), ema=ema, optimizer=optimizer,
                              rng=capture_rng(), metadata=metadata, extra=extra)
        try:
            return save_checkpoint(self.ckpt_dir, state, keep_last=self.recipe.loop.keep_last)
        finally:
            barrier(self.dist)

    def _metadata(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "preset": self.preset.to_dict(),
                "commit": git_commit(),
                "kind": "training", "train_seconds": self.train_seconds, "device": str(self.device),
                "threads": torch.get_num_threads(), "world_size": self.dist.world_size,
                **({MEMORY_MODEL_METADATA: self.memory_record} if self.memory_record else {})}

    # ------------------------------------------------------------------ one step
    def _lr_scale(self, step: int) -> float:
        """Linear warm-up factor of every learning rate at ``step``."""
        warmup = self.recipe.optim.warmup_steps
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def _lr(self, step: int) -> float:
        return self.recipe.optim.lr * self._lr_scale(step)

    def train_step(self) -> dict[str, Tensor]:
        """One optimiser step on this rank's slice of every micro-batch; device tensors, no host
        sync.

        Returns ``loss`` (mean over this rank's samples), ``grad_norm`` (global) and, per
        micro-batch and view category, ``category_mean`` / ``category_count`` ``[grad_accum,
        categories]`` -- the counts let :meth:`_log_record` weight ranks' category means exactly. A
        DMD step returns the step runner's statistics instead (:meth:`DMDStep.train_step`).
        """
        if self.dmd is not None:
            stats = self.dmd.train_step(self.step, self.optimizer, self.ema,
                                        self._lr_scale(self.step), self.sample_indices)
            self.step += 1
            return stats
        loop = self.recipe.loop
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        category_mean = torch.zeros(loop.grad_accum, len(CATEGORY_NAMES), device=self.device)
        category_count = torch.zeros_like(category_mean)
        for micro in range(loop.grad_accum):
            # FSDP2: reduce-scatter gradients once, after the last micro-batch, not after every one.
            self._gradient_sync(micro == loop.grad_accum - 1)
            out, categories = self.runner.loss(self.model, self.step, micro, self.sample_indices)
            (out.loss / loop.grad_accum).backward()
            total += out.loss.detach() / loop.grad_accum
            means = category_losses(out.per_element, categories)
            category_mean[micro] = torch.stack([means[name] for name in CATEGORY_NAMES]).to(
                self.device
            )
            category_count[micro] = torch.stack([(categories == index).sum()
                                                 for index in range(len(CATEGORY_NAMES))])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   self.recipe.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return {"loss": total, "grad_norm": grad_norm, "category_mean": category_mean,
                "category_count": category_count}

    def _gradient_sync(self, enabled: bool) -> None:
        """Turn FSDP2's per-backward gradient reduction on or off (a no-op for an unsharded
        model)."""
        set_sync = getattr(self.model, "set_requires_gradient_sync", None)
        if set_sync is not None:
            set_sync(enabled)

    def _log_record(self, stats: dict[str, Tensor]) -> dict[str, Any]:
        """Host numbers of one step, reduced over ranks: losses averaged over the global batch,
        gradient norms as they are (already global), and per category the count-weighted mean (what
        one process on the whole batch would log)."""
        norms = {k: local_value(v) for k, v in stats.items() if k.endswith("grad_norm")}
        means = all_reduce_mean({k: v for k, v in stats.items()
                                 if k not in norms and k not in CATEGORY_STATS}, self.dist)
        if "category_mean" not in stats:
            return to_host({**means, **norms})
        means_by_category = stats["category_mean"]
        if self.dist.is_distributed:
            counts = stats["category_count"]
            summed = all_reduce_sum(torch.stack([torch.nan_to_num(means_by_category) * counts,
                                                 counts]),
                                    self.dist)
            means_by_category = torch.where(summed[1] > 0, summed[0] / summed[1].clamp_min(1),
                                            math.nan)
        per_category = (means_by_category / self.recipe.loop.grad_accum).sum(0)
        return to_host({**means, **norms,
                         **{f"loss_{name}": per_category[i] for i,
                            name in enumerate(CATEGORY_NAMES)}})

    # ------------------------------------------------------------------ loop
    def run(self, max_steps: int | None = None, time_limit_s: float | None = None) -> TrainResult:
        """Train until ``loop.steps`` (or ``max_steps`` more steps, for tests / time-boxed
        sittings).

        ``time_limit_s``: stop at the first log step after this many seconds of wall time, with a
        checkpoint, so a run on a lent machine ends cleanly and resumes later (all ranks decide
        together).
        """
        if time_limit_s is not None and time_limit_s <= 0:
            raise ConfigError(f"time limit must be positive, got {time_limit_s} s")
        deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s
        loop = self.recipe.loop
        target = loop.steps if max_steps is None else min(loop.steps, self.step + max_steps)
        self._acquire()
        try:
            if self.is_main:
                cut_metrics(self.metrics_path, self.step)
                write_json(self.out_dir / "recipe.json", self.recipe.to_dict())
            return self._run(target, deadline)
        finally:
            self.close()

    def _run(self, target: int, deadline: float | None) -> TrainResult:
        loop = self.recipe.loop
        tokens_per_step = loop.batch_size * self.runner.tokens_per_sample
        bar = tqdm(total=target, initial=self.step, disable=not (self.progress and self.is_main),
                   desc=self.recipe.name, unit="step", dynamic_ncols=True)
        last_loss, ckpt = math.nan, None
        window_start, window_steps = time.perf_counter(), 0
        interval: list[dict[str, Tensor]] = []
        with open(self.metrics_path, "a") if self.is_main else NullFile() as log:
            while self.step < target:
                step_start = time.perf_counter()
                interval.append(self.train_step())
                self.train_seconds += time.perf_counter() - step_start
                window_steps += 1
                if self.step % loop.log_every == 0 or self.step == target:
                    elapsed = time.perf_counter() - window_start
                    # the only host sync: once per log interval, of the interval's mean
                    record = self._log_record(interval_mean(interval))
                    interval = []
                    record.update(step=self.step, lr=self._lr(self.step - 1),
                                  steps_per_s=window_steps / elapsed,
                                  tokens_per_s=window_steps * tokens_per_step / elapsed,
                                  time=time.time())
                    recall, new = record.get("loss_recall"), record.get("loss_new")
                    if (
                        recall is not None
                        and new
                        and not math.isnan(recall)
                        and not math.isnan(new)
                    ):
                        record["recall_ratio"] = recall / new
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    check_record(record, latest_checkpoint(self.ckpt_dir), DIVERGENCE_HINT)
                    last_loss = record["loss"]
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    recall=f"{record.get('recall_ratio', math.nan):.2f}")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                out_of_time = (deadline is not None and self.step % loop.log_every == 0
                               and self._past(deadline))
                if self.step % loop.ckpt_every == 0 or self.step == target or out_of_time:
                    ckpt = self.save()  # every rank: gathering shards is a collective
                if out_of_time:
                    break
        bar.close()
        return TrainResult(self.step, last_loss, ckpt, self.metrics_path,
                           stopped_early=self.step < target)

    def _past(self, deadline: float) -> bool:
        """Whether any rank is past ``deadline`` (one tiny all-reduce, at log steps only)."""
        late = torch.tensor(float(time.perf_counter() > deadline), device=self.device)
        return bool(all_reduce_sum(late, self.dist) > 0)
