"""Which checkpoint a ``--resume`` continues from, and whether it may.

The newest checkpoint that loads and verifies wins (newer ones that do not are skipped, and noted);
a DCP folder is returned as its path, loaded into the built networks later. The stored recipe must
match the current one except for the fields of ``RESUMABLE_CHANGES``.
"""

from __future__ import annotations

from pathlib import Path

from mag.checkpoint import (
    TrainingState,
    is_dcp_checkpoint,
    latest_checkpoint,
    newest_loadable_checkpoint,
    read_dcp_metadata,
)
from mag.errors import CheckpointError
from mag.train.recipe import Recipe, recipe_differences


def resume_state(ckpt_dir: Path, recipe: Recipe, notes: list[str]) -> TrainingState | Path | None:
    """The state to resume from (a DCP folder as its path), None when there is no checkpoint yet;
    what was skipped is appended to ``notes``."""
    newest = latest_checkpoint(ckpt_dir)
    if newest is not None and is_dcp_checkpoint(newest):
        path, state = newest, None
        stored = read_dcp_metadata(path).get("recipe")
    else:
        found = newest_loadable_checkpoint(ckpt_dir)
        if found is None:
            notes.append(f"no checkpoint in {ckpt_dir} yet: starting from step 0")
            return None
        path, state, skipped = found
        if skipped:
            notes.append(f"resuming from {path.name}, the newest checkpoint that loads; skipped "
                         + "; ".join(skipped))
        stored = state.metadata.get("recipe")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} has no recipe metadata; cannot check it matches this run")
    diffs = recipe_differences(stored, recipe)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: its recipe differs from this one in "
            + "; ".join(diffs[:5])
        )
    return path if state is None else state
