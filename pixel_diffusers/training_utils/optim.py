"""Optimiser, learning-rate schedules, the adaptive gradient clip, loss-spike rollback and OOM recovery."""

from __future__ import annotations

import copy
import gc
import logging
import math

import torch

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_8bit")
_NO_DECAY_MARKERS = ("bias", "norm", "embed")


def build_optimizer(
    named_parameters,
    name: str = "adamw",
    learning_rate: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    learning_rate_by_prefix: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases, norms and embeddings get no weight decay.

    `learning_rate_by_prefix` gives parameter groups their own rate (the longest matching name prefix wins); a rate
    of 0 freezes the group (it is left out of the optimiser). "adamw_8bit" uses bitsandbytes' AdamW8bit when it is
    installed and CUDA is available, and falls back to AdamW otherwise.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not supported; allowed values: {OPTIMIZERS}.")
    prefixes = sorted((learning_rate_by_prefix or {}).items(), key=lambda item: -len(item[0]))
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for param_name, param in named_parameters:
        if not param.requires_grad:
            continue
        lr = next((rate for prefix, rate in prefixes if param_name.startswith(prefix)), learning_rate)
        if lr == 0:
            param.requires_grad_(False)
            continue
        decay = not any(marker in param_name.lower() for marker in _NO_DECAY_MARKERS)
        groups.setdefault((lr, decay), []).append(param)
    if not groups:
        raise ValueError("No trainable parameter: every parameter is frozen or has learning rate 0.")
    param_groups = [
        {"params": params, "lr": lr, "weight_decay": weight_decay if decay else 0.0}
        for (lr, decay), params in groups.items()
    ]
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None and torch.cuda.is_available():
            return bnb.optim.AdamW8bit(param_groups, lr=learning_rate, betas=betas, eps=eps)
        logger.warning("optimizer='adamw_8bit' needs bitsandbytes and CUDA; using torch AdamW.")
    return torch.optim.AdamW(param_groups, lr=learning_rate, betas=betas, eps=eps)


def stepped_cosine_restart_lambda(
    base_lr: float, steps_per_cycle: int, high: float, low: float, decay: float = 0.9, floor: float = 1e-5,
    num_warmup_steps: int = 0,
):
    """Multiplier of `base_lr` for the stepped cosine restart: each cycle of `steps_per_cycle` steps anneals from
    `high` to `low`; after each cycle both are multiplied by `decay`, never below `floor`."""
    if steps_per_cycle < 1:
        raise ValueError(f"steps_per_cycle must be >= 1, got {steps_per_cycle}.")

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return (step + 1) / num_warmup_steps * high / base_lr
        cycle, position = divmod(step - num_warmup_steps, steps_per_cycle)
        top, bottom = max(high * decay**cycle, floor), max(low * decay**cycle, floor)
        return (bottom + (top - bottom) * 0.5 * (1 + math.cos(math.pi * position / steps_per_cycle))) / base_lr

    return factor


LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "stepped_cosine_restart"
)


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    steps_per_cycle: int | None = None,
    min_learning_rate: float = 1e-5,
    cycle_low_ratio: float = 0.5,
    cycle_decay: float = 0.9,
):
    """diffusers' `get_scheduler` for its schedules, plus "stepped_cosine_restart" (cycles of `steps_per_cycle`,
    from the base rate down to `cycle_low_ratio` of it, both scaled by `cycle_decay` per cycle, floored at
    `min_learning_rate`)."""
    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler={name!r} is not supported; allowed values: {LR_SCHEDULERS}.")
    if name == "stepped_cosine_restart":
        lambdas = []
        for group in optimizer.param_groups:
            base = group["lr"]
            lambdas.append(
                stepped_cosine_restart_lambda(
                    base, steps_per_cycle or num_training_steps, base, base * cycle_low_ratio, cycle_decay,
                    min_learning_rate, num_warmup_steps,
                )
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)


class AdaptiveGradClip:
    """ZClip: an exponential moving mean and variance of the gradient norm; a norm whose z-score exceeds
    `z_threshold` is clipped to mean + z_threshold * std, and every norm to at most `max_norm`.

    The statistics start from the first `warmup_steps` norms (their plain mean and variance) and are then updated with
    the clipped norm, so one spike does not inflate them.
    """

    def __init__(self, max_norm: float = 1.0, z_threshold: float = 2.5, decay: float = 0.99, warmup_steps: int = 25):
        self.max_norm, self.z_threshold, self.decay, self.warmup_steps = max_norm, z_threshold, decay, warmup_steps
        self.mean = 0.0
        self.var = 0.0
        self.warmup_norms: list[float] = []

    def clip(self, accelerator, parameters) -> float:
        """Clips the gradients of `parameters` in place (through `accelerator`) and returns their norm before."""
        parameters = [p for p in parameters if p.grad is not None]
        norm = float(accelerator.clip_grad_norm_(parameters, float("inf")))
        if not math.isfinite(norm):
            return norm
        cap = self.max_norm
        if len(self.warmup_norms) < self.warmup_steps:
            self.warmup_norms.append(norm)
            if len(self.warmup_norms) == self.warmup_steps:
                values = torch.tensor(self.warmup_norms, dtype=torch.float64)
                self.mean, self.var = float(values.mean()), float(values.var(unbiased=False))
        else:
            std = math.sqrt(self.var)
            if std > 0 and (norm - self.mean) / std > self.z_threshold:
                cap = min(cap, self.mean + self.z_threshold * std)
            clipped = min(norm, cap)
            delta = clipped - self.mean
            self.mean += (1 - self.decay) * delta
            self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        if norm > cap:
            torch.nn.utils.clip_grad_norm_(parameters, cap)
        return norm

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "warmup_norms": list(self.warmup_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.warmup_norms = state["mean"], state["var"], list(state["warmup_norms"])


class LossSpikeGuard:
    """Every `every` steps keeps a CPU copy of the model, optimiser and EMA; a loss above `factor` times the previous
    step's restores that copy, and the caller skips the step.

    The copy is not part of checkpoints: after a resume the first snapshot is the resumed state.
    """

    def __init__(self, model, optimizer, ema=None, every: int = 100, factor: float = 5.0):
        if every < 1 or factor <= 1:
            raise ValueError(f"Need every >= 1 and factor > 1, got every={every}, factor={factor}.")
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.every, self.factor = every, factor
        self.previous_loss: float | None = None
        self.snapshot = None
        self.num_rollbacks = 0

    def maybe_snapshot(self, step: int) -> None:
        if self.snapshot is None or step % self.every == 0:
            to_cpu = lambda state: {k: v.detach().to("cpu", copy=True) for k, v in state.items()}  # noqa: E731
            self.snapshot = (
                to_cpu(self.model.state_dict()),
                copy.deepcopy(_cpu_optimizer_state(self.optimizer)),
                copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None,
            )

    def is_spike(self, loss: float) -> bool:
        """True (and the snapshot restored) when `loss` is a spike; otherwise it becomes the reference loss."""
        if self.previous_loss is not None and (not math.isfinite(loss) or loss > self.factor * self.previous_loss):
            model_state, optimizer_state, ema_state = self.snapshot
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            if ema_state is not None:
                self.ema.load_state_dict(ema_state)
            self.num_rollbacks += 1
            logger.warning("Loss spike (%.4g after %.4g): restored the last snapshot, skipped the step.", loss,
                           self.previous_loss)
            return True
        self.previous_loss = loss
        return False


def _cpu_optimizer_state(optimizer) -> dict:
    state = optimizer.state_dict()
    return {
        "state": {k: {n: (t.to("cpu") if torch.is_tensor(t) else t) for n, t in v.items()} for k, v in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def halve_batch(batch: dict) -> dict | None:
    """The first half of every per-sample entry (tensors and lists alike); None when the batch has one sample."""
    size = len(batch["pixel_values"])
    if size <= 1:
        return None
    half = size // 2
    return {k: (v[:half] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}


def run_with_oom_retry(step_fn, batch: dict, optimizer, max_retries: int = 3):
    """Runs `step_fn(batch)`; on an out-of-memory error frees memory, halves images and captions together and
    retries, at most `max_retries` times. Returns the step's result, or None when the batch is skipped.

    The gradients of the failed attempt are discarded (`optimizer.zero_grad`), including any accumulated before it.
    """
    for attempt in range(max_retries + 1):
        try:
            return step_fn(batch)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch = halve_batch(batch)
            if batch is None or attempt == max_retries:
                logger.warning("Out of memory: skipping the batch after %d attempt(s).", attempt + 1)
                return None
            logger.warning("Out of memory: retrying with batch size %d.", len(batch["pixel_values"]))
    return None
