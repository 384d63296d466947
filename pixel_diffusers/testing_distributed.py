"""Run a training script under accelerate's FSDP2 or DeepSpeed code paths on CPU processes (gloo), for tests.

accelerate engages FSDP and DeepSpeed only on accelerators: on a CPU-only machine it trains plain DDP (or refuses) and
the sharded code paths are never run. This launcher makes accelerate treat the CPU processes of a `torchrun` /
`accelerate launch` group as devices: the process group uses gloo, every device is the CPU, and everything else
(FSDP2's `fully_shard`, DeepSpeed's ZeRO engine, their checkpoints) is the real code of accelerate, torch and
DeepSpeed. It is never imported by the package or the training scripts; tests start the scripts through it:

    accelerate launch --config_file training/configs/accelerate/fsdp2.yaml --num_processes 2 \
        -m pixel_diffusers.testing_distributed training/train_pixelhdm.py --output_dir out ... \
        :: training/train_jit.py --output_dir out2 ...

Several runs separated by `::` share one process group (one start-up for many tiny runs). With the environment
variable `PIXEL_DIFFUSERS_ENGINE_REPORT` set to a folder, each process writes there, for every prepared model, how
much of each parameter it holds (`<run>-rank<r>.json`), so a test can check that the weights really are sharded.

Without it, the same command on a CPU-only machine stops with an error that says the engine cannot engage here.
"""

from __future__ import annotations

import itertools
import json
import os
import runpy
import sys
from pathlib import Path

import torch


def engage_engines_on_cpu() -> None:
    """Patches accelerate's backend and device choice so that FSDP / DeepSpeed engage on CPU processes over gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available():
        raise RuntimeError("pixel_diffusers.testing_distributed is for CPU-only machines; launch the script directly.")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    prepare_backend, set_device = PartialState._prepare_backend, PartialState.set_device

    def gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not cpu:
            return "gloo", DistributedType.MULTI_GPU  # the device type accelerate requires for FSDP / DeepSpeed
        return prepare_backend(self, cpu, sagemaker_dp, backend)

    def cpu_device(self):
        if self.device is None and self.distributed_type in (DistributedType.MULTI_GPU, DistributedType.DEEPSPEED):
            self.device = torch.device("cpu")
            return
        set_device(self)

    PartialState._prepare_backend = gloo_backend
    PartialState.set_device = cpu_device
    try:  # DeepSpeed would compile its shared-memory all-reduce kernel for CPUs on first use; gloo carries everything
        import deepspeed.comm.torch

        deepspeed.comm.torch.build_shm_op = lambda: None
    except ImportError:
        pass


def held_fraction(model: torch.nn.Module) -> dict:
    """How many elements of its parameters this process holds, against their full size, and how they are held."""
    from torch.distributed.tensor import DTensor

    held = full = 0
    kinds = set()
    for param in model.parameters():
        if isinstance(param, DTensor):
            held, full, kind = held + param.to_local().numel(), full + param.numel(), "dtensor"
        elif hasattr(param, "ds_tensor"):
            held, full, kind = held + param.ds_tensor.numel(), full + param.ds_numel, "zero3_partition"
        else:
            held, full, kind = held + param.numel(), full + param.numel(), "full"
        kinds.add(kind)
    return {"held": held, "full": full, "kinds": sorted(kinds)}


def _report_prepared_models(folder: Path, run: int):
    """Wraps `Accelerator.prepare` to write `held_fraction` of the first prepared model of run `run`."""
    from accelerate import Accelerator

    prepare = Accelerator.prepare

    def reporting_prepare(self, *objects, **kwargs):
        prepared = prepare(self, *objects, **kwargs)
        models = [self.unwrap_model(o) for o in (prepared if isinstance(prepared, (tuple, list)) else (prepared,))
                  if isinstance(o, torch.nn.Module)]
        if models:
            report = {"distributed_type": str(self.distributed_type), **held_fraction(models[0])}
            (folder / f"{run}-rank{self.process_index}.json").write_text(json.dumps(report))
        return prepared

    Accelerator.prepare = reporting_prepare
    return prepare


def main(argv: list[str]) -> None:
    runs = [list(group) for is_separator, group in itertools.groupby(argv, lambda a: a == "::") if not is_separator]
    if not runs:
        raise SystemExit("usage: python -m pixel_diffusers.testing_distributed SCRIPT [ARGS...] [:: SCRIPT ...]")
    engage_engines_on_cpu()
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    PartialState.destroy_process_group = lambda self, group=None: None  # the runs share the group; closed at the end

    report = os.environ.get("PIXEL_DIFFUSERS_ENGINE_REPORT")
    for index, run in enumerate(runs):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        original = _report_prepared_models(Path(report), index) if report else None
        sys.argv = run
        try:
            runpy.run_path(run[0], run_name="__main__")
        finally:
            if original is not None:
                Accelerator.prepare = original
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
