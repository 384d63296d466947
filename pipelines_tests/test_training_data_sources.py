"""Every data source the image training scripts take, map-style and streaming, through the shared flags."""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pixel_diffusers.training_utils import (
    StreamingBucketBatches,
    add_common_training_args,
    add_image_data_args,
    build_image_batches,
    classify_source,
    expand_braces,
    parse_args,
)

COUNT = 6


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    """`datasets` sleeps 5 s whenever a stream interleaving parquet shards ends (an Arrow workaround): not here."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)

CAPTIONS = {f"image {i}" for i in range(COUNT)}


def _png(i: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (size, size + 8 * (i % 2), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows() -> dict:
    return {"image": [{"bytes": _png(i), "path": None} for i in range(COUNT)], "text": [f"image {i}" for i in range(COUNT)]}


def _hf_dataset(image_column="image", caption_column="text"):
    import datasets

    rows = _rows()
    dataset = datasets.Dataset.from_dict({image_column: rows["image"], caption_column: rows["text"]})
    return dataset.cast_column(image_column, datasets.Image())


def write_source(kind: str, root):
    """Writes COUNT tiny captioned images as `kind`; returns the path (or pattern) to pass."""
    root.mkdir(parents=True)
    if kind in ("imagefolder_jsonl", "imagefolder_csv", "caption_folder"):
        for i in range(COUNT):
            (root / f"{i}.png").write_bytes(_png(i))
        if kind == "imagefolder_jsonl":
            lines = [json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) for i in range(COUNT)]
            (root / "metadata.jsonl").write_text("\n".join(lines))
        elif kind == "imagefolder_csv":
            (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,image {i}\n" for i in range(COUNT)))
        else:
            sub = root / "nested"
            sub.mkdir()
            for i in range(COUNT):
                (root / f"{i}.png").rename(sub / f"{i}.png") if i % 2 else None
                (sub if i % 2 else root).joinpath(f"{i}.txt").write_text(f"image {i}")
        return str(root)
    if kind == "save_to_disk":
        _hf_dataset().save_to_disk(str(root / "saved"))
        return str(root / "saved")
    if kind == "parquet_file":
        _hf_dataset().to_parquet(str(root / "train.parquet"))
        return str(root / "train.parquet")
    if kind == "parquet_folder":
        dataset = _hf_dataset()
        for shard in range(2):
            dataset.shard(2, shard, contiguous=True).to_parquet(str(root / f"part-{shard}.parquet"))
        return str(root)
    if kind in ("webdataset_folder", "webdataset_braces"):
        for shard in range(2):
            with tarfile.open(root / f"train-{shard:03d}.tar", "w") as tar:
                for i in range(shard * COUNT // 2, (shard + 1) * COUNT // 2):
                    for name, data in ((f"{i:04d}.png", _png(i)), (f"{i:04d}.txt", f"image {i}".encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return str(root) if kind == "webdataset_folder" else str(root / "train-{000..001}.tar")
    raise AssertionError(kind)


def make_args(tmp_path, *argv, resolution=True):
    parser = argparse.ArgumentParser()
    add_common_training_args(parser)
    add_image_data_args(parser)
    base = ["--output_dir", str(tmp_path / "out"), "--train_batch_size", "2", "--caption_dropout", "0",
            "--cache_dir", str(tmp_path / "cache"), "--shuffle_buffer", "4"] + (["--resolution", "32"] if resolution else [])
    return parse_args(parser, base + [str(a) for a in argv])


def epoch_captions(batches, count):
    iterator = iter(batches)
    captions = []
    for _ in range(count):
        batch = next(iterator)
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        captions += batch["captions"]
    return captions


SOURCES = ["imagefolder_jsonl", "imagefolder_csv", "caption_folder", "save_to_disk", "parquet_file",
           "parquet_folder", "webdataset_folder", "webdataset_braces"]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("kind", SOURCES)
def test_every_local_source_trains_in_both_modes(tmp_path, kind, streaming):
    path = write_source(kind, tmp_path / "data")
    flag = "--train_data_dir" if kind in ("imagefolder_jsonl", "caption_folder") else "--dataset_name"
    args = make_args(tmp_path, flag, path, *(["--streaming"] if streaming else []))
    batches, dataset = build_image_batches(args)
    assert (dataset is None) == streaming
    captions = epoch_captions(batches, COUNT // 2)  # one epoch: every image once
    assert sorted(captions) == sorted(CAPTIONS)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_hub_dataset_name_goes_to_load_dataset(tmp_path, monkeypatch, streaming):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, streaming=False, cache_dir=None):
        calls.append((path, name, split, streaming))
        dataset = _hf_dataset()
        return dataset.to_iterable_dataset() if streaming else dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = make_args(tmp_path, "--dataset_name", "user/captioned-images", "--dataset_config_name", "small",
                     *(["--streaming"] if streaming else []))
    batches, _ = build_image_batches(args)
    assert sorted(epoch_captions(batches, COUNT // 2)) == sorted(CAPTIONS)
    assert calls == [("user/captioned-images", "small", "train", streaming)]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_columns_are_configurable(tmp_path, streaming):
    (tmp_path / "data").mkdir()
    _hf_dataset("pixels", "prompt_text").to_parquet(str(tmp_path / "data" / "train.parquet"))
    mode = ["--streaming"] if streaming else []
    with pytest.raises(ValueError, match="Pass --caption_column"):  # the Image-typed column is found, no caption
        build_image_batches(make_args(tmp_path, "--dataset_name", tmp_path / "data", *mode))
    with pytest.raises(ValueError, match="image_column='photo'"):
        build_image_batches(make_args(tmp_path, "--dataset_name", tmp_path / "data", "--image_column", "photo",
                                      "--caption_column", "prompt_text", *mode))
    args = make_args(tmp_path, "--dataset_name", tmp_path / "data", "--image_column", "pixels",
                     "--caption_column", "prompt_text", *mode)
    batches, _ = build_image_batches(args)
    assert sorted(epoch_captions(batches, COUNT // 2)) == sorted(CAPTIONS)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("kind", ["parquet_folder", "caption_folder"])
def test_sources_are_sharded_across_processes(tmp_path, kind, streaming):
    path = write_source(kind, tmp_path / "data")
    args = make_args(tmp_path, "--dataset_name", path, "--train_batch_size", 1, *(["--streaming"] if streaming else []))
    per_rank = []
    for rank in range(2):
        batches, _ = build_image_batches(args, num_replicas=2, rank=rank)
        iterator = iter(batches)
        per_rank.append({next(iterator)["captions"][0] for _ in range(COUNT // 2)})
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == CAPTIONS


def test_pixel_sdxl_metadata_json_is_a_shared_source(tmp_path):
    (tmp_path / "images").mkdir()
    metadata = {}
    for i in range(4):
        path = tmp_path / "images" / f"{i}.png"
        Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(path)
        metadata[str(path)] = {"tags": f"tag{i}, best, general", "image_size": [64, 64]}
    (tmp_path / "meta.json").write_text(json.dumps(metadata))
    args = make_args(tmp_path, "--metadata_json", tmp_path / "meta.json", "--bucket_area", 4096,
                     "--min_bucket_area", 1024, "--bucket_step", 16, "--min_tags", 1)
    batches, _ = build_image_batches(args)
    batch = next(iter(batches))
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["time_ids"].shape == (2, 6)
    assert len(batches) == 2
    with pytest.raises(ValueError, match="map-style"):
        make_args(tmp_path, "--metadata_json", tmp_path / "meta.json", "--streaming")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        build_image_batches(make_args(tmp_path, "--metadata_json", tmp_path / "bad.json"))


def test_empty_or_unreadable_sources_are_errors_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_image_batches(make_args(tmp_path, "--train_data_dir", tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing"):
        build_image_batches(make_args(tmp_path, "--train_data_dir", tmp_path / "missing"))
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.png").write_text("not an image")
    with pytest.raises(ValueError, match="train_data_dir=.*unreadable.*none of its 1 images"):
        build_image_batches(make_args(tmp_path, "--train_data_dir", tmp_path / "unreadable"))
    (tmp_path / "zero").mkdir()
    _hf_dataset().select([]).to_parquet(str(tmp_path / "zero" / "train.parquet"))
    with pytest.raises(ValueError, match="dataset_name=.*zero"):
        build_image_batches(make_args(tmp_path, "--dataset_name", tmp_path / "zero"))
    # Streaming an empty source ends in an error, never a hang.
    batches, _ = build_image_batches(make_args(tmp_path, "--dataset_name", tmp_path / "zero", "--streaming"))
    with pytest.raises(ValueError, match="zero.*no batch"):
        next(iter(batches))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "train.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match="dataset_name=.*garbage.*parquet"):
        build_image_batches(make_args(tmp_path, "--dataset_name", tmp_path / "garbage"))
    with pytest.raises(ValueError, match="matches no file"):
        build_image_batches(make_args(tmp_path, "--dataset_name", str(tmp_path / "none-{0..3}.tar")))


def test_streaming_resume_skips_consumed_rows_without_decoding(tmp_path, monkeypatch):
    path = write_source("parquet_folder", tmp_path / "data")
    # Two buckets (32x32 and 32x40 images): rows wait in a bucket until it fills.
    args = make_args(tmp_path, "--dataset_name", path, "--streaming", "--min_resolution", 32, "--max_resolution", 40,
                     "--bucket_multiple", 8, resolution=False)
    batches, _ = build_image_batches(args)
    iterator = iter(batches)
    reference, state = [], None
    for _ in range(6):
        reference.append(next(iterator))
        if state is None and batches.state_dict()["waiting"]:
            state, done = batches.state_dict(), len(reference)
    assert state is not None and state["rows_done"] > 0
    decoded = []
    original = StreamingBucketBatches._item

    def counting_item(self, row, epoch, position):
        decoded.append((epoch, position))
        return original(self, row, epoch, position)

    monkeypatch.setattr(StreamingBucketBatches, "_item", counting_item)
    resumed, _ = build_image_batches(args)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for expected in reference[done:]:
        batch = next(again)
        assert batch["captions"] == expected["captions"]
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    replayed = [p for e, p in decoded if e == state["epoch"] and p < state["rows_done"]]
    assert sorted(replayed) == state["waiting"]  # only the rows still waiting in a bucket are decoded again


def test_source_classification_and_brace_patterns(tmp_path):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert classify_source("user/dataset") == ("hub", "user/dataset")
    path = write_source("webdataset_braces", tmp_path / "wds")
    kind, files = classify_source(path)
    assert kind == "webdataset" and len(files) == 2
    assert classify_source(str(tmp_path / "wds")) == ("webdataset", str(tmp_path / "wds"))


def test_a_parquet_folder_keeps_its_splits(tmp_path):
    (tmp_path / "data").mkdir()
    dataset = _hf_dataset()
    dataset.select(range(4)).to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    dataset.select(range(4, 6)).to_parquet(str(tmp_path / "data" / "test-00000.parquet"))
    args = make_args(tmp_path, "--dataset_name", tmp_path / "data", "--dataset_split", "test")
    batches, dataset = build_image_batches(args)
    assert len(dataset) == 2 and sorted(next(iter(batches))["captions"]) == ["image 4", "image 5"]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_class_labels_come_from_a_column_or_class_subfolders(tmp_path, streaming):
    for i in range(COUNT):
        folder = tmp_path / "data" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(_png(i))
    args = make_args(tmp_path, "--train_data_dir", tmp_path / "data", "--resolution", 32,
                     *(["--streaming"] if streaming else []), resolution=False)
    args.class_column = "label"  # what train_jit.py's --class_column sets
    batches, _ = build_image_batches(args)
    iterator = iter(batches)
    batches = [next(iterator) for _ in range(COUNT // 2)]
    labels = torch.cat([b["class_labels"] for b in batches]).tolist()
    assert sorted(labels) == [0, 0, 0, 1, 1, 1] and {c for b in batches for c in b["captions"]} == {""}
    args.class_column = "species"
    with pytest.raises(ValueError, match="class_column='species'"):
        build_image_batches(args)
