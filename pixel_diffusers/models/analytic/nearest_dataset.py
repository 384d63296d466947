"""The nearest-dataset baseline: the training image closest to the noisy input."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)

from .analytic_utils import AnalyticDenoiser, collect


class NearestDatasetDenoiser(AnalyticDenoiser):
    """Returns the training image ``x0_i`` nearest to the noisy sample.

    By default the distance is upstream's ``||x_t - x0_i||`` against the *unscaled* ``x_t``; ``scaled=True`` uses
    ``||x_t - sqrt(alpha_bar) x0_i||``, the posterior-mode rule of the empirical distribution. Ties go to the first
    image in dataset order. Cost per step: ``O(B * N * n)``; the training set is kept as a buffer.

    Args:
        sample_size (`int`): image height and width. in_channels (`int`): image channels.
        scaled (`bool`, defaults to False): see above.
        chunk_size (`int`, defaults to 4096): training images compared per matrix product.
        num_samples (`int`): set by ``fit``.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        scaled: bool = False,
        chunk_size: int = 4096,
        num_samples: int = 0,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        super().__init__()
        self._init_schedule()
        self.register_buffer("data", torch.zeros(num_samples, in_channels * sample_size**2))

    def _fit(self, batches) -> None:
        data = collect(batches)
        self._stored_data("data", len(data))
        self.data.copy_(data)

    def predict_x0(self, sample: torch.Tensor, alpha_bar: torch.Tensor, generator=None) -> torch.Tensor:
        scale = alpha_bar.sqrt() if self.config.scaled else sample.new_ones(())
        best_distance = sample.new_full((len(sample),), float("inf"))
        best_index = torch.zeros(len(sample), dtype=torch.long, device=sample.device)
        start = 0
        for chunk in self._data_chunks(self.data):
            distance, index = torch.cdist(sample, scale * chunk).min(dim=1)
            better = distance < best_distance
            best_distance = torch.where(better, distance, best_distance)
            best_index = torch.where(better, index + start, best_index)
            start += len(chunk)
        return self.data[best_index]
