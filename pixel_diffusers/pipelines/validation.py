"""Argument checks shared by the pipelines' `check_inputs`: each raises a ValueError (a TypeError for a value of the
wrong type) that names the argument in backticks and says what is allowed."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# What can drive sampling out of range; named when a step turns non-finite.
SAMPLING_INPUTS = "`guidance_scale`, `latents`, the prompt embeddings or the model weights"


def is_int(value) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A Python or numpy real number (not a bool)."""
    return (is_int(value) or isinstance(value, (float, np.floating))) and not isinstance(value, (bool, np.bool_))


def check_positive_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None) -> None:
    """A finite real number in [minimum, maximum]."""
    bounds = ""
    if minimum is not None and maximum is not None:
        bounds = f" in [{minimum}, {maximum}]"
    elif minimum is not None:
        bounds = f" >= {minimum}"
    elif maximum is not None:
        bounds = f" <= {maximum}"
    if (
        not is_number(value)
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"`{name}` must be a finite number{bounds}, got {value!r}.")


def check_guidance_scale(value) -> None:
    check_number("guidance_scale", value, minimum=0)


def check_size(name: str, value, multiple: int = 1) -> None:
    """A positive int multiple of `multiple` (an image side, `multiple` the patch size)."""
    if not is_int(value) or value < 1 or value % multiple:
        raise ValueError(f"`{name}` must be a positive multiple of the patch size {multiple} (an int), got {value!r}.")


def check_flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def check_choice(name: str, value, allowed: Sequence) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")


def check_callback_inputs(names, allowed: Sequence[str]) -> None:
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"`callback_on_step_end_tensor_inputs` must be a list of names from {list(allowed)}, got {names!r}.")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` may only name {list(allowed)}, got {unknown}.")


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback).__name__}.")


def callback_outputs(outputs) -> dict:
    """The dict a step-end callback returned (diffusers' contract: a dict of the tensors it replaces, maybe empty)."""
    if not isinstance(outputs, dict):
        raise TypeError(
            f"`callback_on_step_end` must return a dict (the tensors it replaces, or {{}}), got {type(outputs).__name__}."
        )
    return outputs


def check_generator(generator, batch_size: int | None = None) -> None:
    """None, a `torch.Generator`, or a non-empty list of them (one per sample when `batch_size` is known)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)):
        raise TypeError(
            f"`generator` must be a torch.Generator or a list of them (one per image), got {type(generator).__name__}; "
            "seed one with torch.Generator().manual_seed(seed)."
        )
    if not generator or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"`generator` as a list must hold one torch.Generator per image, got {generator!r}.")
    if batch_size is not None and len(generator) != batch_size:
        raise ValueError(f"`generator` is a list of {len(generator)} generators but {batch_size} images are generated.")


def check_tensor(name: str, value, shape: Sequence[int | None] | None = None) -> None:
    """A floating-point tensor with data (not on the meta device), finite, of `shape` (None entries: any size)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if value.device.type == "meta":
        raise ValueError(f"`{name}` is on the meta device (a tensor without data); pass a tensor on the CPU or a GPU.")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}.")
    if shape is not None and (
        value.ndim != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape))
    ):
        wanted = tuple("any" if s is None else s for s in shape)
        raise ValueError(f"`{name}` must have shape {wanted}, got {tuple(value.shape)}.")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` holds NaN or inf values.")


def check_mask(name: str, value, shape: Sequence[int]) -> None:
    """An attention mask: a tensor of `shape` holding only 0 and 1."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(value.shape)}.")
    if value.device.type == "meta" or not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"`{name}` must hold only 0 (padding) and 1 (token).")


def check_pair(name: str, value, minimum: float) -> None:
    """A pair of finite numbers >= minimum (SDXL's size and crop conditioning)."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(is_number(v) and math.isfinite(v) and v >= minimum for v in value)
    ):
        raise ValueError(f"`{name}` must be a pair of finite numbers >= {minimum}, got {value!r}.")


def check_sigmas(sigmas, num_inference_steps, default_steps, maximum: float = 1.0) -> None:
    """`sigmas`: None, or strictly decreasing finite noise levels in (0, maximum]; `num_inference_steps` a positive
    int. As in diffusers, `sigmas` win: their length is the number of steps, and a `num_inference_steps` that was
    also given (not the default) with another value is ignored with a warning."""
    check_positive_int("num_inference_steps", num_inference_steps)
    if sigmas is None:
        return
    if isinstance(sigmas, (torch.Tensor, np.ndarray)):
        if sigmas.ndim != 1 or (isinstance(sigmas, torch.Tensor) and sigmas.device.type == "meta"):
            raise ValueError(f"`sigmas` must be a 1-D list of noise levels, got shape {tuple(sigmas.shape)}.")
        values = [float(v) for v in sigmas.tolist()]
    elif isinstance(sigmas, (list, tuple)) and all(is_number(v) for v in sigmas):
        values = [float(v) for v in sigmas]
    else:
        raise TypeError(f"`sigmas` must be a list of numbers (noise levels in (0, {maximum}]), got {sigmas!r}.")
    if (
        not values
        or not all(math.isfinite(v) and 0.0 < v <= maximum for v in values)
        or any(b >= a for a, b in zip(values, values[1:]))
    ):
        raise ValueError(f"`sigmas` must be strictly decreasing noise levels in (0, {maximum}], got {values}.")
    if num_inference_steps != default_steps and num_inference_steps != len(values):
        logger.warning(
            f"`sigmas` holds {len(values)} noise levels and wins over `num_inference_steps={num_inference_steps}`, "
            "which is ignored."
        )


def check_finite_step(latents: torch.Tensor, step: int, sigma) -> None:
    """Raises when sampling has turned non-finite, naming the step (instead of returning NaN images)."""
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(
            f"Sampling turned non-finite (NaN or inf) at step {step} (sigma {float(sigma):.4g}); {SAMPLING_INPUTS} "
            "drive it out of range."
        )


def check_sampling_call(
    pipeline, output_type, output_types, callback_on_step_end_tensor_inputs, callback_on_step_end, generator, latents,
    latents_shape,
) -> None:
    """The checks every sampling `__call__` shares: `output_type`, the step-end callback and its tensor names,
    `generator`, and `latents` of `latents_shape` (None entries: any size)."""
    check_choice("output_type", output_type, output_types)
    check_callback_inputs(callback_on_step_end_tensor_inputs, pipeline._callback_tensor_inputs)
    check_callback(callback_on_step_end)
    check_generator(generator)
    if latents is not None:
        check_tensor("latents", latents, latents_shape)


def call_default(pipeline, name: str):
    """The default of `name` in the pipeline's `__call__` signature."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default
