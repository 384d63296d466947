"""training/train_pixel_sdxl.py: upstream's data rules, the three stages on tiny models, exact resume."""

import json
import random
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from pixel_diffusers.models.unets.unet_pixel_sdxl import PIXEL_SDXL_PRESETS, PixelSDXLUNet2DConditionModel
from pixel_diffusers.training_utils import MetadataBatches, bucket_for, build_lpips, process_tags

from repo_scripts import load_script

train = load_script("train_pixel_sdxl")
TINY = PIXEL_SDXL_PRESETS["for_testing"]


def common(tmp_path, *extra):
    return [
        "--output_dir", str(tmp_path), "--preset", "for_testing", "--tiny_text_encoders", "--shapes_dataset_size", "16",
        "--min_resolution", "32", "--max_resolution", "32", "--train_batch_size", "4", "--report_to", "none",
        "--spike_rollback_every", "0", "--learning_rate", "1e-3", "--validation_num_inference_steps", "2", *extra,
    ]


def fresh_unet(**overrides):
    torch.manual_seed(0)  # what the script builds for --seed 0
    return PixelSDXLUNet2DConditionModel.from_preset("for_testing", **overrides)


def unet_weights(folder):
    return load_file(str(next((Path(folder) / "pipeline" / "unet").glob("*.safetensors"))))


def test_bucketing_follows_upstream():
    assert bucket_for(1000, 800, 1024 * 1024, 32) == (992, 800)  # fits: floored to 32
    width, height = bucket_for(3000, 2000, 1024 * 1024, 32)
    assert width % 32 == 0 and height % 32 == 0 and abs(width / height - 1.5) < 0.03
    assert width * height <= 1.1 * 1024 * 1024


def test_tag_rules():
    tags = ", ".join(f"tag{i}" for i in range(40)) + ", masterpiece, safe"
    for seed in range(20):
        out = process_tags(tags, random.Random(seed), 0.5, 15).split(", ")
        assert "masterpiece" in out and "safe" in out  # the last two are never dropped
        assert len(out) >= 15 + 2 and len(set(out)) == len(out)
    short = process_tags("a, b, c, best, general", random.Random(0), 0.5, 15).split(", ")
    assert sorted(short) == ["a", "b", "best", "c", "general"]  # fewer than 15: every dropped tag comes back


def test_metadata_batches(tmp_path):
    metadata = {}
    for index, (w, h) in enumerate([(80, 64), (80, 64), (40, 40), (96, 160)]):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (w, h), (index * 60, 0, 0)).save(path)
        metadata[str(path)] = {"tags": "red, square, best, safe", "image_size": [w, h]}
    (tmp_path / "bad.png").write_bytes(b"not an image")
    metadata[str(tmp_path / "bad.png")] = {"tags": "x, y, z", "image_size": [64, 64]}
    (tmp_path / "meta.json").write_text(json.dumps(metadata))
    batches = MetadataBatches([tmp_path / "meta.json"], 2, 0, 0.0, 0.5, 64 * 64, 48 * 48, 16, 0.5, 15)
    assert sorted(batches.buckets) == [(48, 80), (64, 64), (80, 64)]  # 40x40 is too small; 96x160 scaled down
    stream = iter(batches)
    seen = [next(stream) for _ in range(3)]
    # The corrupt file is alone in its bucket (its batch is filled with copies of it): skipped and counted once.
    assert [b["num_skipped"] for b in seen if b["pixel_values"] is None] == [1]
    assert list(batches.skipped_files) == [str(tmp_path / "bad.png")]
    for batch in seen:
        if batch["pixel_values"] is None:
            continue
        _, _, height, width = batch["pixel_values"].shape
        for ids in batch["time_ids"].tolist():
            assert ids[4:] == [height, width] and 0 <= ids[2] and 0 <= ids[3]
        assert all(set(c.split(", ")) >= {"best", "safe"} for c in batch["captions"])
    resumed = MetadataBatches([tmp_path / "meta.json"], 2, 0, 0.0, 0.5, 64 * 64, 48 * 48, 16, 0.5, 15)
    last = max(i for i, b in enumerate(seen) if b["pixel_values"] is not None)
    resumed.load_state_dict({"epoch": 0, "batches_done": last, "seed": 0})
    again = next(iter(resumed))
    assert torch.equal(again["pixel_values"], seen[last]["pixel_values"]) and again["captions"] == seen[last]["captions"]


def test_train_resume_is_exact(tmp_path):
    full = train.main(common(tmp_path / "full", "--max_train_steps", "4", "--checkpointing_steps", "2", "--loss", "velocity"))
    assert full.step == 4
    train.main(common(tmp_path / "cut", "--max_train_steps", "2", "--checkpointing_steps", "2", "--loss", "velocity"))
    train.main(common(tmp_path / "cut", "--max_train_steps", "4", "--checkpointing_steps", "2", "--loss", "velocity",
                      "--resume_from_checkpoint", "latest"))
    a, b = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_body_trains_only_the_coders(tmp_path):
    train.main(common(tmp_path, "--max_train_steps", "2", "--body_learning_rate", "0", "--weighting_scheme", "none"))
    before = fresh_unet().state_dict()
    after = unet_weights(tmp_path)
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"patch_encoder", "patch_decoder"}


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=TINY["block_out_channels"],
        transformer_layers_per_block=TINY["transformer_layers_per_block"],
        attention_head_dim=TINY["num_attention_heads"],
        cross_attention_dim=TINY["cross_attention_dim"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=TINY["projection_class_embeddings_input_dim"],
        norm_num_groups=TINY["norm_num_groups"],
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.13025,
    ).save_pretrained(folder / "vae")
    return folder


@pytest.mark.parametrize(("stage", "coder", "patch_size"), [("distill_encoder", "patch_encoder", "16"),
                                                          ("distill_decoder", "patch_decoder", "32")])
def test_distillation_trains_one_coder(tmp_path, teacher_folder, stage, coder, patch_size):
    train.main(common(tmp_path, "--max_train_steps", "2", "--stage", stage, "--teacher_model_name_or_path",
                      str(teacher_folder), "--unet_config", json.dumps({"patch_size": int(patch_size)})))
    before = fresh_unet(patch_size=int(patch_size)).state_dict()
    after = unet_weights(tmp_path)
    assert {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])} == {coder}


def test_lpips_needs_local_weights():
    with pytest.raises(ValueError, match="lpips"):
        build_lpips(None, "cpu")
