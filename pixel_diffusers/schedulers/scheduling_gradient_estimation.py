"""The gradient-estimation sampler of smalldiffusion (Permenter & Yuan, ICML 2024) as a diffusers scheduler.

Noise model. For the variance-preserving schedules (``"ddpm"``, ``"ldm"``, ``"sigmoid"``, ``"cosine"``) and the
variance-exploding ``"log_linear"`` one, the scheduler's ``sample`` is ``x_sigma = x0 + sigma * noise``, which is
``x_t / sqrt(alpha_bar_t)`` with ``alpha_bar = 1 / (1 + sigma^2)``. As in diffusers' ``EulerDiscreteScheduler``,
:meth:`scale_model_input` hands the model the variance-preserving ``x_sigma / sqrt(1 + sigma^2)`` and ``timesteps``
are indices into the training table of ``num_train_timesteps`` sigmas (diffusers' discrete timesteps for the beta
schedules), so any diffusers epsilon pipeline runs with it unchanged. For ``"flow"`` the sample is
``(1 - t) * x0 + t * noise``, ``timesteps = t * num_train_timesteps`` and the model input is not scaled, the
convention of diffusers' flow-matching schedulers and of our flow pipelines.

The update (smalldiffusion's ``samples``). From sigma to the next sigma' with the model's noise direction ``d``
(epsilon, or ``noise - x0`` for flow) and the previous step's ``d_prev``::

    d_bar   = d                                 on the first step, else gam * d + (1 - gam) * d_prev
    sigma_p = (sigma' / sigma^mu) ** (1 / (1 - mu))
    x'      = x - (sigma - sigma_p) * d_bar + sqrt(sigma'^2 - sigma_p^2) * noise

``gam=1, mu=0`` is DDIM (eta 0), ``gam=1, mu=0.5`` is DDPM's ancestral step with the "fixed_small" variance, and
``gam=2, mu=0`` is the accelerated gradient-estimation sampler (``d_bar = 2 d - d_prev``).

Sigmas of a sampling run use smalldiffusion's "trailing" spacing: table indices
``round(N * (1 - k / steps)) - 1`` for ``k < steps``, then index 0, so by default sampling ends at the smallest
sigma of the table, not at 0 (``final_sigmas_type="zero"`` ends with a jump to the clean estimate instead). The flow
schedule uses ``linspace(t_max, t_min, steps)`` followed by 0.

Deliberate difference: the initial noise is scaled by ``init_noise_sigma = sqrt(1 + sigma_max^2)``, the standard
deviation of ``x_sigma`` for unit-variance data (smalldiffusion uses ``sigma_max``). This makes a diffusers pipeline
with ``gam=1, mu=0`` give exactly the images of ``DDIMScheduler``; pass ``latents`` to start from anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

SCHEDULES = ("log_linear", "ddpm", "ldm", "sigmoid", "cosine", "flow")
VE_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
FLOW_PREDICTION_TYPES = ("flow_prediction", "velocity", "sample", "epsilon")
FINAL_SIGMAS_TYPES = ("sigma_min", "zero")


@dataclass
class GradientEstimationSchedulerOutput(BaseOutput):
    """Output of :meth:`GradientEstimationScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next sigma; feed it to the next model call.
        pred_original_sample (`torch.Tensor`): the x0 estimate of this model call.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _sigmas_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return (1 / torch.cumprod(1.0 - betas, dim=0) - 1).sqrt()


def training_sigmas(
    schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    sigma_min: float = 0.02,
    sigma_max: float = 10.0,
    t_min: float = 0.001,
    t_max: float = 1.0,
) -> torch.Tensor:
    """The ascending table of ``num_train_timesteps`` noise levels of ``schedule`` (times ``t`` for ``"flow"``).

    The beta schedules are computed in float32 exactly as diffusers computes ``alphas_cumprod`` (``"ldm"`` is
    diffusers' ``scaled_linear``, ``"cosine"`` its ``squaredcos_cap_v2``, ``"sigmoid"`` the GeoDiff schedule of
    ``DDPMScheduler``), so ``sqrt(1 / alphas_cumprod - 1)`` of the diffusers scheduler is identical. ``"cosine"``
    ignores ``beta_start`` / ``beta_end``.
    """
    n = num_train_timesteps
    if schedule == "log_linear":
        return torch.logspace(math.log10(sigma_min), math.log10(sigma_max), n)
    if schedule == "ddpm":
        return _sigmas_from_betas(torch.linspace(beta_start, beta_end, n))
    if schedule == "ldm":
        return _sigmas_from_betas(torch.linspace(beta_start**0.5, beta_end**0.5, n) ** 2)
    if schedule == "sigmoid":
        return _sigmas_from_betas(torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start)
    if schedule == "cosine":
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return _sigmas_from_betas(torch.tensor(betas, dtype=torch.float32))
    if schedule == "flow":
        return torch.linspace(t_min, t_max, n)
    raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")


def trailing_indices(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """smalldiffusion's trailing table indices of a sampling run: ``num_inference_steps`` + 1 of them, ending in 0."""
    fractions = 1 - np.arange(0, num_inference_steps) / num_inference_steps
    return list((num_train_timesteps * fractions).round().astype(np.int64) - 1) + [0]


class GradientEstimationScheduler(SchedulerMixin, ConfigMixin):
    """smalldiffusion's gradient-estimation (gam, mu) sampler; see the module docstring for the conventions.

    Args:
        num_train_timesteps (`int`, defaults to 1000): size of the training table of sigmas.
        schedule (`str`, defaults to ``"ddpm"``): one of ``"log_linear"``, ``"ddpm"``, ``"ldm"``, ``"sigmoid"``,
            ``"cosine"``, ``"flow"``.
        beta_start, beta_end (`float`): ends of the beta schedule (``"ddpm"``, ``"ldm"``, ``"sigmoid"``).
        sigma_min, sigma_max (`float`): ends of the ``"log_linear"`` table.
        t_min, t_max (`float`): ends of the ``"flow"`` times.
        gam (`float`, defaults to 1.0): weight of the current noise estimate; 1 is DDIM/DDPM, 2 the accelerated
            sampler (smalldiffusion's examples use 1.5 to 2.1).
        mu (`float`, defaults to 0.0): stochasticity in [0, 1); 0 is deterministic, 0.5 is DDPM.
        prediction_type (`str`, defaults to ``"epsilon"``): what the model returns. ``"epsilon"``, ``"sample"`` or
            ``"v_prediction"`` (diffusers' v of the variance-preserving input) for the sigma schedules;
            ``"flow_prediction"`` (noise - x0), ``"velocity"`` (x0 - noise), ``"sample"`` or ``"epsilon"`` for
            ``"flow"``.
        final_sigmas_type (`str`, defaults to ``"sigma_min"``): end the run at the table's smallest sigma
            (smalldiffusion) or at ``"zero"``. Flow runs always end at 0.
    """

    _compatibles = ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "ddpm",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        sigma_min: float = 0.02,
        sigma_max: float = 10.0,
        t_min: float = 0.001,
        t_max: float = 1.0,
        gam: float = 1.0,
        mu: float = 0.0,
        prediction_type: str = "epsilon",
        final_sigmas_type: str = "sigma_min",
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
        allowed = FLOW_PREDICTION_TYPES if schedule == "flow" else VE_PREDICTION_TYPES
        if prediction_type not in allowed:
            raise ValueError(f"`prediction_type` must be one of {allowed} for schedule {schedule!r}, got {prediction_type!r}.")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"`final_sigmas_type` must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}.")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be a positive integer, got {num_train_timesteps!r}.")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"`mu` must be in [0, 1), got {mu!r}.")
        if not (math.isfinite(gam) and gam > 0):
            raise ValueError(f"`gam` must be a finite number > 0, got {gam!r}.")
        if schedule == "flow" and not 0.0 < t_min < t_max <= 1.0:
            raise ValueError(f"`t_min` and `t_max` must satisfy 0 < t_min < t_max <= 1, got {t_min!r} and {t_max!r}.")
        if schedule == "log_linear" and not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"`sigma_min` and `sigma_max` must satisfy 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}.")

        self.is_flow = schedule == "flow"
        self.train_sigmas = training_sigmas(
            schedule, num_train_timesteps, beta_start, beta_end, sigma_min, sigma_max, t_min, t_max
        )
        self.alphas_cumprod = None if self.is_flow else 1.0 / (1.0 + self.train_sigmas.double() ** 2)
        self.num_inference_steps = None
        self._set_run(self.train_sigmas.flip(0), torch.arange(num_train_timesteps - 1, -1, -1))

    # ------------------------------------------------------------------ state

    def _set_run(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> None:
        # `_sigmas` keeps the schedule's own dtype (float64 for flow, as smalldiffusion) for the update arithmetic.
        self._sigmas = sigmas
        self.sigmas = sigmas.to(torch.float32)
        self.timesteps = timesteps
        sigma_max = float(sigmas[0])
        self.init_noise_sigma = 1.0 if self.is_flow else math.sqrt(1.0 + sigma_max**2)
        self._step_index = None
        self._begin_index = None
        self._previous_direction = None

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next :meth:`step` call (``None`` before the first)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index into ``timesteps``, set by a pipeline through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the next sampling loop at ``timesteps[begin_index]``."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"`begin_index` must be an integer >= 0, got {begin_index!r}.")
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        matches = (self.timesteps == torch.as_tensor(timestep).to(self.timesteps)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"`timestep` {timestep!r} is not one of the scheduler's timesteps {self.timesteps.tolist()}.")
        return int(matches[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """Picks the ``num_inference_steps`` + 1 sigmas of a run (trailing spacing) and their timesteps."""
        n = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= n:
            raise ValueError(f"`num_inference_steps` must be an integer in [1, {n}], got {num_inference_steps!r}.")
        if self.is_flow:
            times = torch.linspace(self.config.t_max, self.config.t_min, num_inference_steps, dtype=torch.float64)
            sigmas = torch.cat([times, times.new_zeros(1)])
            timesteps = (sigmas[:-1] * n).to(torch.float32)
        else:
            indices = trailing_indices(n, num_inference_steps)
            sigmas = self.train_sigmas[indices]
            if self.config.final_sigmas_type == "zero":
                sigmas[-1] = 0.0
            timesteps = torch.tensor(indices[:-1], dtype=torch.int64)
        self.num_inference_steps = num_inference_steps
        self._set_run(sigmas, timesteps.to(device))

    # ------------------------------------------------------------------ model interface

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model's input: ``x_sigma / sqrt(1 + sigma^2)`` (variance-preserving) for sigma schedules, ``sample`` for flow."""
        if self.is_flow:
            return sample
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def _direction(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noise direction of the update: epsilon for sigma schedules, ``noise - x0`` for flow."""
        kind = self.config.prediction_type
        if self.is_flow:
            if kind == "flow_prediction":
                return model_output
            if kind == "velocity":
                return -model_output
            if kind == "sample":
                return (sample - model_output) / sigma
            return model_output - (sample - sigma * model_output) / (1 - sigma)
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - model_output) / sigma
        # v = sqrt(a) eps - sqrt(1 - a) x0 of the input x_vp = sample * sqrt(a): eps = sqrt(a) (v + sqrt(1 - a) x_vp).
        alpha = 1 / (1 + sigma**2)
        return alpha.sqrt() * model_output + (1 - alpha).sqrt() * alpha.sqrt() * sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> GradientEstimationSchedulerOutput | tuple:
        """One (gam, mu) update from ``sigmas[step_index]`` to the next sigma.

        The noise of ``mu > 0`` is drawn with ``generator``; without one it comes from the global torch generator on
        the CPU, smalldiffusion's ``rand_input``, so the same seed gives smalldiffusion's samples.
        """
        if self.num_inference_steps is None:
            raise ValueError("`set_timesteps` must be called before `step`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"`step` was called more than the {len(self.timesteps)} times of this run.")
        i = self._step_index
        sigma, sigma_next = self._sigmas[i].to(sample.device), self._sigmas[i + 1].to(sample.device)
        direction = self._direction(model_output.float(), sample.float(), sigma.to(torch.float32))
        if self._previous_direction is None:
            averaged = direction
        else:
            gam = self.config.gam
            averaged = direction * gam + self._previous_direction * (1 - gam)
        mu = self.config.mu
        sigma_p = (sigma_next / sigma**mu) ** (1 / (1 - mu))
        prev_sample = sample.float() - (sigma - sigma_p) * averaged
        if mu > 0:
            eta = (sigma_next**2 - sigma_p**2).sqrt()
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev_sample = prev_sample + eta * noise
        pred_original_sample = sample.float() - sigma * direction
        self._previous_direction = direction
        self._step_index += 1
        prev_sample, pred_original_sample = prev_sample.to(sample.dtype), pred_original_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return GradientEstimationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The training sample at table index ``timesteps`` (``x0 + sigma * noise``; flow: ``(1 - t) x0 + t noise``)."""
        sigma = self.train_sigmas.to(original_samples.device)[timesteps.long()].to(original_samples.dtype)
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        if self.is_flow:
            return (1 - sigma) * original_samples + sigma * noise
        return original_samples + sigma * noise

    def __len__(self):
        return self.config.num_train_timesteps
