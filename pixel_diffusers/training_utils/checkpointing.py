"""Atomic, pruned `accelerate` checkpoints and exact resumption."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class TrainingState:
    """The loop's own counters, saved with every checkpoint through `accelerator.register_for_checkpointing`."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class CheckpointManager:
    """Writes `output_dir/checkpoint-<step>` folders with `accelerator.save_state`, keeping the newest `total_limit`.

    A checkpoint is first written to a hidden temporary folder and renamed into place only once complete, so a run
    killed while saving keeps its previous checkpoint intact; leftovers of such a run are removed at the next save.
    Everything registered with `accelerator.register_for_checkpointing` (EMA, sampler, training state) and the RNG
    states of every process are part of each checkpoint.
    """

    def __init__(self, output_dir: str | Path, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 or None, got {total_limit}.")
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def save(self, accelerator, step: int) -> Path:
        final = self.output_dir / f"checkpoint-{step}"
        staging = self.output_dir / f".checkpoint-{step}.partial"
        if accelerator.is_main_process:
            for leftover in self.output_dir.glob(".checkpoint-*.partial"):
                shutil.rmtree(leftover)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(self.output_dir)
            self._prune()
            logger.info("Saved %s", final)
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        for old in self.checkpoints()[: -self.total_limit]:
            shutil.rmtree(old)

    def resolve(self, which: str | None) -> Path | None:
        """The checkpoint named by `--resume_from_checkpoint`: "latest" (None when there is none yet) or a path."""
        if which is None:
            return None
        if which == "latest":
            return self.latest()
        path = Path(which)
        if not path.is_dir():
            path = self.output_dir / which
        if not path.is_dir() or not _CHECKPOINT_NAME.match(path.name):
            raise ValueError(
                f"resume_from_checkpoint={which!r} is neither 'latest' nor a checkpoint-<step> folder; available: "
                f"{[p.name for p in self.checkpoints()]}."
            )
        return path

    def resume(self, accelerator, which: str | None) -> int:
        """Restores the state of `which` into `accelerator` and returns its step (0 when there is nothing to resume)."""
        path = self.resolve(which)
        if path is None:
            if which is not None:
                logger.info("No checkpoint in %s yet: starting from step 0.", self.output_dir)
            return 0
        accelerator.load_state(str(path))
        logger.info("Resumed from %s", path)
        return int(_CHECKPOINT_NAME.match(path.name).group(1))


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
