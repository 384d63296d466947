"""Smoothed closed-form diffusion (sigma-CFDM), the Analytic Diffusion Studio variant."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from diffusers.utils.torch_utils import randn_tensor

from .optimal import OptimalDenoiser


class SmoothedCFDMDenoiser(OptimalDenoiser):
    """Monte-Carlo input smoothing of the optimal denoiser (Scarvelis, Borde & Solomon, arXiv 2310.12395).

    ``x0_hat(x_t) = mean_j OptimalDenoiser(x_t + s z_j)`` over ``num_noise`` draws ``z_j ~ N(0, I)`` taken from the
    sampling ``generator``; ``s = smoothing_std`` is fixed in ``x_t`` space. This is the studio's reading of
    sigma-CFDM (perturb the query), which smooths the closed-form score so that sampling generalises beyond the
    training images; the paper's estimator may differ. Costs ``num_noise`` times the optimal denoiser.

    Args: those of [`OptimalDenoiser`], plus ``num_noise`` (`int`, defaults to 10) and ``smoothing_std``
    (`float`, defaults to 0.1), the values of the studio's configs.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        temperature: float = 1.0,
        num_neighbors: int | None = None,
        chunk_size: int = 4096,
        num_samples: int = 0,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_noise: int = 10,
        smoothing_std: float = 0.1,
    ):
        super().__init__(sample_size, in_channels, temperature, num_neighbors, chunk_size, num_samples,
                         num_train_timesteps, beta_start, beta_end)
        if isinstance(num_noise, bool) or not isinstance(num_noise, int) or num_noise < 1:
            raise ValueError(f"`num_noise` must be a positive integer, got {num_noise!r}.")
        if not smoothing_std >= 0:
            raise ValueError(f"`smoothing_std` must be >= 0, got {smoothing_std!r}.")

    def predict_x0(self, sample: torch.Tensor, alpha_bar: torch.Tensor, generator=None) -> torch.Tensor:
        m = self.config.num_noise
        if isinstance(generator, (list, tuple)):  # one generator per sample draws that sample's m perturbations
            noise = randn_tensor((sample.shape[0], m) + tuple(sample.shape[1:]), generator=list(generator),
                                 device=sample.device, dtype=sample.dtype).transpose(0, 1)
        else:
            noise = randn_tensor((m,) + tuple(sample.shape), generator=generator, device=sample.device, dtype=sample.dtype)
        queries = (sample.unsqueeze(0) + self.config.smoothing_std * noise).flatten(0, 1)
        return super().predict_x0(queries, alpha_bar).view(m, *sample.shape).mean(0)
