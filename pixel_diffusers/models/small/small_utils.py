"""smalldiffusion's model protocol as a diffusers ModelMixin: prediction targets, loss, epsilon and CFG.

Noise model ``x_sigma = x0 + sigma * noise`` (``alpha_bar = 1 / (1 + sigma^2)``); for ``prediction_type="flow"``
``sigma`` is the flow time t and ``x_t = (1 - t) x0 + t noise``. ``forward(x, sigma, cond)`` returns the network's
raw output; :meth:`predict_eps` converts it into the direction the gradient-estimation sampler steps along
(epsilon, or ``noise - x0`` for flow). The options replace upstream's class modifiers:

- ``scaled=True`` (upstream ``Scaled``): the network sees ``x / sqrt(1 + sigma^2)``;
- ``prediction_type``: ``"epsilon"`` (default), ``"x0"`` (``PredX0``), ``"v"`` (``PredV``:
  ``v = sqrt(a) noise - sqrt(1 - a) x0``) or ``"flow"`` (``PredFlow``: ``noise - x0``).
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ...loading import StrictModelMixin

PREDICTION_TYPES = ("epsilon", "x0", "v", "flow")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


def sigma_embeds(batch_size: int, sigma: torch.Tensor, scaling_factor: float = 0.5, log_scale: bool = True) -> torch.Tensor:
    """``[sin(f log sigma), cos(f log sigma)]`` per sample, ``[B, 2]``; a scalar sigma is shared by the batch."""
    sigma = torch.as_tensor(sigma).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch_size)
    value = torch.log(sigma) if log_scale else sigma
    value = value.float() * scaling_factor
    return torch.stack([torch.sin(value), torch.cos(value)], dim=1)


class SigmaEmbedderSinCos(nn.Module):
    """The sigma embedding of smalldiffusion's DiT and U-Net: sin/cos of ``0.5 log sigma``, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, scaling_factor: float = 0.5, log_scale: bool = True):
        super().__init__()
        self.scaling_factor, self.log_scale = scaling_factor, log_scale
        self.mlp = nn.Sequential(nn.Linear(2, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, batch_size: int, sigma: torch.Tensor) -> torch.Tensor:
        embeds = sigma_embeds(batch_size, sigma, self.scaling_factor, self.log_scale).to(self.mlp[0].weight)
        return self.mlp(embeds)


class TimestepEmbedder(nn.Module):
    """The flow-time embedding: a 256-dim cos/sin table of ``1000 t`` (period 1e4), then an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, inner_size: int = 1024):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, inner_size), nn.GELU(approximate="tanh"),
            nn.Linear(inner_size, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, batch_size: int, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).float()
        t = t.expand(batch_size) if t.numel() == 1 else t
        half = self.frequency_size // 2
        frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000 * t[:, None] * frequencies[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(self.mlp[0].weight))


class CondEmbedderLabel(nn.Module):
    """Class-label embedding with label dropout for classifier-free guidance.

    ``Embedding(num_classes + 1, h)`` -> SiLU -> Linear; index ``num_classes`` (``null_cond``) is the unconditional
    label. In training mode each label is replaced by ``null_cond`` with probability ``dropout_prob``.
    """

    def __init__(self, hidden_size: int, num_classes: int, dropout_prob: float = 0.1):
        super().__init__()
        if not 0 <= dropout_prob < 1:
            raise ValueError(f"`dropout_prob` must be in [0, 1), got {dropout_prob!r}.")
        self.embedding = nn.Embedding(num_classes + 1, hidden_size)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.null_cond, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.null_cond), labels)
        return self.mlp(self.embedding(labels))


def _broadcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


class SmallDiffusionModel(StrictModelMixin, ModelMixin, ConfigMixin):
    """Base of the small models; subclasses set ``input_dims`` and implement ``_network(x, sigma, cond)``.

    Conditional models set ``cond_embed`` (a :class:`CondEmbedderLabel`); ``predict_eps_cfg`` uses it.
    """

    input_dims: tuple[int, ...]

    @property
    def is_conditional(self) -> bool:
        return getattr(self, "cond_embed", None) is not None

    def rand_input(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((batch_size,) + tuple(self.input_dims), generator=generator)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output for ``x`` at noise level ``sigma`` (0-d, or ``[B, 1, ..., 1]``)."""
        if self.is_conditional and cond is None:
            raise ValueError(f"{type(self).__name__} is conditional: `cond` (class labels) is required.")
        if self.config.scaled:
            x = x * (1 / (1 + _broadcast(sigma, x) ** 2)).sqrt()
        return self._network(x, torch.as_tensor(sigma, device=x.device), cond)

    def predict_eps(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The sampler's direction: epsilon (``noise - x0`` for flow models)."""
        out = self(x, sigma, cond)
        kind, s = self.config.prediction_type, _broadcast(sigma, x)
        if kind in ("epsilon", "flow"):
            return out
        if kind == "x0":
            return (x - out) / s
        alpha = 1 / (1 + s**2)
        return alpha.sqrt() * (out + (1 - alpha).sqrt() * x)

    def predict_eps_cfg(self, x, sigma, cond=None, cfg_scale: float = 0.0) -> torch.Tensor:
        """Classifier-free guidance ``eps_c + w (eps_c - eps_u)`` (smalldiffusion's "1 + w" convention)."""
        if cond is None or cfg_scale == 0:
            return self.predict_eps(x, sigma, cond)
        if torch.as_tensor(sigma).numel() != 1:
            raise ValueError("classifier-free guidance needs one `sigma` for the whole batch.")
        uncond = torch.full_like(cond, self.cond_embed.null_cond)
        both = self.predict_eps(torch.cat([x, x]), sigma, torch.cat([cond, uncond]))
        conditional, unconditional = both.chunk(2)
        return conditional + cfg_scale * (conditional - unconditional)

    def get_loss(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor | None = None,
                 denoiser=None) -> torch.Tensor:
        """Mean squared error of the prediction target at ``x0 + sigma eps`` (flow: ``(1 - t) x0 + t eps``).

        ``denoiser`` runs the forward (in training: this model as wrapped by the distributed engine); default self.
        """
        denoiser = denoiser or self
        kind, s = self.config.prediction_type, _broadcast(sigma, x0)
        if kind == "flow":
            return nn.functional.mse_loss(denoiser(((1 - s) * x0 + s * eps), sigma, cond), eps - x0)
        out = denoiser(x0 + s * eps, sigma, cond)
        if kind == "epsilon":
            target = eps
        elif kind == "x0":
            target = x0
        else:
            alpha = 1 / (1 + s**2)
            target = alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
        return nn.functional.mse_loss(out, target)
