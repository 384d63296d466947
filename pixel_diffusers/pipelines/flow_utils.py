"""What the flow-matching pipelines (PixelHDM, pixel-space SDXL, JiT, PixelDLM) share about their scheduler.

A pipeline knows its model's native output (x0 or the flow ``noise - x0``); the scheduler it holds decides what
``scheduler.step`` expects. :func:`scheduler_prediction_type` reads that from the scheduler itself, never from a
config key that only means something to another scheduler: ``FlowMatchEulerDiscreteScheduler.from_config(
pipe.scheduler.config)`` keeps our ``prediction_type`` in its config as an unused key, and the pipeline ignores it.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from ..schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler

# What `PixelFlowMatchScheduler` accepts, and what diffusers' multistep schedulers accept with `use_flow_sigmas=True`
# (where their alpha is 1 - sigma, so that `sample` and `epsilon` keep their meaning; `v_prediction` has none).
OUR_PREDICTION_TYPES = ("flow_prediction", "velocity", "sample", "epsilon")
FLOW_SIGMAS_PREDICTION_TYPES = ("flow_prediction", "sample", "epsilon")
SWAP_HINT = (
    "Flow pipelines run with PixelFlowMatchScheduler, diffusers' FlowMatchEulerDiscreteScheduler / "
    "FlowMatchHeunDiscreteScheduler, or a multistep scheduler with flow sigmas, e.g. "
    "`UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=True)`."
)


def _takes(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def scheduler_prediction_type(scheduler) -> str:
    """What `scheduler.step` expects as `model_output` in a flow-matching pipeline, decided by the scheduler itself.

    - `PixelFlowMatchScheduler`: its `prediction_type`.
    - diffusers' `FlowMatch*` schedulers, which have no `prediction_type` argument: the flow `noise - x0` (a
      `prediction_type` carried over by `from_config` is an unused key to them, and ignored here too).
    - a scheduler built with `use_flow_sigmas=True` (UniPC, DPM-Solver, DEIS, SA-Solver): its `prediction_type`,
      one of `flow_prediction`, `sample`, `epsilon`.

    Raises a ValueError naming the fix for any other scheduler.
    """
    name = type(scheduler).__name__
    config = scheduler.config
    if isinstance(scheduler, PixelFlowMatchScheduler):
        kind = config.prediction_type
        allowed = OUR_PREDICTION_TYPES
    elif not _takes(type(scheduler).__init__, "prediction_type") and name.startswith("FlowMatch"):
        return "flow_prediction"
    elif config.get("use_flow_sigmas", False):
        kind = config.get("prediction_type")
        allowed = FLOW_SIGMAS_PREDICTION_TYPES
    else:
        raise ValueError(f"{name} is not a flow-matching scheduler as configured. {SWAP_HINT}")
    if kind not in allowed:
        raise ValueError(
            f"{name}.config.prediction_type={kind!r} has no meaning in a flow-matching pipeline; use one of {allowed} "
            f"(e.g. `{name}.from_config(pipe.scheduler.config, prediction_type='flow_prediction')`)."
        )
    return kind


def current_sigma(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The sigma the scheduler's next `step` works at: `sigmas[step_index]` (the value it converts with), or
    `timestep / num_train_timesteps` for a scheduler without a step index."""
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if index is None or sigmas is None:
        return timestep.float() / scheduler.config.num_train_timesteps
    return sigmas[index].to(device=timestep.device, dtype=torch.float32)


def flow_to_prediction(scheduler, flow: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Converts the flow `noise - x0` at `sample` (noise level `sigma`) into what `scheduler` expects."""
    kind = scheduler_prediction_type(scheduler)
    if kind == "flow_prediction":
        return flow
    if kind == "velocity":
        return -flow
    if kind == "sample":
        return sample - sigma * flow
    return sample + (1.0 - sigma) * flow  # epsilon


def x0_to_prediction(scheduler, x0: torch.Tensor, sample: torch.Tensor, flow_sigma: torch.Tensor) -> torch.Tensor:
    """Converts an x0 estimate at `sample` into what `scheduler` expects. The flow `noise - x0` is
    `(sample - x0) / flow_sigma`: pass the sample's sigma, or a floored sigma where a model's sampler floors it."""
    kind = scheduler_prediction_type(scheduler)
    if kind == "sample":
        return x0
    flow = (sample - x0) / flow_sigma
    if kind == "flow_prediction":
        return flow
    if kind == "velocity":
        return -flow
    return x0 + flow  # epsilon


def retrieve_flow_timesteps(scheduler, num_inference_steps, device, sigmas=None, default_sigmas=None, **kwargs):
    """`retrieve_timesteps` for a flow pipeline: checks the scheduler (see :func:`scheduler_prediction_type`), passes
    the user's `sigmas`, or else the pipeline's own grid `default_sigmas` where the scheduler takes a list (the
    others build their own flow grid of `num_inference_steps`). Returns `(timesteps, num_inference_steps)`."""
    scheduler_prediction_type(scheduler)
    if sigmas is None and default_sigmas is not None and _takes(scheduler.set_timesteps, "sigmas"):
        sigmas = default_sigmas
    if sigmas is not None:
        num_inference_steps = None
    # A key such as `mu` goes only to a scheduler that takes it (a `use_dynamic_shifting` that `from_config` carried
    # into FlowMatchHeunDiscreteScheduler's config is an unused key there).
    kwargs = {key: value for key, value in kwargs.items() if _takes(scheduler.set_timesteps, key)}
    return retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, **kwargs)


def progress_total(scheduler, timesteps) -> int:
    """The steps a progress bar counts: the `num_inference_steps` the user asked for, not the model calls of a
    two-call solver (Heun: 2N - 1); advance it with :func:`starts_a_step` before each `step`."""
    steps = getattr(scheduler, "num_inference_steps", None)
    return int(steps) if steps else len(timesteps)


def starts_a_step(scheduler) -> bool:
    """True when the next `scheduler.step` call begins a step (always, except the second call of Heun / 2S)."""
    return bool(getattr(scheduler, "state_in_first_order", True))
