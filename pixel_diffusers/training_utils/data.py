"""Training data: image/caption sources, aspect-ratio buckets, the buffered-shuffle bucket sampler and preprocessing.

Sources are map-style: `len(source)`, `source.size_of(i)` -> (height, width) read from the file header (None when
unreadable), `source[i]` -> dict with "image" (PIL) and "caption" (plus any extra columns). Three are provided: a
folder of images with same-stem `.txt` captions, any `datasets` dataset (every kind `sources.open_image_source`
recognises: Hub names, imagefolders, `save_to_disk` folders, parquet, webdataset shards), and the synthetic
`ShapesDataset`. A streaming `datasets` dataset goes through `StreamingBucketBatches`; pixel-SDXL's metadata JSON
through `metadata.MetadataBatches`.

Every random choice of an item (crop, flip, caption dropout) is drawn from a generator seeded by (seed, epoch, index),
so a resumed run sees exactly the batches an uninterrupted one would.

Images are read faithfully ([`to_rgb`]): EXIF orientation applied; 16-bit and 32-bit integer images scaled from
their 16-bit range and float images from [0, 1] (clipped) to 8 bits instead of being clipped to white or black;
transparency (RGBA, LA, PA, palette transparency) composited on white (`ALPHA_BACKGROUND`); palette, CMYK, LA, 1-bit
and other modes converted to RGB; the first frame of animated files. Images of more than `max_image_pixels` pixels
(default `MAX_IMAGE_PIXELS`) are skipped before they are decoded. Captions are read as UTF-8 (a BOM is dropped),
else UTF-16 when a UTF-16 BOM says so, else as cp1252 / latin-1 with a warning naming the file; a caption never costs
its image. Each file that is skipped is counted once and named, with the reason, in the `skipped_files` log (the
logger `pixel_diffusers.training_utils.data.skipped_files`) and in the dataset's `skipped_files` dict.
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

from .sources import IMAGE_EXTENSIONS, open_image_source, resolve_columns
skipped_files_log = logging.getLogger(f"{__name__}.skipped_files")

# Images above this many pixels are skipped unread (a 12000 x 12000 decompression bomb is 144M); 8192 x 8192 passes.
MAX_IMAGE_PIXELS = 8192 * 8192
ALPHA_BACKGROUND = (255, 255, 255)

logger = logging.getLogger(__name__)

# Aspect ratios (width / height) the buckets are built from; each ratio comes with its inverse.
_BUCKET_ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image` read faithfully (see the module docstring): EXIF orientation, the true range of
    16-bit / 32-bit integer and float images, alpha composited on `ALPHA_BACKGROUND`."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            if not np.isfinite(values).all():
                raise ValueError("the float image holds NaN or inf values")
            values = values.clip(0.0, 1.0) * 255.0  # float images are in [0, 1]
        else:
            if values.min() < 0 or values.max() > 65535:
                raise ValueError(f"the {image.mode} image has values outside the 16-bit range [0, 65535]")
            values = values * (255.0 / 65535.0)
        image = Image.fromarray(np.round(values).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_caption(path: Path) -> str:
    """The caption text of `path` (see the module docstring for the encodings tried)."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16").strip()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    logger.warning("Caption %s is not UTF-8; read it as cp1252 / latin-1.", path)
    return text.strip()


def _name_of(source, index: int) -> str:
    return source.name_of(index) if hasattr(source, "name_of") else f"item {index}"


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

    def name_of(self, index: int) -> str:
        return str(self.paths[index])

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        with Image.open(path) as image:
            image = to_rgb(image)
        caption_path = path.with_suffix(self.caption_extension)
        caption = read_caption(caption_path) if caption_path.exists() else ""
        return {"image": image, "caption": caption}


class HFImageCaptionSource:
    """A map-style `datasets.Dataset` seen as a source; images are decoded here so that corrupt ones can be skipped.

    Columns left None are found by `sources.resolve_columns` ("image" or the first `Image` column; "text", "caption",
    "txt" or "prompt")."""

    def __init__(self, dataset, image_column: str | None = None, caption_column: str | None = None,
                 name: str = "the dataset", class_column: str | None = None):
        from datasets import Image as ImageFeature

        image_column, caption_column, class_column = resolve_columns(
            dataset.column_names, dataset.features, image_column, caption_column, name, class_column
        )
        self.dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column = image_column
        self.caption_column = caption_column
        self.class_column = class_column

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

    def name_of(self, index: int) -> str:
        value = self.dataset[index][self.image_column]
        path = value.get("path") if isinstance(value, dict) else None
        return f"row {index}" + (f" ({path})" if path else "")

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[index]
        item = {k: v for k, v in row.items() if k not in (self.image_column, self.caption_column)}
        item["image"] = to_rgb(_open_encoded(row[self.image_column]))
        item["caption"] = str(row[self.caption_column] or "") if self.caption_column else ""
        if self.class_column:
            item["class_label"] = int(row[self.class_column])
        return item


def _open_encoded(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def load_image_caption_dataset(
    name_or_path: str,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
    streaming: bool = False,
    config_name: str | None = None,
    cache_dir: str | None = None,
    argument: str = "dataset_name",
    class_column: str | None = None,
):
    """Any source `sources.open_image_source` recognises (a Hub name, an imagefolder, a `save_to_disk` folder, parquet,
    webdataset shards, a caption folder), by name or path; `argument` names the flag in errors. With `class_column`
    items carry its integer `class_label` (a folder without metadata then labels images by subfolder: `label`).

    Returns a map-style source (`HFImageCaptionSource`, or `ImageCaptionFolder` for a caption folder) or, with
    `streaming=True`, the `datasets.IterableDataset` to give to `StreamingBucketBatches`.
    """
    dataset = open_image_source(
        name_or_path, split, streaming, config_name, cache_dir, argument, labelled_folders=class_column is not None
    )
    if streaming:
        return dataset
    if dataset is None:
        return ImageCaptionFolder(name_or_path)
    named = f"{argument}={name_or_path!r}"
    return HFImageCaptionSource(dataset, image_column, caption_column, name=named, class_column=class_column)


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


class EpochPosition:
    """The resumable state of a seeded batch order: (epoch, batches done in it), checked against the run's seed."""

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"The checkpoint's data order used seed {state['seed']}, this run uses seed {self.seed}.")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


class BucketBatchSampler(EpochPosition):
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

    Bucket assignment reads every item's size once at construction; unreadable items and items of more than
    `max_image_pixels` pixels are left out and counted in `num_unreadable`. An item that fails to decode later is
    returned as None and counted by `collate` the first time only (`SampledBatches` counts new names). Every skipped
    file is in `skipped_files` (name -> reason) and named once in the `skipped_files` log.
    """

    def __init__(
        self,
        source,
        buckets: AspectRatioBuckets,
        seed: int = 0,
        caption_dropout: float = 0.1,
        random_crop: bool = True,
        flip_p: float = 0.5,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}.")
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive int, got {max_image_pixels!r}.")
        self.source, self.buckets, self.seed = source, buckets, seed
        self.caption_dropout, self.random_crop, self.flip_p = caption_dropout, random_crop, flip_p
        self.skipped_files: dict[str, str] = {}
        self.bucket_ids: list[int | None] = []
        for index in range(len(source)):
            size = source.size_of(index)
            if size is None:
                self.skip(index, "unreadable (the image header cannot be read)")
            elif size[0] * size[1] > max_image_pixels:
                self.skip(index, f"{size[1]}x{size[0]} = {size[0] * size[1]} pixels, over max_image_pixels={max_image_pixels}")
                size = None
            self.bucket_ids.append(None if size is None else buckets.assign(*size))
        self.num_unreadable = self.bucket_ids.count(None)
        if self.num_unreadable:
            logger.warning("Skipping %d unreadable file(s) of %d.", self.num_unreadable, len(source))

    def skip(self, index: int, reason: str) -> str:
        """Records item `index` as skipped (logged by name the first time); returns its name."""
        name = _name_of(self.source, index)
        if name not in self.skipped_files:
            self.skipped_files[name] = reason
            skipped_files_log.warning("skipped_files: %s: %s", name, reason)
        return name

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
            return {"skipped": self.skip(index, f"{type(error).__name__}: {error}")}
        if rng.random() < self.caption_dropout:
            item["caption"] = ""
        item["pixel_values"] = pixels
        return item


def collate(items: list[dict | None]) -> dict | None:
    """Stacks the readable items of a batch; `num_skipped` counts the others and `skipped_files` names them (when
    they are named). `pixel_values` is None when none was readable."""
    kept = [item for item in items if item is not None and "skipped" not in item]
    skipped = [item["skipped"] for item in items if item is not None and "skipped" in item]
    if not kept:
        return {"num_skipped": len(items), "pixel_values": None, "skipped_files": skipped}
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]),
        "num_skipped": len(items) - len(kept),
        "skipped_files": skipped,
    }
    batch["captions"] = [item["caption"] for item in kept]
    if "class_label" in kept[0]:
        batch["class_labels"] = torch.tensor([item["class_label"] for item in kept])
    return batch


class StreamingBucketBatches:
    """Batches from a streaming `datasets.IterableDataset`, sharded over processes, bucketed on the fly.

    Rows are shuffled through a buffer of `shuffle_buffer` (seeded), decoded, assigned to a bucket and held until their
    bucket has `batch_size` items. Undecodable rows are skipped and counted in the next batch's `num_skipped` (and in
    `num_skipped`). The state is the position in the stream and the positions of the rows still waiting in a bucket:
    a restored iterator reads the consumed rows again but decodes only the waiting ones, so the next batch is exact.
    A pass over the stream that gives no batch (an empty source, or too few readable rows) is an error naming `name`.
    """

    def __init__(
        self,
        dataset,
        buckets: AspectRatioBuckets,
        batch_size: int,
        image_column: str | None = None,
        caption_column: str | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle_buffer: int = 1000,
        caption_dropout: float = 0.1,
        random_crop: bool = True,
        flip_p: float = 0.5,
        name: str = "the streamed dataset",
        class_column: str | None = None,
    ):
        from datasets import Image as ImageFeature

        first = next(iter(dataset.take(1)), None) if dataset.features is None else None
        if dataset.features is None and first is None:
            raise ValueError(f"{name} is empty: the stream has no row.")
        columns = list(dataset.features) if dataset.features is not None else list(first)
        image_column, caption_column, class_column = resolve_columns(
            columns, dataset.features, image_column, caption_column, name, class_column
        )
        if dataset.features is not None and isinstance(dataset.features.get(image_column), ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset, self.num_replicas, self.rank, self.name = dataset, num_replicas, rank, name
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self.image_column, self.caption_column, self.class_column = image_column, caption_column, class_column
        self.shuffle_buffer, self.caption_dropout = shuffle_buffer, caption_dropout
        self.random_crop, self.flip_p = random_crop, flip_p
        self.epoch, self.batches_done, self.num_skipped = 0, 0, 0
        self.rows_done, self.waiting = 0, []  # position in this epoch's stream; rows held in unfilled buckets
        self.max_image_pixels = MAX_IMAGE_PIXELS
        self.skipped_files: dict[str, str] = {}

    def _item(self, row: dict, epoch: int, position: int) -> tuple[int, dict]:
        rng = np.random.default_rng((self.seed, epoch, position))
        image = _open_encoded(row[self.image_column])
        if image.width * image.height > self.max_image_pixels:
            raise ValueError(f"{image.width}x{image.height} pixels, over max_image_pixels={self.max_image_pixels}")
        image = to_rgb(image)
        bucket = self.buckets.assign(image.height, image.width)
        height, width = self.buckets.sizes[bucket]
        pixels = preprocess_image(image, height, width, self.random_crop, self.flip_p, rng)
        caption = str(row.get(self.caption_column) or "") if self.caption_column else ""
        item = {"pixel_values": pixels, "caption": "" if rng.random() < self.caption_dropout else caption}
        if self.class_column:
            item["class_label"] = int(row[self.class_column])
        return bucket, item | {"position": position}

    def _epoch_stream(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        # Shuffle first (the same order on every process), then split: the processes see disjoint rows.
        shuffled = self.dataset.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        stream = split_dataset_by_node(shuffled, rank=self.rank, world_size=self.num_replicas)
        resume_at, rewaiting = self.rows_done, set(self.waiting)
        pending: dict[int, list[dict]] = {}
        skipped = 0
        for position, row in enumerate(stream):
            replay = position < resume_at
            if replay and position not in rewaiting:
                continue  # consumed before the checkpoint: read again, not decoded
            if not replay:
                self.rows_done = position + 1
            try:
                bucket, item = self._item(row, epoch, position)
            except Exception as error:  # noqa: BLE001
                value = row.get(self.image_column)
                path = value.get("path") if isinstance(value, dict) else None
                name = f"{self.name}: " + (path or f"streamed row {position} of process {self.rank}")
                if name not in self.skipped_files:  # counted and named once, however often it is drawn
                    self.skipped_files[name] = f"{type(error).__name__}: {error}"
                    skipped += 1
                    self.num_skipped += 1
                    skipped_files_log.warning("skipped_files: %s: %s", name, self.skipped_files[name])
                continue
            pending.setdefault(bucket, []).append(item)
            if not replay and len(pending[bucket]) == self.batch_size:
                batch = collate(pending.pop(bucket))
                batch["num_skipped"], skipped = skipped, 0
                self.waiting = sorted(i["position"] for items in pending.values() for i in items)
                yield batch

    def __iter__(self):
        while True:
            for batch in self._epoch_stream(self.epoch):
                self.batches_done += 1
                yield batch
            if self.batches_done == 0:
                raise ValueError(
                    f"{self.name} gave no batch of {self.batch_size} images in a whole pass over its stream "
                    f"(process {self.rank} of {self.num_replicas}: {self.rows_done} rows, {self.num_skipped} unreadable)."
                )
            self.epoch += 1
            self.batches_done, self.rows_done, self.waiting = 0, 0, []

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "batches_done": self.batches_done, "rows_done": self.rows_done,
            "waiting": list(self.waiting), "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"The checkpoint's stream used seed {state['seed']}, this run uses seed {self.seed}.")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.rows_done, self.waiting = state["rows_done"], list(state["waiting"])


def add_image_data_args(parser) -> None:
    """Data arguments of the image training scripts (diffusers' names where the meaning is the same)."""
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--dataset_name", type=str, default=None,
                        help="A Hub dataset, or a local path of any kind: imagefolder, save_to_disk folder, parquet "
                             "file(s) or folder, webdataset .tar shards (folder or brace pattern), caption folder.")
    source.add_argument("--train_data_dir", type=str, default=None,
                        help="A local folder: an imagefolder with metadata.jsonl/.csv, images with same-stem .txt "
                             "captions, or any folder --dataset_name takes.")
    source.add_argument("--metadata_json", type=str, nargs="+", default=None,
                        help="pixel-SDXL metadata file(s): {image_path: {'tags': 't1, t2, ...', 'image_size': [W, H]}}.")
    source.add_argument("--shapes_dataset_size", type=int, default=None, help="Train on N synthetic shapes images.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--dataset_split", type=str, default="train")
    data.add_argument("--image_column", type=str, default=None,
                      help='Default: "image", else the first image-typed column (webdataset: jpg, png, ...).')
    data.add_argument("--caption_column", type=str, default=None,
                      help='Default: the first of "text", "caption", "txt", "prompt".')
    data.add_argument("--streaming", action="store_true", help="Stream the dataset instead of loading it.")
    data.add_argument("--shuffle_buffer", type=int, default=1000, help="Rows in the streaming shuffle buffer.")
    data.add_argument("--resolution", type=int, default=None,
                      help="One fixed square size (diffusers); without it, aspect-ratio buckets between "
                           "--min_resolution and --max_resolution.")
    data.add_argument("--min_resolution", type=int, default=None, help="Smallest bucket side (default 256).")
    data.add_argument("--max_resolution", type=int, default=None, help="Largest bucket side (default 512).")
    data.add_argument("--bucket_multiple", type=int, default=16, help="Bucket sides are multiples of this.")
    data.add_argument("--caption_dropout", type=float, default=0.1)
    data.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a random window.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--flip_probability", type=float, default=0.5, help="How often --random_flip flips.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                      help="Skip (and name) images of more pixels than this, before decoding them.")
    meta = parser.add_argument_group("metadata JSON (--metadata_json)")
    meta.add_argument("--bucket_area", type=int, default=1024 * 1024, help="Images larger than this are scaled down.")
    meta.add_argument("--min_bucket_area", type=int, default=768 * 768, help="Smaller (floored) images are skipped.")
    meta.add_argument("--bucket_step", type=int, default=32, help="Bucket sides are multiples of this.")
    meta.add_argument("--max_tag_dropout", type=float, default=0.5, help="Per-sample tag dropout ~ U(0, this).")
    meta.add_argument("--min_tags", type=int, default=15, help="Dropped tags are re-added up to this many.")


def resolve_image_args(args) -> None:
    """Fills `min_resolution`/`max_resolution` from `--resolution` (or their defaults) and checks the data flags."""
    if args.resolution is not None:
        if args.min_resolution is not None or args.max_resolution is not None:
            raise ValueError("--resolution is one fixed size; do not combine it with --min_resolution/--max_resolution.")
        args.min_resolution = args.max_resolution = args.resolution
    args.min_resolution = 256 if args.min_resolution is None else args.min_resolution
    args.max_resolution = max(512, args.min_resolution) if args.max_resolution is None else args.max_resolution
    if not 0.0 <= args.flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {args.flip_probability}.")
    if args.streaming and (args.metadata_json or args.shapes_dataset_size):
        raise ValueError("--streaming streams --dataset_name / --train_data_dir; the metadata JSON and the shapes set "
                         "are read map-style.")
    if args.streaming and args.dataloader_num_workers:
        raise ValueError("--dataloader_num_workers applies to map-style data; a stream is read in the main process.")


def build_image_batches(args, num_replicas: int = 1, rank: int = 0):
    """The batch stream of a run: an object that iterates batches forever and has `state_dict`/`load_state_dict`
    (and `len`, batches per epoch on this process, unless streaming). Also returns the `BucketedImageDataset` (None
    when streaming or for the metadata JSON), whose `num_unreadable` counts skipped files."""
    from .metadata import MetadataBatches
    from .shapes import ShapesDataset

    flip_p = args.flip_probability if args.random_flip else 0.0
    class_column = getattr(args, "class_column", None)  # class-conditional scripts (JiT) add --class_column
    if class_column is not None and not (args.dataset_name or args.train_data_dir):
        raise ValueError("--class_column reads a column of --dataset_name / --train_data_dir; the shapes set carries "
                         "its own classes and the metadata JSON has none.")
    if args.metadata_json:
        batches = MetadataBatches(
            args.metadata_json, args.train_batch_size, args.seed, args.caption_dropout, flip_p, args.bucket_area,
            args.min_bucket_area, args.bucket_step, args.max_tag_dropout, args.min_tags, num_replicas, rank,
        )
        return batches, None
    buckets = AspectRatioBuckets(args.min_resolution, args.max_resolution, args.bucket_multiple)
    argument, name = "shapes_dataset_size", args.shapes_dataset_size
    if args.shapes_dataset_size:
        source = ShapesDataset(args.shapes_dataset_size, size=args.min_resolution, seed=args.seed)
    elif args.dataset_name or args.train_data_dir:
        argument = "dataset_name" if args.dataset_name else "train_data_dir"
        name = getattr(args, argument)
        if argument == "train_data_dir" and not Path(name).is_dir():
            raise ValueError(f"train_data_dir={name!r} is not a directory.")
        source = load_image_caption_dataset(
            name, args.image_column, args.caption_column, args.dataset_split, args.streaming,
            args.dataset_config_name, args.cache_dir, argument, class_column,
        )
        if args.streaming:
            batches = StreamingBucketBatches(
                source, buckets, args.train_batch_size, args.image_column, args.caption_column, args.seed,
                num_replicas, rank, args.shuffle_buffer, args.caption_dropout, not args.center_crop, flip_p,
                name=f"{argument}={name!r}", class_column=class_column,
            )
            batches.max_image_pixels = getattr(args, "max_image_pixels", MAX_IMAGE_PIXELS)
            return batches, None
    else:
        raise ValueError(
            "Give one data source: --dataset_name, --train_data_dir, --metadata_json or --shapes_dataset_size."
        )
    dataset = BucketedImageDataset(
        source, buckets, args.seed, args.caption_dropout, not args.center_crop, flip_p,
        getattr(args, "max_image_pixels", MAX_IMAGE_PIXELS),
    )
    if dataset.num_unreadable == len(dataset):
        raise ValueError(f"{argument}={name!r}: none of its {len(dataset)} images is readable.")
    sampler = BucketBatchSampler(dataset.bucket_ids, args.train_batch_size, args.seed, num_replicas, rank)
    return SampledBatches(dataset, sampler, args.dataloader_num_workers), dataset


class SampledBatches:
    """Batches of a map-style `BucketedImageDataset` in `BucketBatchSampler` order; resumable through the sampler.

    With worker processes the sampler's state follows the batches handed out, not the ones prefetched.
    """

    def __init__(self, dataset: BucketedImageDataset, sampler: BucketBatchSampler, num_workers: int = 0):
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self._counted: set[str] = set()

    def __iter__(self):
        if self.num_workers == 0:
            for keys in self.sampler:
                yield self._count_once(collate([self.dataset[key] for key in keys]))
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=copy.deepcopy(self.sampler), num_workers=self.num_workers, collate_fn=collate
        )
        position = iter(self.sampler)
        for batch in loader:
            next(position)  # the sampler's state follows the batches handed out, not the ones prefetched
            yield self._count_once(batch)

    def _count_once(self, batch: dict) -> dict:
        """`num_skipped` counts the files skipped for the first time (a bad file is drawn again every epoch); the
        main process keeps the names (worker processes have their own copies of the dataset)."""
        new = [name for name in dict.fromkeys(batch.get("skipped_files", [])) if name not in self._counted]
        self._counted.update(new)
        for name in new:
            if name not in self.dataset.skipped_files:  # recorded in a worker process
                self.dataset.skipped_files[name] = "failed to decode"
                skipped_files_log.warning("skipped_files: %s: failed to decode", name)
        batch["num_skipped"] = len(new)
        return batch

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

