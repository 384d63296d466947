"""The distributed engine of a run, as accelerate chose it, and the few operations that differ between engines.

The engine is chosen the accelerate way (an accelerate config file or `accelerate launch` flags); the training
scripts never wrap a model themselves. Supported: one process, DDP, FSDP2 (full or hybrid shard) and DeepSpeed
ZeRO stages 1-3. A requested engine that the run would not use is an error, never a quiet fallback to DDP.

The loop only needs three things that depend on the engine: the part of a parameter this process holds
(`local_shard`), the full value gathered from every process (`gather_full`) and, the other way, this process's part
of a full value (`shard_of`). With them the EMA, validation sampling and the final state dict work under all
engines.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ENGINES = ("single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_engine() -> str | None:
    """"fsdp2" or "deepspeed" when the launch (accelerate config or flags) asks for one, else None."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(
                f"fsdp_version={version} is not supported: the training scripts shard with FSDP2. Set "
                "`fsdp_version: 2` in the accelerate config (or pass `--fsdp_version 2` to accelerate launch)."
            )
        return "fsdp2"
    return None


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch, mpirun) started."""
    for name in _WORLD_SIZE_VARIABLES:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def check_launch() -> None:
    """Refuses `accelerate launch --cpu --num_processes N` (N > 1), which starts a single process.

    accelerate's plain launcher sets the rendezvous address for several processes but starts only one; the run would
    silently train alone.
    """
    if _env_flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR") and launched_world_size() == 1:
        raise RuntimeError(
            "accelerate launch --cpu with --num_processes > 1 starts only ONE process (accelerate starts several "
            "CPU processes only through mpirun, with --mpirun_hostfile). Start them with `accelerate launch "
            "--multi_gpu --num_processes N` or `torchrun --nproc_per_node N` (both train data-parallel on CPUs "
            "over gloo), or pass --num_processes 1."
        )


@dataclass(frozen=True)
class Engine:
    """What a prepared run uses: `name` in `ENGINES`, its world size and whether parameters are sharded."""

    name: str
    num_processes: int

    @classmethod
    def of(cls, accelerator) -> "Engine":
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind == DistributedType.FSDP:
            if accelerator.state.fsdp_plugin.fsdp_version != 2:
                raise ValueError("Only FSDP2 is supported: set `fsdp_version: 2` in the accelerate config.")
            name = "fsdp2"
        elif kind == DistributedType.DEEPSPEED:
            stage = accelerator.state.deepspeed_plugin.zero_stage
            if stage not in (1, 2, 3):
                raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported; use stage 1, 2 or 3.")
            name = f"zero{stage}"
        elif kind == DistributedType.NO:
            name = "single"
        else:
            name = "ddp"
        return cls(name, accelerator.num_processes)

    @property
    def shards_parameters(self) -> bool:
        """FSDP2 and ZeRO-3 keep a slice of every parameter on each process."""
        return self.name in ("fsdp2", "zero3")

    @property
    def is_deepspeed(self) -> bool:
        return self.name.startswith("zero")

    def check_requested(self, requested: str | None, launched: int) -> None:
        """The run must use what the launch asked for, with every process the launcher started."""
        hint = "" if torch.cuda.is_available() else " accelerate engages FSDP and DeepSpeed only on GPUs, and this machine has none."
        if requested == "fsdp2" and self.name != "fsdp2" or requested == "deepspeed" and not self.is_deepspeed:
            raise RuntimeError(
                f"The launch asked for {requested} but accelerate prepared {self.name}.{hint} Launch on GPUs, or "
                "drop the engine from the accelerate config / flags to train with DDP."
            )
        if launched > 1 and self.num_processes != launched:
            raise RuntimeError(
                f"The launcher started {launched} processes but accelerate formed a group of {self.num_processes}: "
                f"the processes would train independently.{hint if requested else ''} On a CPU-only machine start "
                "DDP processes with `accelerate launch --multi_gpu` or `torchrun`."
            )

    # -- the three shard operations -----------------------------------------------------------------------------

    def local_shard(self, param: torch.Tensor) -> torch.Tensor:
        """The part of `param` this process holds, as a tensor sharing its storage (writes change the parameter)."""
        if self.name == "fsdp2":
            return param.to_local()
        if self.name == "zero3":
            return param.ds_tensor
        return param.data

    def refresh_whole(self, param: torch.Tensor) -> None:
        """After a write into `local_shard(param)`: under ZeRO-3, copies the new value into the whole copy of the
        parameter when DeepSpeed holds one (a collective then; every process calls it in the same order).

        DeepSpeed keeps some parameters whole between forwards: those below `stage3_param_persistence_threshold`
        (biases, norms, small layers) after the first optimiser step, and others it expects to reuse soon
        (`stage3_max_reuse_distance`). A forward computes with that copy, so a write into the partitions alone (the EMA
        swapped in for sampling, and out again) would not reach it.
        """
        if self.name == "zero3" and param.data.numel() == param.ds_numel:
            param.data.copy_(self.gather_full(param, param.ds_tensor))

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        """The shape of the whole parameter (ZeRO-3 leaves an empty placeholder in the module)."""
        return param.ds_shape if self.name == "zero3" else param.shape

    def gather_full(self, param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The full value whose local parts are `local` on each process (same layout as `local_shard(param)`).

        A collective: every process calls it, in the same order.
        """
        if self.name == "fsdp2":
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(
                local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            ).full_tensor()
        if self.name == "zero3":
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
        return local

    def shard_of(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This process's part of the full value `full` of `param` (no communication)."""
        if self.name == "fsdp2":
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(
                full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
        if self.name == "zero3":
            size = param.ds_tensor.numel()
            flat = torch.zeros(size * dist.get_world_size(), dtype=full.dtype, device=param.ds_tensor.device)
            flat[: full.numel()] = full.reshape(-1).to(flat.device)
            return flat[dist.get_rank() * size : (dist.get_rank() + 1) * size].view_as(param.ds_tensor)
        return full.to(param.device)

    def reshard(self, model: torch.nn.Module) -> None:
        """Frees the whole parameters FSDP2 keeps after a forward without backward (sampling), so that the next
        forward gathers the shards again.

        FSDP2 leaves the root group of a model unsharded after its forward, until the backward; after a forward under
        `torch.no_grad` it stays so, and the next forward would reuse those copies: writes into the shards in between
        (the EMA swapped out after sampling) would be ignored, and the module would hold plain tensors, not DTensors.
        """
        if self.name == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def full_state_dict(self, model: torch.nn.Module, overrides: dict | None = None, keep: bool = True,
                        names: set | None = None) -> dict:
        """The full state dict of `model` on CPU, gathered parameter by parameter (a collective).

        `overrides` replaces the values of some parameters (e.g. their EMA); `names` limits the result to those
        entries (a LoRA's adapter weights: the frozen base is never gathered). Processes with `keep=False` take part
        in the gathering but return an empty dict, so only the writer holds a full copy.
        """
        self.reshard(model)
        params = dict(model.named_parameters())
        overrides = overrides or {}
        state = {}
        for name, value in model.state_dict().items():
            if names is not None and name not in names:
                continue
            if name in params and name not in overrides:
                value = self.gather_full(params[name], self.local_shard(params[name]))
            if keep:
                state[name] = overrides.get(name, value).detach().to("cpu", copy=True)
        return state

    def describe(self, accelerator, per_process_batch: int, accumulation: int) -> str:
        """The line every run logs at start: engine, world size, batch per process and in all, mixed precision."""
        return (
            f"engine={self.name} world_size={self.num_processes} per_process_batch={per_process_batch} "
            f"gradient_accumulation={accumulation} global_batch={per_process_batch * accumulation * self.num_processes} "
            f"mixed_precision={accelerator.mixed_precision} device={accelerator.device}"
        )


@contextlib.contextmanager
def frozen_models_unpartitioned(accelerator):
    """Builds and loads the transformers models in the block whole under ZeRO-3; a no-op under other engines.

    accelerate hands the DeepSpeed config of a ZeRO-3 run to transformers (`HfDeepSpeedConfig`) even with
    `zero3_init_flag: false`, and transformers then creates every model it loads (`from_pretrained`) or builds from a
    config (`_from_config`, e.g. inside `CLIPTextModelWithProjection`) in `deepspeed.zero.Init`: partitioned into empty
    placeholders. Only the model given to `accelerator.prepare` is gathered by DeepSpeed, so a frozen text or vision
    encoder made that way cannot run. Like diffusers' training scripts (which disable zero.Init for their frozen
    encoders), the scripts load their frozen components in this block. Unlike accelerate's
    `zero3_init_context_manager(enable=False)`, which leaves transformers' config in place when `zero3_init_flag` is
    already false, this removes it for the block and restores it after.
    """
    zero3 = Engine.of(accelerator).name == "zero3"
    config = getattr(accelerator.state.deepspeed_plugin, "dschf", None) if zero3 else None
    if config is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def configure_deepspeed(accelerator, args) -> None:
    """Fills the DeepSpeed config values accelerate cannot infer from a run without a prepared DataLoader."""
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = args.max_grad_norm
    config.setdefault("zero_allow_untested_optimizer", True)
