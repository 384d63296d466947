"""The exponential moving average of the trained parameters, under every distributed engine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .engines import Engine

EMA_FILE = "ema.safetensors"


class ShardedEMA:
    """EMA of a model's trainable parameters, each process averaging only the part of a parameter it holds.

    Design: the average lives where the parameter lives. Under DDP and ZeRO-1/2 every process holds every
    parameter and so the whole average (like diffusers' `EMAModel`); under FSDP2 and ZeRO-3 each process averages its
    own shard, so the EMA is sharded exactly like the weights and costs no memory the engine saved. The average is
    gathered only to be written: checkpoints hold the full EMA (one `ema.safetensors`, written by the main process),
    so a run resumes under any engine and world size that can resume its weights.

    The decay follows diffusers' `EMAModel` defaults: the first step copies the weights and step `n` uses
    `min(decay, (1 + n) / (10 + n))` with `n` counted from the second step, so a run that switches from `EMAModel`
    keeps its schedule.
    """

    def __init__(self, model: torch.nn.Module, engine: Engine, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {decay}.")
        self.engine, self.decay = engine, decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: engine.local_shard(p).detach().clone() for name, p in self.params.items()}
        self.optimization_step = 0

    def current_decay(self) -> float:
        step = self.optimization_step - 1
        if step <= 0:
            return 0.0
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self) -> None:
        self.optimization_step += 1
        one_minus_decay = 1 - self.current_decay()
        for name, param in self.params.items():
            shadow = self.shadow[name]
            shadow.sub_(one_minus_decay * (shadow - self.engine.local_shard(param).to(shadow.dtype)))

    @contextlib.contextmanager
    def swapped_in(self):
        """The model computes with the averaged weights inside the block (on every process), its own after."""
        saved = {}
        with torch.no_grad():
            for name, param in self.params.items():
                local = self.engine.local_shard(param)
                saved[name] = local.clone()
                local.copy_(self.shadow[name])
                self.engine.refresh_whole(param)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    self.engine.local_shard(param).copy_(saved[name])
                    self.engine.refresh_whole(param)

    def state_dict(self) -> dict:
        """This process's shards and step (for in-memory snapshots; checkpoints use `save`)."""
        return {"shadow": {k: v.clone() for k, v in self.shadow.items()}, "optimization_step": self.optimization_step}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["shadow"].items():
                self.shadow[name].copy_(value)
        self.optimization_step = state["optimization_step"]

    def full_state(self) -> dict[str, torch.Tensor]:
        """The full averaged parameters on CPU, by name (a collective: every process calls it)."""
        return {
            name: self.engine.gather_full(param, self.shadow[name]).detach().to("cpu", copy=True)
            for name, param in self.params.items()
        }

    def save(self, folder: Path, is_main_process: bool) -> None:
        """Writes the full EMA to `folder/ema.safetensors` (a collective; the main process writes)."""
        full = self.full_state()
        if is_main_process:
            metadata = {"optimization_step": str(self.optimization_step), "decay": json.dumps(self.decay)}
            save_file({k: v.contiguous() for k, v in full.items()}, str(Path(folder) / EMA_FILE), metadata=metadata)

    def load(self, folder: Path) -> None:
        """Restores the EMA written by `save`, sliced to this process's shards; every key and shape must match."""
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint has no EMA although --use_ema is set.")
        full = load_file(str(path))
        missing, unexpected = sorted(set(self.params) - set(full)), sorted(set(full) - set(self.params))
        misshapen = sorted(k for k in set(full) & set(self.params) if full[k].shape != self.engine.full_shape(self.params[k]))
        if missing or unexpected or misshapen:
            raise ValueError(
                f"{path} does not match the trained parameters: missing {missing}, unexpected {unexpected}, "
                f"misshapen {misshapen}."
            )
        with torch.no_grad():
            for name, param in self.params.items():
                self.shadow[name].copy_(self.engine.shard_of(param, full[name]))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        self.optimization_step = int(metadata.get("optimization_step", 0))
