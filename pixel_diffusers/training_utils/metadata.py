"""pixel-SDXL's metadata dataset (upstream's format): `{image_path: {"tags": "t1, t2, ...", "image_size": [W, H]}}`
JSON files, upstream's bucketing and tag augmentation, in resumable batches carrying SDXL's size conditioning."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import EpochPosition, skipped_files_log, to_rgb

logger = logging.getLogger(__name__)


def bucket_for(width: int, height: int, area: int, step: int) -> tuple[int, int]:
    """Upstream's bucket (width, height): floored to `step` when the image fits in `area`; otherwise scaled by
    sqrt(area / (W H)) and rounded (floor or ceil per side) to the candidate closest in aspect ratio, falling back to
    the floored scaled size when that candidate is larger than the image."""

    def floor(v):
        return int(v) // step * step

    if width * height <= area:
        return floor(width), floor(height)
    k = math.sqrt(area / (width * height))
    w, h = width * k, height * k
    candidates = [(fw(w), fh(h)) for fw in (floor, lambda v: math.ceil(v / step) * step) for fh in (floor, lambda v: math.ceil(v / step) * step)]
    best = min(candidates, key=lambda c: abs(c[0] / c[1] - width / height))
    if best[0] > width or best[1] > height:
        return floor(w), floor(h)
    return best


def process_tags(tags: str, rng: random.Random, max_dropout: float, min_tags: int) -> str:
    """Upstream's tag augmentation: the last two tags (quality, rating) are always kept; each other tag is dropped
    with p ~ U(0, max_dropout) drawn per sample; dropped tags are re-added at random until `min_tags` others remain;
    then all tags, the kept two included, are shuffled and joined with ", "."""
    parts = [t.strip() for t in tags.split(",") if t.strip()]
    others, fixed = parts[:-2], parts[-2:]
    p = rng.uniform(0.0, max_dropout)
    dropping = [rng.random() < p for _ in others]
    kept = [t for t, drop in zip(others, dropping) if not drop]
    dropped = [t for t, drop in zip(others, dropping) if drop]
    rng.shuffle(dropped)
    while len(kept) < min_tags and dropped:
        kept.append(dropped.pop())
    result = kept + fixed
    rng.shuffle(result)
    return ", ".join(result)


class MetadataBatches(EpochPosition):
    """Batches of upstream's metadata dataset, resumable: each batch comes from one bucket; an epoch shuffles the
    items within buckets (a short last batch is filled with random items of the same bucket) and then the batch order,
    seeded by (seed, epoch); batch k goes to process k % num_replicas. Every item carries SDXL's conditioning:
    `original_size` (H, W) before resizing, `crop_top_left` after resizing, and the bucket as target size.
    A file that fails to load is skipped, counted once (in the batch's `num_skipped` the first time) and named in
    the `skipped_files` log."""

    def __init__(self, files, batch_size, seed, caption_dropout, flip_p, area, min_area, step, max_tag_dropout,
                 min_tags, num_replicas=1, rank=0):
        metadata = {}
        for file in files:
            try:
                metadata.update(json.loads(Path(file).read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
                raise ValueError(f"metadata_json={str(file)!r} is not a readable metadata JSON object: {error}") from error
        self.items, self.buckets = [], {}
        skipped = 0
        for path in sorted(metadata):
            width, height = metadata[path]["image_size"]
            if (width // step * step) * (height // step * step) < min_area:
                skipped += 1
                continue
            bucket = bucket_for(width, height, area, step)
            self.buckets.setdefault(bucket, []).append(len(self.items))
            self.items.append((path, metadata[path].get("tags", ""), bucket))
        if not self.items:
            raise ValueError(
                f"metadata_json={[str(f) for f in files]}: no image reaches min_bucket_area={min_area} "
                f"({skipped} too small)."
            )
        logger.info("Metadata dataset: %d images in %d buckets (%d too small).", len(self.items), len(self.buckets), skipped)
        self.batch_size, self.seed, self.caption_dropout, self.flip_p = batch_size, seed, caption_dropout, flip_p
        self.max_tag_dropout, self.min_tags = max_tag_dropout, min_tags
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.batches_done = 0, 0
        self.skipped_files: dict[str, str] = {}
        if len(self) == 0:
            raise ValueError(f"metadata_json: {len(self.items)} images make fewer batches than {num_replicas} processes.")

    def __len__(self) -> int:
        return len(self._epoch_batches(self.epoch))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed + epoch)
        batches = []
        for bucket in sorted(self.buckets):
            indices = list(self.buckets[bucket])
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                batch += [rng.choice(indices) for _ in range(self.batch_size - len(batch))]
                batches.append(batch)
        rng.shuffle(batches)
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def load_item(self, index: int, rng: random.Random) -> dict:
        path, tags, (bucket_w, bucket_h) = self.items[index]
        with Image.open(path) as image:
            image = to_rgb(image)
        original = (image.height, image.width)
        if image.size != (bucket_w, bucket_h):
            scale = max(bucket_w / image.width, bucket_h / image.height)
            image = image.resize((int(image.width * scale + 0.5), int(image.height * scale + 0.5)), Image.LANCZOS)
        if rng.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        top, left = rng.randint(0, image.height - bucket_h), rng.randint(0, image.width - bucket_w)
        array = np.asarray(image.crop((left, top, left + bucket_w, top + bucket_h)), dtype=np.float32)
        caption = "" if rng.random() < self.caption_dropout else process_tags(tags, rng, self.max_tag_dropout, self.min_tags)
        return {
            "pixel_values": torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0,
            "caption": caption,
            "time_ids": [*original, top, left, bucket_h, bucket_w],
        }

    def __iter__(self):
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.batches_done < len(batches):
                indices = batches[self.batches_done]
                rng = random.Random(f"{self.seed}-{self.epoch}-{self.batches_done}-{self.rank}")
                self.batches_done += 1
                items, new = [], 0
                for index in indices:
                    try:
                        items.append(self.load_item(index, rng))
                    except Exception as error:  # noqa: BLE001 - a corrupt file is skipped and counted once, never fatal
                        name = self.items[index][0]
                        if name not in self.skipped_files:
                            new += 1
                            self.skipped_files[name] = f"{type(error).__name__}: {error}"
                            skipped_files_log.warning("skipped_files: %s: %s", name, self.skipped_files[name])
                if not items:
                    yield {"pixel_values": None, "num_skipped": new}
                    continue
                yield {
                    "pixel_values": torch.stack([item["pixel_values"] for item in items]),
                    "captions": [item["caption"] for item in items],
                    "time_ids": torch.tensor([item["time_ids"] for item in items], dtype=torch.float32),
                    "num_skipped": new,
                }
            self.epoch += 1
            self.batches_done = 0
