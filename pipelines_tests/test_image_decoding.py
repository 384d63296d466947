"""Images and captions read faithfully, or skipped by name and counted once."""

import itertools
import logging

import numpy as np
import pytest
from PIL import Image

from pixel_diffusers.training_utils import (
    AspectRatioBuckets,
    BucketBatchSampler,
    BucketedImageDataset,
    ImageCaptionFolder,
    SampledBatches,
    read_caption,
    to_rgb,
)


def rgb(image):
    return np.asarray(to_rgb(image), dtype=np.float64)


def test_16_bit_png_keeps_its_range(tmp_path):
    values = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode.startswith("I")
        assert rgb(image).mean() == pytest.approx(127.5, abs=0.6)


def test_float_tiff_is_read_from_zero_to_one(tmp_path):
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "f.tiff")
    with Image.open(tmp_path / "f.tiff") as image:
        array = rgb(image)
    np.testing.assert_allclose(array[..., 0], np.round(ramp * 255), atol=0.5)
    with pytest.raises(ValueError, match="NaN"):
        to_rgb(Image.fromarray(np.full((2, 2), np.nan, dtype=np.float32)))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), "red")
    image.paste((0, 0, 255), (0, 0, 10, 10))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=100)
    with Image.open(tmp_path / "rotated.jpg") as opened:
        upright = to_rgb(opened)
    assert upright.size == (10, 20)
    top = np.asarray(upright)[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_alpha_is_composited_on_white_and_modes_convert():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert (rgb(transparent) == 255).all()
    half = rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert half.mean() == pytest.approx(127, abs=1.5)
    assert (rgb(Image.new("LA", (4, 4), (0, 0))) == 255).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(rgb(palette)[0, 0], [10, 20, 30])
    cmyk = rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))  # pure red ink
    np.testing.assert_array_equal(cmyk[0, 0], [255, 0, 0])
    assert to_rgb(Image.new("1", (4, 4), 1)).mode == "RGB"


def test_captions_are_decoded_with_a_fallback(tmp_path):
    (tmp_path / "utf8.txt").write_bytes("\ufeffcafé au lait".encode("utf-8"))
    (tmp_path / "cp1252.txt").write_bytes("café “quoted”".encode("cp1252"))
    (tmp_path / "utf16.txt").write_bytes("naïve".encode("utf-16"))
    assert read_caption(tmp_path / "utf8.txt") == "café au lait"
    assert read_caption(tmp_path / "cp1252.txt") == "café “quoted”"
    assert read_caption(tmp_path / "utf16.txt") == "naïve"


def write_folder(root):
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_bytes(f"a caption {i} – déjà".encode("cp1252"))  # not UTF-8
    Image.new("RGB", (64, 64), "blue").save(root / "huge.png")
    truncated = root / "truncated.png"
    Image.new("RGB", (32, 32), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])  # the header reads, the pixels do not
    (root / "text.png").write_text("not an image")
    return root


def test_bad_files_are_skipped_by_name_and_counted_once(tmp_path, caplog):
    folder = ImageCaptionFolder(write_folder(tmp_path / "data"))
    with caplog.at_level(logging.WARNING, logger="pixel_diffusers.training_utils.data.skipped_files"):
        dataset = BucketedImageDataset(folder, AspectRatioBuckets(32, 32, 16), caption_dropout=0.0,
                                       max_image_pixels=40 * 40)
        assert dataset.num_unreadable == 2  # the text file and the image over the pixel limit, unread
        batches = SampledBatches(dataset, BucketBatchSampler(dataset.bucket_ids, 1, seed=0))
        drawn = list(itertools.islice(batches, 5 * 3))  # three epochs of the five sampled files
    counted = dataset.num_unreadable + sum(batch["num_skipped"] for batch in drawn)
    assert counted == 3
    assert set(dataset.skipped_files) == {str(folder.root / name) for name in ("huge.png", "truncated.png", "text.png")}
    assert "over max_image_pixels=1600" in dataset.skipped_files[str(folder.root / "huge.png")]
    logged = [record.getMessage() for record in caplog.records if "skipped_files" in record.getMessage()]
    assert len(logged) == 3 and any("truncated.png" in message for message in logged)
    captions = {caption for batch in drawn if batch["pixel_values"] is not None for caption in batch["captions"]}
    assert captions == {f"a caption {i} – déjà" for i in range(4)}  # no valid image lost to its caption
