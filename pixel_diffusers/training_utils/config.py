"""Command-line arguments shared by the training scripts, YAML configs, the accelerator and run outputs."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from .optim import LR_SCHEDULERS, OPTIMIZERS, build_lr_scheduler

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_common_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments every training script takes: run, optimisation, checkpoints, EMA, LoRA, logging and the Hub."""
    run = parser.add_argument_group("run")
    run.add_argument("--config", type=str, default=None, help="YAML file of argument values; the command line wins.")
    run.add_argument("--output_dir", type=str, required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="no")
    run.add_argument("--train_batch_size", type=int, default=16, help="Per process.")
    run.add_argument("--gradient_accumulation_steps", type=int, default=1)
    run.add_argument("--max_train_steps", type=int, default=1000, help="Optimiser steps.")
    run.add_argument("--gradient_checkpointing", action="store_true")
    run.add_argument("--dataloader_num_workers", type=int, default=0)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--adam_weight_decay", type=float, default=0.01)
    optim.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--lr_cycle_steps", type=int, default=None, help="stepped_cosine_restart: steps per cycle.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--zclip_threshold", type=float, default=2.5, help="z-score above which a norm is clipped.")
    optim.add_argument("--spike_rollback_every", type=int, default=100, help="Snapshot interval; 0 disables rollback.")
    optim.add_argument("--spike_factor", type=float, default=5.0)
    optim.add_argument("--use_ema", action="store_true")
    optim.add_argument("--ema_decay", type=float, default=0.999)
    optim.add_argument("--lora_rank", type=int, default=0, help="> 0 trains a LoRA of this rank instead of all weights.")
    optim.add_argument("--lora_alpha", type=float, default=None, help="Defaults to the rank.")

    outputs = parser.add_argument_group("checkpoints and outputs")
    outputs.add_argument("--checkpointing_steps", type=int, default=500)
    outputs.add_argument("--checkpoints_total_limit", type=int, default=None)
    outputs.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    outputs.add_argument("--validation_steps", type=int, default=0, help="Sample grid interval; 0 = only at the end.")
    outputs.add_argument("--validation_prompts", type=str, nargs="*", default=None)
    outputs.add_argument(
        "--save_precision", choices=tuple(SAVE_DTYPES), default="fp32",
        help="Precision of the final pipeline's weights (bf16 / fp16 halve its size); checkpoints stay full precision.",
    )
    outputs.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    outputs.add_argument("--push_to_hub", action="store_true")
    outputs.add_argument("--hub_model_id", type=str, default=None)
    outputs.add_argument("--hub_token", type=str, default=None)
    outputs.add_argument("--hub_private_repo", action="store_true")
    outputs.add_argument("--push_checkpoints_to_hub", action="store_true")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses `argv`; values in the `--config` YAML become defaults, so anything on the command line overrides them."""
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", default=None)
    known, _ = config_only.parse_known_args(argv)
    if known.config:
        with open(known.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"config={known.config!r} has unknown keys {unknown}; allowed keys: {sorted(valid)}.")
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        for group in parser._mutually_exclusive_groups:
            if any(action.dest in values for action in group._group_actions):
                group.required = False
    args = parser.parse_args(argv)
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")
    return args


def lr_scheduler_from_args(args: argparse.Namespace, optimizer, num_processes: int):
    """The run's learning-rate schedule (`--lr_scheduler`, `--lr_warmup_steps`, `--lr_cycle_steps`).

    Step counts are multiplied by `num_processes`: accelerate steps a prepared scheduler once per process.
    """
    return build_lr_scheduler(
        args.lr_scheduler, optimizer, args.lr_warmup_steps * num_processes, args.max_train_steps * num_processes,
        steps_per_cycle=(args.lr_cycle_steps or args.max_train_steps) * num_processes,
    )


def training_config_yaml(args: argparse.Namespace) -> str:
    """The run's arguments as YAML (the Hub token left out), for model cards and the output folder."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in ("hub_token", "config")}
    return yaml.safe_dump(values, sort_keys=False)


def make_accelerator(args: argparse.Namespace, project_name: str):
    """An `Accelerator` writing logs under `output_dir/logs`; also sets up logging and the trackers."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to == "none" else args.report_to
    # Without a GPU, accelerate only forms a process group (gloo) when told to run on CPU: `torchrun` with several
    # processes on a CPU machine then trains data-parallel instead of running independent copies.
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=several_processes and not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "training_config.yaml").write_text(training_config_yaml(args), encoding="utf-8")
    if report_to is not None:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        config.pop("hub_token", None)
        accelerator.init_trackers(project_name, config=config)
    return accelerator


def step_generator(seed: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """The generator of one training step on one process: noise and times depend only on (seed, step, rank)."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0]))


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tiles equally sized images row by row."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def log_sample_grid(accelerator, images: list[Image.Image], output_dir: str | Path, step: int, name: str) -> Path:
    """Saves a grid as `output_dir/samples/<name>.png` and logs it to TensorBoard when that tracker is active."""
    grid = image_grid(images)
    path = Path(output_dir) / "samples" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    return path


def push_checkpoint(args: argparse.Namespace, checkpoint: Path) -> None:
    """Uploads one checkpoint folder under `checkpoints/` of the run's Hub repo."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id, private=args.hub_private_repo or None, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id, folder_path=str(checkpoint), path_in_repo=f"checkpoints/{checkpoint.name}",
        commit_message=f"Upload {checkpoint.name}",
    )
