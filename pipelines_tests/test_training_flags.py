"""diffusers' flag names in the shared parser, flags a script does not use refused, trackers, the progress bar."""

import argparse
import importlib.util
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from pixel_diffusers.training_utils import (
    TrainingProgress,
    TrainingState,
    add_common_training_args,
    add_image_data_args,
    add_validation_args,
    build_image_batches,
    flow_loss_weights,
    make_accelerator,
    parse_args,
    resolve_training_length,
    sample_flow_sigmas,
)

from repo_scripts import load_script


def image_args(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    add_common_training_args(parser)
    add_validation_args(parser)
    add_image_data_args(parser)
    return parse_args(parser, ["--output_dir", str(tmp_path), *map(str, argv)])


def test_a_diffusers_command_line_parses_on_every_image_script(tmp_path):
    diffusers_flags = [
        "--output_dir", str(tmp_path), "--dataset_name", "user/data", "--image_column", "image",
        "--caption_column", "text", "--resolution", "64", "--center_crop", "--random_flip", "--train_batch_size", "2",
        "--num_train_epochs", "3", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-4", "--scale_lr",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "no", "--allow_tf32",
        "--logging_dir", "tb", "--report_to", "tensorboard", "--checkpointing_steps", "100", "--validation_epochs",
        "1", "--weighting_scheme", "logit_normal", "--logit_mean", "0.0", "--logit_std", "1.0", "--mode_scale", "1.29",
        "--seed", "1", "--dataloader_num_workers", "0", "--use_ema", "--max_grad_norm", "1.0",
    ]
    for name in ("train_pixelhdm", "train_pixel_sdxl", "train_jit"):
        args = parse_args(load_script(name).build_parser(), diffusers_flags)
        assert args.min_resolution == args.max_resolution == 64 and args.random_flip and args.max_train_steps is None
    prompts = ["--validation_prompts", "a red circle"]
    for name in ("train_pixelhdm", "train_pixel_sdxl"):
        assert parse_args(load_script(name).build_parser(), diffusers_flags + prompts).validation_prompts
    with pytest.raises(ValueError, match="--resolution"):
        image_args(tmp_path, "--resolution", 64, "--min_resolution", 32)


@pytest.mark.parametrize(
    "script, flag",
    [
        ("train_jit", ["--validation_prompts", "a"]),  # class-conditional: no prompts
        ("train_pixeldlm", ["--dataloader_num_workers", "2"]),
        ("train_pixeldlm", ["--validation_prompts", "a"]),
        ("train_pixeldlm", ["--resolution", "64"]),
        ("train_pixeldlm", ["--pretrained_model", "x"]),
        ("train_pixelhdm", ["--random_flip", "0.5"]),  # a switch now; the probability is --flip_probability
        ("train_pixelhdm", ["--time_sampling", "uniform"]),
        ("train_jit", ["--P_mean", "-0.8"]),
    ],
)
def test_a_flag_the_script_does_not_use_is_refused(tmp_path, script, flag, capsys):
    base = {"train_pixeldlm": ["--synthetic_addition"]}.get(script, ["--shapes_dataset_size", "4"])
    with pytest.raises(SystemExit):
        parse_args(load_script(script).build_parser(), ["--output_dir", str(tmp_path), *base, *flag])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_random_flip_is_a_switch_with_an_optional_probability(tmp_path):
    common = ("--shapes_dataset_size", 8, "--resolution", 32, "--train_batch_size", 4)
    assert build_image_batches(image_args(tmp_path, *common))[1].flip_p == 0.0
    assert build_image_batches(image_args(tmp_path, *common, "--random_flip"))[1].flip_p == 0.5
    flipped = image_args(tmp_path, *common, "--random_flip", "--flip_probability", 1.0)
    assert build_image_batches(flipped)[1].flip_p == 1.0
    with pytest.raises(ValueError, match="flip_probability"):
        image_args(tmp_path, *common, "--flip_probability", 2)


def test_epochs_give_the_run_length_and_the_validation_interval(tmp_path):
    args = image_args(tmp_path, "--shapes_dataset_size", 16, "--resolution", 32, "--train_batch_size", 4,
                      "--gradient_accumulation_steps", 3, "--num_train_epochs", 5, "--validation_epochs", 2)
    batches, _ = build_image_batches(args)
    resolve_training_length(args, batches)
    per_epoch = math.ceil(4 / 3)  # 16 images / batch 4 = 4 batches, 3 per optimiser step
    assert args.max_train_steps == 5 * per_epoch and args.validation_steps == 2 * per_epoch
    explicit = image_args(tmp_path, "--shapes_dataset_size", 16, "--resolution", 32, "--train_batch_size", 4,
                          "--max_train_steps", 10)
    resolve_training_length(explicit, build_image_batches(explicit)[0])
    assert explicit.max_train_steps == 10 and explicit.num_train_epochs == 3  # diffusers: the steps win
    with pytest.raises(ValueError, match="not both"):
        image_args(tmp_path, "--validation_steps", 2, "--validation_epochs", 1)
    stream = SimpleNamespace()  # no len: a stream
    with pytest.raises(ValueError, match="--max_train_steps"):
        resolve_training_length(image_args(tmp_path), stream)


def test_scale_lr_tf32_logging_dir_and_a_tracker_that_cannot_start(tmp_path):
    args = image_args(tmp_path, "--train_batch_size", 4, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-4,
                      "--scale_lr", "--allow_tf32", "--logging_dir", "tb", "--report_to", "tensorboard")
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        accelerator = make_accelerator(args, "flags")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    assert args.learning_rate == pytest.approx(8e-4)
    accelerator.log({"loss": 1.0}, step=1)
    accelerator.end_training()
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    absent = next(name for name in ("wandb", "aim", "mlflow", "dvclive", "swanlab", "clearml")
                  if importlib.util.find_spec(name) is None)
    with pytest.raises(ValueError, match=f"report_to='{absent}'.*cannot start"):
        make_accelerator(image_args(tmp_path / "other", "--report_to", absent), "flags")


def test_weighting_schemes_follow_diffusers():
    generator = torch.Generator().manual_seed(0)
    for scheme in ("logit_normal", "mode", "cosmap", "none", "sigma_sqrt"):
        sigmas = sample_flow_sigmas(512, generator, scheme, t_eps=0.0)
        assert 0 <= sigmas.min() and sigmas.max() <= 1
    # logit_mean is diffusers' mean of logit(1 - sigma): a negative mean draws noisier samples.
    noisy = sample_flow_sigmas(4096, torch.Generator().manual_seed(0), "logit_normal", -1.0, 1.0, t_eps=0.0)
    assert noisy.median() > 0.65
    sigmas = torch.tensor([0.25, 0.5, 1.0])
    torch.testing.assert_close(flow_loss_weights("sigma_sqrt", sigmas), sigmas**-2)
    torch.testing.assert_close(flow_loss_weights("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    torch.testing.assert_close(flow_loss_weights("logit_normal", sigmas), torch.ones(3))
    assert torch.isfinite(flow_loss_weights("sigma_sqrt", torch.zeros(1))).all()


def test_progress_bar_shows_steps_loss_lr_throughput_and_eta(capsys, caplog):
    main = SimpleNamespace(is_local_main_process=True)
    progress = TrainingProgress(main, total=4, state=TrainingState(step=0, images_seen=0))
    for step in range(1, 4):
        progress.update(step, step * 8, {"loss": 0.5 / step, "lr": 1e-4})
    progress.close(4)
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=0.1667" in err and "lr=0.0001" in err and "img_s=" in err and "<" in err  # ETA
    with caplog.at_level(logging.INFO):
        quiet = TrainingProgress(main, total=20, state=TrainingState(step=0, images_seen=0), disable=True)
        for step in range(1, 11):
            quiet.update(step, step * 8, {"loss": 0.5, "lr": 1e-4})
        quiet.close(10)
    assert capsys.readouterr().err == ""
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["step 1", "step 10"]
    other = TrainingProgress(SimpleNamespace(is_local_main_process=False), 4, TrainingState(step=0, images_seen=0))
    other.update(1, 8, {"loss": 0.5, "lr": 1e-4})
    other.close(4)
    assert capsys.readouterr().err == ""
