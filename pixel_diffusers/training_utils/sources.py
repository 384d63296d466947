"""Where training images come from: every kind of source a user may hold, opened as a `datasets` dataset.

`open_image_source(name_or_path)` recognises, in this order:

- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (opened with `load_from_disk`);
- a `.parquet` file, a folder holding parquet files, or a glob / brace pattern of them (`parquet` builder);
- a `.tar` file, a folder of webdataset `.tar` shards, or a pattern such as `shards/train-{000..009}.tar`
  (`webdataset` builder: its columns are the members' extensions, e.g. `jpg` and `txt`);
- a folder of images with a `metadata.jsonl` / `metadata.csv` (`imagefolder`, as diffusers' `--train_data_dir`);
- a folder of images with same-stem `.txt` captions (our caption folder; a missing caption is "");
- anything else is a Hub dataset name (`load_dataset(name, config)`).

Unlike diffusers, which hands every local folder to `imagefolder`, a folder is opened with the builder its files need,
so saved datasets, parquet and webdataset folders train too. An empty or unreadable source raises a ValueError naming
it (the argument it came from included).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLUMNS = ("text", "caption", "txt", "prompt")  # tried in order when --caption_column is not given
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expands webdataset-style braces: `a-{000..002}.tar` -> three names (zero padding kept), `{x,y}` -> two."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def _pattern_files(pattern: str) -> list[str]:
    files = []
    for name in expand_braces(pattern):
        files += sorted(glob.glob(name)) if glob.has_magic(name) else [name] if Path(name).is_file() else []
    return files


def classify_source(name_or_path: str) -> tuple[str, object]:
    """(kind, what to open): kind is "saved", "parquet", "webdataset", "imagefolder", "caption_folder" or "hub";
    what to open is a folder, a list of files (a file or pattern) or the Hub name."""
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "saved", str(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        for kind, suffix in (("parquet", ".parquet"), ("webdataset", ".tar")):
            if any(p.suffix.lower() == suffix for p in files):
                return kind, str(path)  # a folder: `datasets` finds the splits from the file names
        if any(p.name in _METADATA_FILES for p in files):
            return "imagefolder", str(path)
        return "caption_folder", str(path)
    is_pattern = glob.has_magic(name_or_path) or "{" in name_or_path
    if path.is_file() or is_pattern:
        files = _pattern_files(name_or_path)
        suffixes = {Path(f).suffix.lower() for f in files}
        if suffixes == {".parquet"}:
            return "parquet", files
        if suffixes == {".tar"}:
            return "webdataset", files
        what = "matches no file" if not files else f"matches files with extensions {sorted(suffixes)}"
        raise ValueError(f"{name_or_path!r} {what}; a file source is one or more .parquet files or .tar shards.")
    return "hub", name_or_path


def caption_folder_rows(root: str | Path, caption_extension: str = ".txt") -> dict[str, list[str]]:
    """{"image": paths, "text": captions} of every image under `root` (recursively), captioned by its same-stem file."""
    from .data import read_caption  # data imports this module

    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    captions = []
    for path in paths:
        caption = path.with_suffix(caption_extension)
        captions.append(read_caption(caption) if caption.exists() else "")
    return {"image": [str(p) for p in paths], "text": captions}


def open_image_source(
    name_or_path: str,
    split: str = "train",
    streaming: bool = False,
    config_name: str | None = None,
    cache_dir: str | None = None,
    argument: str = "dataset_name",
    labelled_folders: bool = False,
):
    """The source as a `datasets.Dataset` (map-style) or `IterableDataset` (`streaming=True`), or, for a caption
    folder read map-style, None (the caller reads it with `ImageCaptionFolder`). `argument` names the flag in errors.
    With `labelled_folders` a folder of images without metadata is an `imagefolder` (class `label`s from subfolders)."""
    import datasets

    named = f"{argument}={name_or_path!r}"
    kind, target = classify_source(name_or_path)
    if kind == "caption_folder" and labelled_folders:
        kind = "imagefolder"
    try:
        if kind == "saved":
            dataset = datasets.load_from_disk(target)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"{named} has no split {split!r}; splits: {sorted(dataset)} (--dataset_split).")
                dataset = dataset[split]
            if streaming:
                dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64)))
        elif kind == "caption_folder":
            if not streaming:
                return None
            rows = caption_folder_rows(target)
            if not rows["image"]:
                raise ValueError(f"{named} holds no image with extension in {IMAGE_EXTENSIONS}.")
            dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image(decode=False))
            dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64)))
        elif kind in ("parquet", "webdataset", "imagefolder"):
            files = {"data_files": {split: target}} if isinstance(target, list) else {"data_dir": target}
            dataset = datasets.load_dataset(kind, **files, split=split, streaming=streaming, cache_dir=cache_dir)
        else:
            dataset = datasets.load_dataset(
                target, config_name, split=split, streaming=streaming, cache_dir=cache_dir
            )
    except ValueError as error:
        if named in str(error):
            raise
        raise ValueError(f"{named} could not be opened as a {kind} dataset: {error}") from error
    except Exception as error:  # noqa: BLE001 - any failure of `datasets` becomes an error that names the source
        raise ValueError(f"{named} could not be opened as a {kind} dataset: {type(error).__name__}: {error}") from error
    if not streaming and len(dataset) == 0:
        raise ValueError(f"{named} is empty (split {split!r} has no rows).")
    return dataset


def resolve_columns(columns, features, image_column: str | None, caption_column: str | None, named: str,
                    class_column: str | None = None):
    """(image column, caption column, class column). Unset, the image column is "image" or else the first column of
    `Image` type (webdataset's `jpg`, `png`, ...), and the caption column the first of `CAPTION_COLUMNS` present; with
    a `class_column` (class-conditional training) a missing caption column is None."""
    from datasets import Image as ImageFeature

    columns = list(columns)
    if image_column is None:
        typed = [c for c in columns if features is not None and isinstance(features.get(c), ImageFeature)]
        image_column = "image" if "image" in columns else typed[0] if typed else None
        if image_column is None:
            raise ValueError(f"{named} has no image column; columns: {columns}. Pass --image_column.")
    if caption_column is None:
        caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if caption_column is None and class_column is None:
            raise ValueError(f"{named} has none of the caption columns {CAPTION_COLUMNS}; columns: {columns}. "
                             "Pass --caption_column.")
    for flag, column in (("image_column", image_column), ("caption_column", caption_column),
                         ("class_column", class_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{flag}={column!r} is not a column of {named}; columns: {columns}.")
    return image_column, caption_column, class_column
