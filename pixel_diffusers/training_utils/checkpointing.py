"""Atomic, pruned `accelerate` checkpoints and exact resumption, with nothing unpickled on the way back."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
EXTRAS_FILE = "training_state.json"
RUN_FILE = "run.json"


class TrainingState:
    """The loop's own counters, saved with every checkpoint."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class CheckpointManager:
    """Writes `output_dir/checkpoint-<step>` folders, keeping the newest `total_limit`.

    A checkpoint holds what `accelerator.save_state` writes for the engine (weights, optimizer, scheduler, the RNG
    states of every process), `training_state.json` with the JSON state of each object in `extras` (sampler, ZClip,
    loop counters), the full EMA as `ema.safetensors` and `run.json` (engine and world size). It is written to a
    hidden folder and renamed into place only once complete, so a run killed or out of disk while saving keeps its
    previous checkpoint intact; a failed save removes its partial folder.

    On resume every file that could hold a pickle is first opened with a loader that only builds tensors and plain
    data (`torch.load(weights_only=True)`, or an allowlist for the pickled index of a distributed checkpoint); a file
    that needs anything else is refused before accelerate or DeepSpeed reads it.
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

    def save(self, accelerator, step: int, extras: dict | None = None, ema=None, engine=None) -> Path:
        final = self.output_dir / f"checkpoint-{step}"
        staging = self.output_dir / f".checkpoint-{step}.partial"
        if accelerator.is_main_process:
            for leftover in self.output_dir.glob(".checkpoint-*.partial"):
                shutil.rmtree(leftover)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging), safe_serialization=True)
            if ema is not None:
                ema.save(staging, accelerator.is_main_process)
            if accelerator.is_main_process:
                states = {name: obj.state_dict() for name, obj in (extras or {}).items()}
                _write_json(staging / EXTRAS_FILE, states)
                run = {"step": step, "engine": engine.name if engine else None, "world_size": accelerator.num_processes}
                _write_json(staging / RUN_FILE, run)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _fsync_tree(staging)
        except Exception as error:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            if _is_disk_full(error, self.output_dir):
                previous = self.latest()
                raise OSError(
                    errno.ENOSPC,
                    f"No space left on the device of {self.output_dir} while writing checkpoint-{step}; the partial "
                    f"folder was removed and {previous.name if previous else 'no earlier checkpoint'} is intact. "
                    "Free space (or lower --checkpoints_total_limit) and resume with --resume_from_checkpoint latest.",
                ) from error
            raise
        if accelerator.is_main_process:
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

    def resume(self, accelerator, which: str | None, extras: dict | None = None, ema=None, engine=None) -> int:
        """Restores `which` into `accelerator`, `extras` and `ema`; returns its step (0 when there is nothing yet).

        Refuses a checkpoint of another engine, a DeepSpeed checkpoint on another world size, a missing or unreadable
        RNG state or training state, and any file that would need unpickling beyond tensors and plain data.
        """
        path = self.resolve(which)
        if path is None:
            if which is not None:
                logger.info("No checkpoint in %s yet: starting from step 0.", self.output_dir)
            return 0
        run = _read_json(path / RUN_FILE)
        same_world = run["world_size"] == accelerator.num_processes
        if engine is not None:
            check_resumable(run, engine)
        rng, rng_states = path / f"random_states_{accelerator.process_index}.pkl", None
        for file in sorted(path.rglob("*")):
            if file.is_file():
                loaded = load_data_only(file)
                rng_states = loaded if file == rng else rng_states
        if same_world:
            if not rng.is_file():
                raise FileNotFoundError(f"{rng} is missing: the resumed run could not continue exactly.")
            _check_rng_states(rng, rng_states)
        else:
            logger.warning(
                "Resuming on %d processes a run saved on %d: weights, optimizer and EMA are resharded; the data "
                "order and random draws of the following steps differ from an uninterrupted run.",
                accelerator.num_processes, run["world_size"],
            )
        accelerator.load_state(str(path))
        states = _read_json(path / EXTRAS_FILE)
        missing = sorted(set(extras or {}) - set(states))
        if missing:
            raise ValueError(f"{path / EXTRAS_FILE} has no state for {missing}; it holds {sorted(states)}.")
        for name, obj in (extras or {}).items():
            obj.load_state_dict(states[name])
        if ema is not None:
            ema.load(path)
        logger.info("Resumed from %s", path)
        return int(_CHECKPOINT_NAME.match(path.name).group(1))


def check_resumable(run: dict, engine) -> None:
    """Raises when a checkpoint written by `run["engine"]` cannot be resumed by `engine` (see the README)."""
    saved, world = run["engine"], run["world_size"]
    families = {"single": "full", "ddp": "full", "fsdp2": "fsdp2"}
    family = lambda name: families.get(name, "deepspeed")  # noqa: E731
    if family(saved) != family(engine.name) or (family(saved) == "deepspeed" and saved != engine.name):
        raise ValueError(
            f"The checkpoint was written by {saved} and this run uses {engine.name}: their checkpoint formats differ. "
            f"Resume with the engine that wrote it."
        )
    if family(saved) == "deepspeed" and world != engine.num_processes:
        raise ValueError(
            f"The {saved} checkpoint was written by {world} processes and this run has {engine.num_processes}: "
            "DeepSpeed partitions its optimizer state per process, so it resumes only on the same world size "
            "(FSDP2 and DDP checkpoints reshard)."
        )


# -- loading without unpickling anything but data --------------------------------------------------------------

_RAW_PICKLE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
_RAW_PICKLE_GLOBALS = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles the index of a distributed checkpoint: its dataclasses, sizes, dtypes and plain containers."""

    def find_class(self, module, name):
        if module.startswith(_RAW_PICKLE_MODULES) or (module, name) in _RAW_PICKLE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed writes into its checkpoints."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def load_data_only(path: Path):
    """What the pickle (or torch zip) `path` holds, loaded without running code: tensors and plain data only; None for
    any other file (safetensors, JSON). A file needing more raises a ValueError naming it.

    The file is read once: the loader its first bytes call for reads it through the same handle, except a torch zip,
    which torch maps from the path (its tensors are not read into memory). The data files of a distributed checkpoint (`.distcp`) are skipped:
    torch reads each item in them with `weights_only=True` itself; their pickled index (`.metadata`) is loaded here.
    """
    if path.suffix == ".distcp":
        return None
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(0)
        try:
            if head.startswith(b"PK"):
                from accelerate.utils.other import TORCH_SAFE_GLOBALS

                mapped = zipfile.is_zipfile(handle)
                handle.seek(0)
                with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS + _deepspeed_safe_globals()):
                    return torch.load(path if mapped else handle, map_location="cpu", weights_only=True, mmap=mapped)
            if head[:1] == b"\x80":
                return _DataOnlyUnpickler(handle).load()
        except Exception as error:
            raise ValueError(
                f"Refusing to resume: {path} holds a pickle that is not plain data ({error}). Checkpoints are loaded "
                "without running code; a file that needs more was not written by this run."
            ) from error
    return None


def _check_rng_states(path: Path, states) -> None:
    """`states`, loaded from `path`, must hold the RNG states accelerate restores."""
    if not isinstance(states, dict):
        raise ValueError(f"{path} is unreadable (no saved RNG states in it): the resumed run could not continue exactly.")
    missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: the resumed run could not continue exactly.")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True), encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is missing or unreadable ({error}): cannot resume from {path.parent}.") from error


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


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
