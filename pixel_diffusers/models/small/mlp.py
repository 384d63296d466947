"""smalldiffusion's MLP denoisers for low-dimensional (2-D toy) data."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from torch import nn

from .small_utils import CondEmbedderLabel, SmallDiffusionModel, check_prediction_type, sigma_embeds


def _mlp(input_size: int, hidden_dims: tuple[int, ...], output_size: int) -> nn.Sequential:
    layers, size = [], input_size
    for hidden in hidden_dims:
        layers += [nn.Linear(size, hidden), nn.GELU()]
        size = hidden
    return nn.Sequential(*layers, nn.Linear(size, output_size))


class TimeInputMLP(SmallDiffusionModel):
    """An MLP over ``[x, sin(0.5 log sigma), cos(0.5 log sigma)]`` (hidden layers Linear + GELU).

    Args:
        dim (`int`, defaults to 2): data dimension. output_dim (`int`, *optional*): defaults to ``dim``.
        hidden_dims (`tuple[int]`, defaults to ``(16, 128, 256, 128, 16)``).
        prediction_type (`str`, defaults to ``"epsilon"``), scaled (`bool`): see :mod:`.small_utils`.
    """

    @register_to_config
    def __init__(self, dim: int = 2, output_dim: int | None = None, hidden_dims: tuple[int, ...] = (16, 128, 256, 128, 16),
                 prediction_type: str = "epsilon", scaled: bool = False):
        super().__init__()
        check_prediction_type(prediction_type)
        self.input_dims = (dim,)
        self.net = _mlp(dim + 2, tuple(hidden_dims), output_dim or dim)

    def _network(self, x, sigma, cond):
        return self.net(torch.cat([x, sigma_embeds(x.shape[0], sigma).to(x)], dim=1))


class ConditionalMLP(SmallDiffusionModel):
    """A class-conditional MLP over ``[x, sigma embedding, label embedding]``; labels are required.

    Args: those of :class:`TimeInputMLP`, plus ``cond_dim`` (4), ``num_classes`` (10) and ``dropout_prob`` (0.1),
    the label-dropout rate for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, dim: int = 2, output_dim: int | None = None, hidden_dims: tuple[int, ...] = (16, 128, 256, 128, 16),
                 cond_dim: int = 4, num_classes: int = 10, dropout_prob: float = 0.1,
                 prediction_type: str = "epsilon", scaled: bool = False):
        super().__init__()
        check_prediction_type(prediction_type)
        self.input_dims = (dim,)
        self.cond_embed = CondEmbedderLabel(cond_dim, num_classes, dropout_prob)
        self.net = _mlp(dim + 2 + cond_dim, tuple(hidden_dims), output_dim or dim)

    def _network(self, x, sigma, cond):
        return self.net(torch.cat([x, sigma_embeds(x.shape[0], sigma).to(x), self.cond_embed(cond)], dim=1))
