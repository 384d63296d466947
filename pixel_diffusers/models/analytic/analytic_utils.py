"""What every analytic (closed-form) denoiser shares: the noise schedule, data streaming and the fit contract.

An analytic denoiser is an x0-predictor ``forward(sample, timestep) -> x0_hat`` for the variance-preserving process
``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` with the Analytic Diffusion Studio's linear betas
(1e-4 .. 0.02 over 1000 steps). ``fit(dataset)`` streams the training set once or twice in batches and keeps what
the denoiser needs as buffers, so ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` carry a fitted model.
The fitted sizes (``num_samples``) are written to the config so that ``from_pretrained`` allocates the buffers.
Upstream's ``train(dataset)`` shadowed ``nn.Module.train(mode)``; here it is ``fit`` and ``train``/``eval`` keep
their torch meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

from ...loading import StrictModelMixin


def _to_tensor(item) -> torch.Tensor:
    """An image (tensor in [-1, 1], or PIL / uint8 array in [0, 255]) or a batch of them as a float tensor."""
    if isinstance(item, dict):
        item = item.get("image", item.get("pixel_values"))
    elif isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, torch.Tensor):
        return item.float()
    array = np.asarray(item)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def iterate_batches(dataset, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yields float batches ``[b, C, H, W]`` of ``dataset`` in order (no shuffling).

    ``dataset`` is a tensor ``[N, C, H, W]``, a map-style dataset whose items are an image tensor, an
    ``(image, label)`` pair or a dict with ``"image"``, or an iterable (a list, a ``DataLoader``) of such batches.
    """
    if isinstance(dataset, torch.Tensor):
        for start in range(0, len(dataset), batch_size):
            yield dataset[start : start + batch_size].float()
    elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not isinstance(dataset, (list, tuple)):
        for start in range(0, len(dataset), batch_size):
            yield torch.stack([_to_tensor(dataset[i]) for i in range(start, min(start + batch_size, len(dataset)))])
    elif isinstance(dataset, Iterable):
        for batch in dataset:
            batch = _to_tensor(batch)
            yield batch if batch.ndim == 4 else batch.unsqueeze(0)
    else:
        raise ValueError(f"`dataset` must be a tensor, a dataset or an iterable of batches, got {type(dataset).__name__}.")


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``alphas_cumprod`` of diffusers' linear beta schedule (float32, as ``DDIMScheduler`` computes it)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


class AnalyticDenoiser(StrictModelMixin, ModelMixin, ConfigMixin):
    """Base of the analytic denoisers: the schedule lookup and the ``fit`` / ``forward`` contract.

    Subclasses register their config (which must include ``sample_size``, ``in_channels``, ``num_train_timesteps``,
    ``beta_start``, ``beta_end``) and implement ``_fit(batches)`` and ``predict_x0(sample, alpha_bar, generator)``.
    """

    _supports_gradient_checkpointing = False

    def _init_schedule(self) -> None:
        config = self.config
        self._alpha_table = linear_alphas_cumprod(config.num_train_timesteps, config.beta_start, config.beta_end)
        self.register_buffer("alphas_cumprod", self._alpha_table.clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the fitted statistics are stored in (these models have buffers, no parameters)."""
        stored = [b for n, b in self._buffers.items() if n not in self._non_persistent_buffers_set and b is not None]
        return next((b.dtype for b in stored if b.is_floating_point()), torch.float32)

    @property
    def dim(self) -> int:
        """Number of values of one image, ``C * H * W``."""
        return self.config.in_channels * self.config.sample_size**2

    @property
    def is_fitted(self) -> bool:
        return self.config.num_samples > 0

    def _check_input(self, sample: torch.Tensor) -> None:
        shape = (self.config.in_channels, self.config.sample_size, self.config.sample_size)
        if sample.ndim != 4 or tuple(sample.shape[1:]) != shape:
            raise ValueError(f"`sample` must have shape [B, {shape[0]}, {shape[1]}, {shape[2]}], got {list(sample.shape)}.")
        if not self.is_fitted:
            raise ValueError(f"{type(self).__name__} is not fitted: call `fit(dataset)` first.")

    def alpha_bar(self, timestep) -> torch.Tensor:
        """``alpha_bar`` at the integer ``timestep`` (0 <= timestep < num_train_timesteps), in float32 (from a table
        that a cast of the model to half precision does not round: 1 - alpha_bar near t = 0 would become 0)."""
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"`timestep` must be in [0, {self.config.num_train_timesteps}), got {timestep!r}.")
        return self._alpha_table[t].to(self.alphas_cumprod.device)

    @torch.no_grad()
    def fit(self, dataset, batch_size: int = 256):
        """Precomputes what the denoiser needs from ``dataset`` (see :func:`iterate_batches`); returns ``self``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        shape = (self.config.in_channels, self.config.sample_size, self.config.sample_size)

        def batches():
            for batch in iterate_batches(dataset, batch_size):
                if tuple(batch.shape[1:]) != shape:
                    raise ValueError(f"`dataset` images must have shape {list(shape)}, got {list(batch.shape[1:])}.")
                yield batch.to(self.device, torch.float32).flatten(1)

        self._fit(batches)
        return self

    @torch.no_grad()
    def forward(self, sample: torch.Tensor, timestep, generator: torch.Generator | None = None) -> torch.Tensor:
        """The x0 estimate ``[B, C, H, W]`` of the noisy ``sample`` at the integer ``timestep``, in the dtype of `sample`.

        The closed forms are always evaluated in float32: statistics stored in half precision (a pipeline loaded with
        `torch_dtype=torch.float16` or cast with `.to(dtype)`) are upcast for the call, since in half precision the
        small `alpha_bar` of the noisy end overflows the formulas to NaN."""
        self._check_input(sample)
        stored = dict(self._buffers)
        self._buffers.update({k: v.float() for k, v in stored.items() if v is not None and v.is_floating_point()})
        try:
            x0 = self.predict_x0(sample.float().flatten(1), self.alpha_bar(timestep).to(sample.device), generator)
        finally:
            self._buffers.update(stored)
        return x0.view(sample.shape).to(sample.dtype)

    def _stored_data(self, name: str, num_samples: int) -> None:
        """(Re)allocates the training-set buffer ``name`` ``[num_samples, dim]`` and records the size in the config."""
        self.register_to_config(num_samples=num_samples)
        self.register_buffer(name, torch.zeros(num_samples, self.dim, device=self.device))

    def _data_chunks(self, data: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, data.shape[0], self.config.chunk_size):
            yield data[start : start + self.config.chunk_size]


def collect(batches) -> torch.Tensor:
    """Concatenates the flattened batches of one pass over the dataset."""
    data = torch.cat(list(batches()))
    if len(data) == 0:
        raise ValueError("`dataset` is empty.")
    return data


def fit_gaussian(batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Mean, eigenvalues (ascending, clamped at 0) and eigenvectors of the unbiased covariance, in two passes.

    The covariance is symmetric positive semi-definite, so ``eigh`` gives upstream's SVD factors at a lower cost.
    Accumulation is in float64.
    """
    total, count = None, 0
    for batch in batches():
        total = batch.double().sum(0) if total is None else total + batch.double().sum(0)
        count += len(batch)
    if count < 2:
        raise ValueError(f"`dataset` must hold at least 2 images, got {count}.")
    mean = total / count
    scatter = torch.zeros(len(mean), len(mean), dtype=torch.float64, device=mean.device)
    for batch in batches():
        centred = batch.double() - mean
        scatter += centred.T @ centred
    eigenvalues, eigenvectors = torch.linalg.eigh(scatter / (count - 1))
    return mean.float(), eigenvalues.clamp_min(0).float(), eigenvectors.float(), count
