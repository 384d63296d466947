"""smalldiffusion's ideal denoiser: the exact epsilon of the empirical training distribution."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)

from .small_utils import SmallDiffusionModel


class IdealDenoiser(SmallDiffusionModel):
    """``eps(x, sigma) = (x - sum_i w_i x0_i) / sigma`` with ``w = softmax_i(-||x - x0_i||^2 / (2 sigma^2))``.

    This is the optimal analytic denoiser (``pixel_diffusers.models.analytic.OptimalDenoiser``) under
    ``x_t = sqrt(a) x_sigma``, ``a = 1 / (1 + sigma^2)``. ``sigma`` may be a scalar or per sample ``[B, 1, ...]``.
    The training set is a buffer (``fit`` fills it), so the model saves and loads like any other.

    Args:
        input_dims (`tuple[int]`): shape of one sample. num_samples (`int`): set by ``fit``.
    """

    @register_to_config
    def __init__(self, input_dims: tuple[int, ...] = (2,), num_samples: int = 0, prediction_type: str = "epsilon", scaled: bool = False):
        super().__init__()
        if prediction_type != "epsilon" or scaled:
            raise ValueError("`IdealDenoiser` predicts epsilon of the unscaled input: use prediction_type='epsilon', scaled=False.")
        self.input_dims = tuple(input_dims)
        self.register_buffer("data", torch.zeros((num_samples,) + self.input_dims))

    @torch.no_grad()
    def fit(self, dataset):
        """Stacks ``dataset`` (a tensor, or items ``x`` / ``(x, label)``) into the buffer; returns ``self``."""
        items = dataset if isinstance(dataset, torch.Tensor) else torch.stack(
            [item[0] if isinstance(item, (tuple, list)) else item for item in (dataset[i] for i in range(len(dataset)))]
        )
        self.register_to_config(num_samples=len(items), input_dims=tuple(items.shape[1:]))
        self.input_dims = tuple(items.shape[1:])
        self.register_buffer("data", items.float().to(self.device))
        return self

    def _network(self, x, sigma, cond):
        flat, data = x.flatten(1), self.data.flatten(1)
        sigma = sigma.to(x).reshape(-1, 1)
        distances = flat.square().sum(1, keepdim=True) + data.square().sum(1) - 2 * flat @ data.T
        weights = torch.softmax(-distances / (2 * sigma**2), dim=1)
        return ((flat - weights @ data) / sigma).view(x.shape)
