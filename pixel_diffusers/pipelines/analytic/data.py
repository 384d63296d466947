"""Training sets for the analytic denoisers: a local image folder or a `datasets` dataset, as tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class AnalyticImageDataset(torch.utils.data.Dataset):
    """Images resized to ``resolution`` (bilinear), in grayscale when ``channels=1``, as ``[C, R, R]`` in [-1, 1].

    ``source`` is a folder (searched recursively, files in sorted order, as the studio's image folders) or the name
    or path of a `datasets` dataset with an ``image_column``. ``subset_size`` keeps the first images. No flips.
    """

    def __init__(self, source: str, resolution: int, channels: int = 3, split: str = "train",
                 subset_size: int | None = None, image_column: str = "image"):
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels!r}.")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer, got {resolution!r}.")
        self.resolution, self.mode = resolution, "L" if channels == 1 else "RGB"
        if Path(source).is_dir() and not (Path(source) / "dataset_info.json").exists() and any(
            p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(source).rglob("*")
        ):
            self.items = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.column = None
        else:
            import datasets

            self.items = datasets.load_dataset(source, split=split)
            if image_column not in self.items.column_names:
                raise ValueError(f"`image_column` {image_column!r} is not a column of {source!r}: {self.items.column_names}.")
            self.column = image_column
        if subset_size is not None:
            if subset_size < 1:
                raise ValueError(f"`subset_size` must be a positive integer, got {subset_size!r}.")
            self.items = self.items[:subset_size] if self.column is None else self.items.select(range(min(subset_size, len(self.items))))
        if len(self.items) == 0:
            raise ValueError(f"no images found in {source!r}.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = Image.open(self.items[index]) if self.column is None else self.items[index][self.column]
        image = image.convert(self.mode).resize((self.resolution, self.resolution), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32).reshape(self.resolution, self.resolution, -1)
        return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)
