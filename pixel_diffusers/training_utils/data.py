"""Training data: image/caption sources, aspect-ratio buckets, the buffered-shuffle bucket sampler and preprocessing.

Sources are map-style: `len(source)`, `source.size_of(i)` -> (height, width) read from the file header (None when
unreadable), `source[i]` -> dict with "image" (PIL) and "caption" (plus any extra columns). Three are provided: a
folder of images with same-stem `.txt` captions, any `datasets` dataset (an `imagefolder` with `metadata.jsonl`
included), and the synthetic `ShapesDataset`. A streaming `datasets` dataset goes through `StreamingBucketBatches`.

Every random choice of an item (crop, flip, caption dropout) is drawn from a generator seeded by (seed, epoch, index),
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Aspect ratios (width / height) the buckets are built from; each ratio comes with its inverse.
_BUCKET_ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5)


class ImageCaptionFolder:
    """Every image under `root` (recursively), captioned by the `.txt` file of the same stem ("" when missing)."""

    def __init__(self, root: str | Path, caption_extension: str = ".txt"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"train_data_dir={str(root)!r} is not a directory.")
        self.caption_extension = caption_extension
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise ValueError(f"train_data_dir={str(root)!r} holds no image with extension in {IMAGE_EXTENSIONS}.")

    def __len__(self) -> int:
        return len(self.paths)

    def size_of(self, index: int) -> tuple[int, int] | None:
        try:
            with Image.open(self.paths[index]) as image:
                width, height = image.size
            return height, width
        except Exception:  # noqa: BLE001 - any unreadable file is skipped and counted
            return None

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        caption_path = path.with_suffix(self.caption_extension)
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.exists() else ""
        return {"image": image, "caption": caption}


class HFImageCaptionSource:
    """A map-style `datasets.Dataset` seen as a source; images are decoded here so that corrupt ones can be skipped."""

    def __init__(self, dataset, image_column: str = "image", caption_column: str = "text"):
        from datasets import Image as ImageFeature

        for name, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in dataset.column_names:
                raise ValueError(f"{name}={column!r} is not a column of the dataset; columns: {dataset.column_names}.")
        self.dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column = image_column
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.dataset)

    def _open(self, index: int) -> Image.Image:
        return _open_encoded(self.dataset[index][self.image_column])

    def size_of(self, index: int) -> tuple[int, int] | None:
        try:
            width, height = self._open(index).size
            return height, width
        except Exception:  # noqa: BLE001
            return None

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[index]
        item = {k: v for k, v in row.items() if k not in (self.image_column, self.caption_column)}
        item["image"] = _open_encoded(row[self.image_column]).convert("RGB")
        item["caption"] = str(row[self.caption_column] or "")
        return item


def _open_encoded(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def load_image_caption_dataset(
    name_or_path: str,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    streaming: bool = False,
    config_name: str | None = None,
    cache_dir: str | None = None,
):
    """A `datasets` dataset by Hub name or local path; a local folder of images loads as `imagefolder`.

    Returns an `HFImageCaptionSource` (map-style) or, with `streaming=True`, the `datasets.IterableDataset` to give to
    `StreamingBucketBatches`.
    """
    from datasets import load_dataset

    path = Path(name_or_path)
    if path.is_dir() and not any(path.glob("*.py")) and not (path / "dataset_info.json").exists():
        dataset = load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming, cache_dir=cache_dir)
    else:
        dataset = load_dataset(name_or_path, config_name, split=split, streaming=streaming, cache_dir=cache_dir)
    if streaming:
        return dataset
    return HFImageCaptionSource(dataset, image_column=image_column, caption_column=caption_column)


class AspectRatioBuckets:
    """Bucket sizes (height, width), multiples of `multiple`, between `min_size` and `max_size` pixels per side.

    Square bases run from `min_size` to `max_size` in steps of 4x`multiple`. Each base gives, for every aspect ratio in
    {1, 4:3, 3:2, 16:9, 2:1} and their inverses, an equal-pixel bucket; bases of at least `max_size / 2` also give a
    bucket whose long edge is the base. 256..1024 (multiple 16) gives 123 buckets, 256..512 gives 27.
    Buckets are sorted by pixel count, then width.
    """

    def __init__(self, min_size: int = 256, max_size: int = 1024, multiple: int = 16, max_aspect: float = 2.0):
        if multiple < 1 or min_size < multiple or max_size < min_size:
            raise ValueError(
                f"Need 1 <= multiple <= min_size <= max_size; got multiple={multiple}, min_size={min_size}, "
                f"max_size={max_size}."
            )
        self.min_size, self.max_size, self.multiple = min_size, max_size, multiple
        bases = sorted(
            {r // multiple * multiple for r in range(min_size, max_size + 1, 4 * multiple)} | {max_size // multiple * multiple}
        )
        bases = [b for b in bases if b >= min_size]
        aspects = [a for a in _BUCKET_ASPECTS if 1 / max_aspect <= a <= max_aspect]
        sizes: set[tuple[int, int]] = {(b, b) for b in bases}

        def add(width: float, height: float, bounded_above: bool) -> None:
            width, height = int(width) // multiple * multiple, int(height) // multiple * multiple
            if width < min_size or height < min_size:
                return
            if bounded_above and (width > max_size or height > max_size):
                return
            if 1 / max_aspect - 1e-9 <= width / height <= max_aspect + 1e-9:
                sizes.add((height, width))

        for base in bases:
            for aspect in aspects:
                add(math.sqrt(base * base * aspect), math.sqrt(base * base / aspect), bounded_above=True)
        for edge in [b for b in bases if b >= max_size // 2] or bases[-3:]:
            for aspect in aspects:
                if aspect > 1:
                    add(edge, edge / aspect, bounded_above=False)
                elif aspect < 1:
                    add(edge * aspect, edge, bounded_above=False)
        self.sizes: list[tuple[int, int]] = sorted(sizes, key=lambda hw: (hw[0] * hw[1], hw[1]))

    def __len__(self) -> int:
        return len(self.sizes)

    def assign(self, height: int, width: int) -> int:
        """Index of the bucket for an image: never larger than the image in pixels, scored by
        0.7 |log aspect difference| + 0.3 (pixel deficit / image pixels). An image smaller than every bucket goes to
        the smallest-pixel bucket of the closest aspect."""
        if height <= 0 or width <= 0:
            raise ValueError(f"Image size must be positive, got height={height}, width={width}.")
        log_aspect = math.log(width / height)
        pixels = width * height
        best, best_score = None, math.inf
        for index, (bh, bw) in enumerate(self.sizes):
            if bh * bw > pixels:
                continue
            score = 0.7 * abs(log_aspect - math.log(bw / bh)) + 0.3 * (pixels - bh * bw) / pixels
            if score < best_score:
                best, best_score = index, score
        if best is None:
            smallest = self.sizes[0][0] * self.sizes[0][1]
            candidates = [i for i, (bh, bw) in enumerate(self.sizes) if bh * bw == smallest]
            best = min(candidates, key=lambda i: abs(log_aspect - math.log(self.sizes[i][1] / self.sizes[i][0])))
        return best


class BucketBatchSampler:
    """Buffered-shuffle batches, each from a single bucket, sharded over processes, resumable mid-epoch.

    Each epoch: items are shuffled within their bucket and cut into full batches (the remainder is dropped); buckets,
    sorted by pixel count, are grouped in chunks of `chunk_size`; the chunk order is shuffled and the batches within a
    chunk are shuffled together. Batch k of the epoch goes to process k % num_replicas (the tail that cannot be shared
    evenly is dropped). Yields lists of (index, epoch) pairs. `state_dict()` records the epoch and the batches
    consumed, so a restored sampler continues with exactly the next batch.
    """

    def __init__(
        self,
        bucket_ids: list[int | None],
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        chunk_size: int = 4,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_ids):
            if bucket is not None:
                self.by_bucket.setdefault(bucket, []).append(index)
        if not self.by_bucket:
            raise ValueError("The dataset has no readable item.")
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank, self.chunk_size = num_replicas, rank, chunk_size
        self.epoch = 0
        self.batches_done = 0
        if len(self) == 0:
            raise ValueError(
                f"batch_size={batch_size} x {num_replicas} processes leaves no full batch in any bucket; bucket sizes: "
                f"{ {b: len(v) for b, v in sorted(self.by_bucket.items())} }."
            )

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, epoch))
        buckets = sorted(self.by_bucket)
        chunks = [buckets[i : i + self.chunk_size] for i in range(0, len(buckets), self.chunk_size)]
        batches = []
        for chunk_index in rng.permutation(len(chunks)):
            chunk_batches = []
            for bucket in chunks[chunk_index]:
                items = [self.by_bucket[bucket][i] for i in rng.permutation(len(self.by_bucket[bucket]))]
                full = len(items) // self.batch_size * self.batch_size
                chunk_batches += [items[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
            batches += [chunk_batches[i] for i in rng.permutation(len(chunk_batches))]
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __len__(self) -> int:
        return len(self._epoch_batches(self.epoch))

    def __iter__(self):
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.batches_done < len(batches):
                batch = batches[self.batches_done]
                self.batches_done += 1
                yield [(index, self.epoch) for index in batch]
            self.epoch += 1
            self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"The checkpoint's sampler used seed {state['seed']}, this run uses seed {self.seed}.")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


def preprocess_image(
    image: Image.Image, height: int, width: int, random_crop: bool, flip_p: float, generator: np.random.Generator
) -> torch.Tensor:
    """Resize (Lanczos) to cover (height, width), crop (random or centre), flip with probability `flip_p`; CHW in [-1, 1]."""
    scale = max(height / image.height, width / image.width)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.LANCZOS)
    if random_crop:
        top = int(generator.integers(image.height - height + 1))
        left = int(generator.integers(image.width - width + 1))
    else:
        top, left = (image.height - height) // 2, (image.width - width) // 2
    array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32)
    if generator.random() < flip_p:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1) / 127.5 - 1.0


class BucketedImageDataset(torch.utils.data.Dataset):
    """Turns a source into training items for `BucketBatchSampler` batches: pixel_values at the bucket's size, the
    caption (replaced by "" with probability `caption_dropout`) and the source's extra fields.

    Bucket assignment reads every item's size once at construction; unreadable items are left out and counted in
    `num_unreadable`. An item that fails to decode later is returned as None and counted by `collate`.
    """

    def __init__(
        self,
        source,
        buckets: AspectRatioBuckets,
        seed: int = 0,
        caption_dropout: float = 0.1,
        random_crop: bool = True,
        flip_p: float = 0.5,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}.")
        self.source, self.buckets, self.seed = source, buckets, seed
        self.caption_dropout, self.random_crop, self.flip_p = caption_dropout, random_crop, flip_p
        self.bucket_ids: list[int | None] = []
        for index in range(len(source)):
            size = source.size_of(index)
            self.bucket_ids.append(None if size is None else buckets.assign(*size))
        self.num_unreadable = self.bucket_ids.count(None)
        if self.num_unreadable:
            logger.warning("Skipping %d unreadable file(s) of %d.", self.num_unreadable, len(source))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        index, epoch = key
        height, width = self.buckets.sizes[self.bucket_ids[index]]
        rng = np.random.default_rng((self.seed, epoch, index))
        try:
            item = dict(self.source[index])
            pixels = preprocess_image(item.pop("image"), height, width, self.random_crop, self.flip_p, rng)
        except Exception as error:  # noqa: BLE001 - a file that fails to decode is skipped, never fatal
            logger.warning("Skipping item %d: %s", index, error)
            return None
        if rng.random() < self.caption_dropout:
            item["caption"] = ""
        item["pixel_values"] = pixels
        return item


def collate(items: list[dict | None]) -> dict | None:
    """Stacks the readable items of a batch; `num_skipped` counts the others. None when none was readable."""
    kept = [item for item in items if item is not None]
    if not kept:
        return {"num_skipped": len(items), "pixel_values": None}
    batch = {"pixel_values": torch.stack([item["pixel_values"] for item in kept]), "num_skipped": len(items) - len(kept)}
    batch["captions"] = [item["caption"] for item in kept]
    if "class_label" in kept[0]:
        batch["class_labels"] = torch.tensor([item["class_label"] for item in kept])
    return batch


class StreamingBucketBatches:
    """Batches from a streaming `datasets.IterableDataset`, sharded over processes, bucketed on the fly.

    Rows are shuffled through a buffer of `shuffle_buffer` (seeded), decoded, assigned to a bucket and held until their
    bucket has `batch_size` items. Undecodable rows are skipped and counted in `num_skipped`. The state is the number
    of batches yielded: a restored iterator replays the stream and skips them, so the next batch is exact.
    """

    def __init__(
        self,
        dataset,
        buckets: AspectRatioBuckets,
        batch_size: int,
        image_column: str = "image",
        caption_column: str = "text",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle_buffer: int = 1000,
        caption_dropout: float = 0.1,
        random_crop: bool = True,
        flip_p: float = 0.5,
    ):
        from datasets import Image as ImageFeature

        if dataset.features is not None and image_column in dataset.features:
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self.image_column, self.caption_column = image_column, caption_column
        self.shuffle_buffer, self.caption_dropout = shuffle_buffer, caption_dropout
        self.random_crop, self.flip_p = random_crop, flip_p
        self.epoch, self.batches_done, self.num_skipped = 0, 0, 0

    def _epoch_stream(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        # Shuffle first (the same order on every process), then split: the processes see disjoint rows.
        shuffled = self.dataset.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        stream = split_dataset_by_node(shuffled, rank=self.rank, world_size=self.num_replicas)
        pending: dict[int, list[dict]] = {}
        for position, row in enumerate(stream):
            rng = np.random.default_rng((self.seed, epoch, position))
            try:
                image = _open_encoded(row[self.image_column]).convert("RGB")
                bucket = self.buckets.assign(image.height, image.width)
                height, width = self.buckets.sizes[bucket]
                pixels = preprocess_image(image, height, width, self.random_crop, self.flip_p, rng)
            except Exception as error:  # noqa: BLE001
                self.num_skipped += 1
                logger.warning("Skipping a streamed row: %s", error)
                continue
            caption = "" if rng.random() < self.caption_dropout else str(row.get(self.caption_column) or "")
            pending.setdefault(bucket, []).append({"pixel_values": pixels, "caption": caption})
            if len(pending[bucket]) == self.batch_size:
                yield collate(pending.pop(bucket))

    def __iter__(self):
        while True:
            for count, batch in enumerate(self._epoch_stream(self.epoch)):
                if count < self.batches_done:
                    continue
                self.batches_done += 1
                yield batch
            self.epoch += 1
            self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


def add_image_data_args(parser) -> None:
    """Data arguments of the image training scripts."""
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--train_data_dir", type=str, default=None, help="Folder of images with same-stem .txt captions.")
    source.add_argument("--dataset_name", type=str, default=None, help="A `datasets` name or path (imagefolder too).")
    source.add_argument("--shapes_dataset_size", type=int, default=None, help="Train on N synthetic shapes images.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--dataset_split", type=str, default="train")
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--caption_column", type=str, default="text")
    data.add_argument("--streaming", action="store_true", help="Stream the `datasets` dataset instead of downloading it.")
    data.add_argument("--shuffle_buffer", type=int, default=1000)
    data.add_argument("--min_resolution", type=int, default=256)
    data.add_argument("--max_resolution", type=int, default=512)
    data.add_argument("--bucket_multiple", type=int, default=16, help="Bucket sides are multiples of this.")
    data.add_argument("--caption_dropout", type=float, default=0.1)
    data.add_argument("--center_crop", action="store_true")
    data.add_argument("--random_flip", type=float, default=0.5, help="Horizontal flip probability.")
    data.add_argument("--cache_dir", type=str, default=None)


def build_image_batches(args, num_replicas: int = 1, rank: int = 0):
    """The batch stream of a run: an object that iterates batches forever and has `state_dict`/`load_state_dict`.

    Also returns the `BucketedImageDataset` (None when streaming), whose `num_unreadable` counts skipped files.
    """
    from .shapes import ShapesDataset

    buckets = AspectRatioBuckets(args.min_resolution, args.max_resolution, args.bucket_multiple)
    flip_p = args.random_flip
    if args.dataset_name and args.streaming:
        stream = load_image_caption_dataset(
            args.dataset_name, args.image_column, args.caption_column, args.dataset_split, True,
            args.dataset_config_name, args.cache_dir,
        )
        batches = StreamingBucketBatches(
            stream, buckets, args.train_batch_size, args.image_column, args.caption_column, args.seed, num_replicas,
            rank, args.shuffle_buffer, args.caption_dropout, not args.center_crop, flip_p,
        )
        return batches, None
    if args.train_data_dir:
        source = ImageCaptionFolder(args.train_data_dir)
    elif args.dataset_name:
        source = load_image_caption_dataset(
            args.dataset_name, args.image_column, args.caption_column, args.dataset_split, False,
            args.dataset_config_name, args.cache_dir,
        )
    elif args.shapes_dataset_size:
        source = ShapesDataset(args.shapes_dataset_size, size=args.min_resolution, seed=args.seed)
    else:
        raise ValueError("Give one data source: --train_data_dir, --dataset_name or --shapes_dataset_size.")
    dataset = BucketedImageDataset(source, buckets, args.seed, args.caption_dropout, not args.center_crop, flip_p)
    sampler = BucketBatchSampler(dataset.bucket_ids, args.train_batch_size, args.seed, num_replicas, rank)
    return SampledBatches(dataset, sampler, args.dataloader_num_workers), dataset


class SampledBatches:
    """Batches of a map-style `BucketedImageDataset` in `BucketBatchSampler` order; resumable through the sampler.

    With worker processes the sampler's state follows the batches handed out, not the ones prefetched.
    """

    def __init__(self, dataset: BucketedImageDataset, sampler: BucketBatchSampler, num_workers: int = 0):
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers

    def __iter__(self):
        if self.num_workers == 0:
            for keys in self.sampler:
                yield collate([self.dataset[key] for key in keys])
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=copy.deepcopy(self.sampler), num_workers=self.num_workers, collate_fn=collate
        )
        position = iter(self.sampler)
        for batch in loader:
            next(position)  # the sampler's state follows the batches handed out, not the ones prefetched
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

