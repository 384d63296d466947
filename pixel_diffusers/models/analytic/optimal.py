"""The optimal (posterior-mean) denoiser of the empirical training distribution."""

from __future__ import annotations

import importlib.util

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)

from .analytic_utils import AnalyticDenoiser, collect


class OptimalDenoiser(AnalyticDenoiser):
    """The exact MMSE denoiser of the training set: a softmax-weighted mean of the training images.

    ``x0_hat(x_t) = sum_i w_i x0_i`` with ``w = softmax_i(-||x_t - sqrt(a) x0_i||^2 / (2 (1 - a) T))``, ``a`` the
    ``alpha_bar`` of the step and ``T`` the ``temperature`` (1 is the exact posterior mean). In sigma form this is
    smalldiffusion's ideal denoiser.

    By default the softmax runs over the *whole* training set with an exact streaming log-sum-exp (a running
    maximum with rescaled numerator and denominator), chunk by chunk, so memory stays at ``B * chunk_size``.
    With ``num_neighbors=k`` it is truncated to the k nearest images, upstream's approximation: faiss does the search
    when it is installed (an exact ``IndexFlatL2``), torch otherwise. Top-k is near-exact at low noise and biased
    at high noise (the mean of the k nearest instead of the data mean).

    Args:
        sample_size (`int`), in_channels (`int`): image size and channels.
        temperature (`float`, defaults to 1.0): softmax temperature.
        num_neighbors (`int`, *optional*): top-k truncation (upstream's configs use 200); ``None`` is exact.
        chunk_size (`int`, defaults to 4096): training images per streamed chunk.
        num_samples (`int`): set by ``fit``.
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
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        if num_neighbors is not None and (isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1):
            raise ValueError(f"`num_neighbors` must be None or a positive integer, got {num_neighbors!r}.")
        self._init_schedule()
        self.register_buffer("data", torch.zeros(num_samples, in_channels * sample_size**2))
        self.register_buffer("squared_norms", torch.zeros(num_samples))
        self._faiss_index = None

    def _fit(self, batches) -> None:
        data = collect(batches)
        self._stored_data("data", len(data))
        self.data.copy_(data)
        self.register_buffer("squared_norms", data.square().sum(1))
        self._faiss_index = None

    def _scaled_squared_distances(self, sample, chunk, chunk_norms, alpha_bar):
        """``||x_t - sqrt(a) x0_i||^2`` for every sample and chunk image, via the expanded square."""
        cross = sample @ chunk.T
        return (sample.square().sum(1, keepdim=True) - 2 * alpha_bar.sqrt() * cross + alpha_bar * chunk_norms).clamp_min(0)

    def log_weights_scale(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The factor turning a squared distance into a logit: ``-1 / (2 (1 - a) T)``."""
        return -1.0 / (2 * (1 - alpha_bar) * self.config.temperature)

    def predict_x0(self, sample: torch.Tensor, alpha_bar: torch.Tensor, generator=None) -> torch.Tensor:
        if self.config.num_neighbors is not None:
            return self._predict_top_k(sample, alpha_bar, min(self.config.num_neighbors, self.config.num_samples))
        scale = self.log_weights_scale(alpha_bar)
        running_max = sample.new_full((len(sample), 1), -float("inf"))
        numerator = sample.new_zeros(sample.shape)
        denominator = sample.new_zeros((len(sample), 1))
        size = self.config.chunk_size
        for start in range(0, self.config.num_samples, size):
            chunk, norms = self.data[start : start + size], self.squared_norms[start : start + size]
            logits = scale * self._scaled_squared_distances(sample, chunk, norms, alpha_bar)
            new_max = torch.maximum(running_max, logits.amax(1, keepdim=True))
            rescale = torch.exp(running_max - new_max)
            weights = torch.exp(logits - new_max)
            numerator = numerator * rescale + weights @ chunk
            denominator = denominator * rescale + weights.sum(1, keepdim=True)
            running_max = new_max
        return numerator / denominator

    def _nearest(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances ``||query - x0_i||^2`` and indices of the k nearest training images."""
        if importlib.util.find_spec("faiss") is not None:
            import faiss

            if self._faiss_index is None:
                self._faiss_index = faiss.IndexFlatL2(self.dim)
                self._faiss_index.add(self.data.cpu().numpy())
            distances, indices = self._faiss_index.search(query.cpu().numpy(), k)
            return torch.from_numpy(distances).to(query.device), torch.from_numpy(indices).to(query.device)
        best_distances = best_indices = None
        size = self.config.chunk_size
        for start in range(0, self.config.num_samples, size):
            distances = self._scaled_squared_distances(query, self.data[start : start + size], self.squared_norms[start : start + size], query.new_ones(()))
            indices = torch.arange(start, start + distances.shape[1], device=query.device).expand_as(distances)
            if best_distances is not None:
                distances, indices = torch.cat([best_distances, distances], 1), torch.cat([best_indices, indices], 1)
            best_distances, order = distances.topk(min(k, distances.shape[1]), dim=1, largest=False)
            best_indices = indices.gather(1, order)
        return best_distances, best_indices

    def _predict_top_k(self, sample, alpha_bar, k):
        distances, indices = self._nearest(sample / alpha_bar.sqrt(), k)
        weights = torch.softmax(self.log_weights_scale(alpha_bar) * alpha_bar * distances, dim=1)
        return torch.bmm(weights.unsqueeze(1), self.data[indices]).squeeze(1)
