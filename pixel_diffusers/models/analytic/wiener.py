"""The Wiener filter: the optimal linear (Gaussian-posterior) denoiser of the training set's mean and covariance."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)

from .analytic_utils import AnalyticDenoiser, fit_gaussian


class WienerDenoiser(AnalyticDenoiser):
    """Posterior mean under the Gaussian prior ``N(mu, S)`` fitted to the training set (the MMSE affine denoiser).

    With ``S = U diag(lambda) U^T`` and ``y = x_t / sqrt(a) = x0 + sigma noise``::

        x0_hat = mu + U diag(a lambda / (1 - a + a lambda)) U^T (y - mu)

    ``fit`` streams the data twice (mean, then the unbiased covariance) and eigendecomposes ``S`` once.
    Upstream rebuilds the ``n x n`` filter ``U diag(.) V^T`` on every call, ``O(n^3)`` per step; here a step applies
    the factors to the batch, ``O(B n^2)``. On Gaussian data this equals the optimal denoiser as N grows.

    Args:
        sample_size (`int`), in_channels (`int`): image size and channels.
        num_samples (`int`): set by ``fit``.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        num_samples: int = 0,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        super().__init__()
        self._init_schedule()
        self._init_statistics()

    def _init_statistics(self) -> None:
        n = self.dim
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("eigenvalues", torch.zeros(n))
        self.register_buffer("eigenvectors", torch.zeros(n, n))

    def _fit(self, batches) -> None:
        mean, eigenvalues, eigenvectors, count = fit_gaussian(batches)
        self.register_to_config(num_samples=count)
        self.mean.copy_(mean)
        self.eigenvalues.copy_(eigenvalues)
        self.eigenvectors.copy_(eigenvectors)

    def shrinkage(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """Per-component gain ``a lambda / (1 - a + a lambda)`` (= ``lambda / (lambda + sigma^2)``)."""
        scaled = alpha_bar * self.eigenvalues
        return scaled / (1 - alpha_bar + scaled)

    def predict_x0(self, sample: torch.Tensor, alpha_bar: torch.Tensor, generator=None) -> torch.Tensor:
        residual = sample / alpha_bar.sqrt() - self.mean
        coefficients = (residual @ self.eigenvectors) * self.shrinkage(alpha_bar)
        return self.mean + coefficients @ self.eigenvectors.T

    def filter_matrix(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The ``n x n`` Wiener filter ``W_t = U diag(shrink) U^T`` (``O(n^3)``; the denoising step does not need it)."""
        return (self.eigenvectors * self.shrinkage(alpha_bar)) @ self.eigenvectors.T
