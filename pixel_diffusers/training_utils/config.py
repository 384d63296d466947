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
    """Arguments every training script takes (diffusers' names): run, optimisation, checkpoints, EMA, logging, the Hub.

    Scripts add what they use on top: `add_validation_args`, `add_lora_args`, `add_weighting_args`,
    `data.add_image_data_args`; a flag a script does not use is not accepted, nor is an abbreviation of one.
    """
    parser.allow_abbrev = False
    run = parser.add_argument_group("run")
    run.add_argument("--config", type=str, default=None, help="YAML file of argument values; the command line wins.")
    run.add_argument("--output_dir", type=str, required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mixed_precision", choices=MIXED_PRECISION, default=None,
                     help="Defaults to the accelerate config / `accelerate launch --mixed_precision` (else 'no').")
    run.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls and convolutions on Ampere+ GPUs.")
    run.add_argument("--train_batch_size", type=int, default=16, help="Per process.")
    run.add_argument("--gradient_accumulation_steps", type=int, default=1)
    run.add_argument("--max_train_steps", type=int, default=None,
                     help="Optimiser steps; when not given, --num_train_epochs passes over the data.")
    run.add_argument("--num_train_epochs", type=int, default=1, help="Used when --max_train_steps is not given.")
    run.add_argument("--gradient_checkpointing", action="store_true")
    run.add_argument("--disable_progress_bar", action="store_true", help="No tqdm bar; a log line every 10 steps.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate(s) by batch size x accumulation steps x processes (diffusers).")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--adam_weight_decay", type=float, default=0.01)
    optim.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--lr_cycle_steps", type=int, default=None, help="stepped_cosine_restart: steps per cycle.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--zclip_threshold", type=float, default=None,
                       help="z-score above which a norm is clipped; 0 disables. Default 2.5, off under DeepSpeed.")
    optim.add_argument("--spike_rollback_every", type=int, default=None,
                       help="Snapshot interval; 0 disables rollback. Default 100, off under DeepSpeed.")
    optim.add_argument("--spike_factor", type=float, default=5.0)
    optim.add_argument("--use_ema", action="store_true")
    optim.add_argument("--ema_decay", type=float, default=0.999)

    outputs = parser.add_argument_group("checkpoints and outputs")
    outputs.add_argument("--checkpointing_steps", type=int, default=500)
    outputs.add_argument("--checkpoints_total_limit", type=int, default=None)
    outputs.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    outputs.add_argument(
        "--save_precision", choices=tuple(SAVE_DTYPES), default="fp32",
        help="Precision of the final pipeline's weights (bf16 / fp16 halve its size); checkpoints stay full precision.",
    )
    outputs.add_argument("--report_to", type=str, default="tensorboard",
                         help='"tensorboard", "wandb", "comet_ml", ..., "all" or "none"; one that cannot start is an '
                              "error.")
    outputs.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to --output_dir.")
    outputs.add_argument("--push_to_hub", action="store_true")
    outputs.add_argument("--hub_model_id", type=str, default=None)
    outputs.add_argument("--hub_token", type=str, default=None)
    outputs.add_argument("--hub_private_repo", action="store_true")
    outputs.add_argument("--push_checkpoints_to_hub", action="store_true")
    return parser


def add_validation_args(parser: argparse.ArgumentParser, prompts: bool = True) -> None:
    """When validation runs: every `--validation_steps` or `--validation_epochs` (and at the end); `prompts` adds
    `--validation_prompts` for text-conditioned scripts."""
    group = parser.add_argument_group("validation")
    group.add_argument("--validation_steps", type=int, default=None, help="Validate every N steps.")
    group.add_argument("--validation_epochs", type=int, default=None, help="Validate every N epochs (diffusers).")
    if prompts:
        group.add_argument("--validation_prompts", type=str, nargs="*", default=None)


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_rank", type=int, default=0, help="> 0 trains a LoRA of this rank instead of all weights.")
    group.add_argument("--lora_alpha", type=float, default=None, help="Defaults to the rank.")


def add_weighting_args(parser: argparse.ArgumentParser, logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
    """diffusers' noise-level sampling and loss weighting flags (see `losses.sample_flow_sigmas`)."""
    from .losses import WEIGHTING_SCHEMES

    group = parser.add_argument_group("noise levels")
    group.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="logit_normal",
                       help="How noise levels are drawn (logit_normal, mode) and losses weighted (sigma_sqrt, cosmap).")
    group.add_argument("--logit_mean", type=float, default=logit_mean, help="Of logit(1 - sigma), as diffusers.")
    group.add_argument("--logit_std", type=float, default=logit_std)
    group.add_argument("--mode_scale", type=float, default=1.29, help='Scale of the "mode" scheme.')


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
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                 "checkpointing_steps", "validation_steps", "validation_epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if getattr(args, "validation_steps", None) and getattr(args, "validation_epochs", None):
        raise ValueError("Give --validation_steps or --validation_epochs, not both.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")
    if hasattr(args, "min_resolution"):  # the image scripts' data arguments
        from .data import resolve_image_args

        resolve_image_args(args)
    return args


def resolve_training_length(args: argparse.Namespace, batches) -> None:
    """diffusers' rule: `--max_train_steps` wins; without it the run is `--num_train_epochs` passes over the data, of
    ceil(batches per epoch / accumulation) steps each. `--validation_epochs` becomes `validation_steps`."""
    per_epoch = None
    if hasattr(batches, "__len__"):
        per_epoch = max(1, math.ceil(len(batches) / args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        if per_epoch is None:
            raise ValueError("A stream has no known length: give --max_train_steps instead of --num_train_epochs.")
        args.max_train_steps = args.num_train_epochs * per_epoch
    else:
        args.num_train_epochs = math.ceil(args.max_train_steps / per_epoch) if per_epoch else None
    if getattr(args, "validation_epochs", None):
        if per_epoch is None:
            raise ValueError("--validation_epochs needs a known epoch length; use --validation_steps with --streaming.")
        args.validation_steps = args.validation_epochs * per_epoch


def lr_scheduler_from_args(args: argparse.Namespace, optimizer, accelerator):
    """The run's learning-rate schedule (`--lr_scheduler`, `--lr_warmup_steps`, `--lr_cycle_steps`).

    Step counts are multiplied by the number of processes: accelerate steps a prepared scheduler once per process,
    except under DeepSpeed, whose engine steps it once per optimiser step.
    """
    from accelerate.utils import DistributedType

    num_processes = 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else accelerator.num_processes
    return build_lr_scheduler(
        args.lr_scheduler, optimizer, args.lr_warmup_steps * num_processes, args.max_train_steps * num_processes,
        steps_per_cycle=(args.lr_cycle_steps or args.max_train_steps) * num_processes,
    )


def training_config_yaml(args: argparse.Namespace) -> str:
    """The run's arguments as YAML (the Hub token left out), for model cards and the output folder."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in ("hub_token", "config")}
    return yaml.safe_dump(values, sort_keys=False)


def make_accelerator(args: argparse.Namespace, project_name: str):
    """An `Accelerator` for the engine the launch chose, logging under `output_dir/logging_dir`; also sets up logging,
    TF32 (`--allow_tf32`), the learning-rate scaling (`--scale_lr`, diffusers' rule, applied to every `*learning_rate`
    argument), the trackers and the engine-dependent defaults of `--zclip_threshold` / `--spike_rollback_every`.

    The engine comes from the accelerate config or launch flags. A launch whose engine or process count the run
    would not get is an error (see `engines.check_launch` and `Engine.check_requested`), and so is a requested
    tracker that cannot start (not installed, failing to initialise).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .engines import Engine, check_launch, configure_deepspeed, launched_world_size, requested_engine

    check_launch()
    requested, launched = requested_engine(), launched_world_size()
    report_to = None if args.report_to == "none" else [name.strip() for name in args.report_to.split(",")]
    # Without a GPU, accelerate only forms a process group (gloo) when told to run on CPU: `torchrun` with several
    # processes on a CPU machine then trains data-parallel instead of running independent copies.
    accelerator = Accelerator(
        cpu=launched > 1 and requested is None and not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)
        ),
    )
    engine = Engine.of(accelerator)
    engine.check_requested(requested, launched)
    if engine.is_deepspeed:
        configure_deepspeed(accelerator, args)
    for flag, default in (("zclip_threshold", 2.5), ("spike_rollback_every", 100)):
        if getattr(args, flag, 0) is None:
            setattr(args, flag, 0 if engine.is_deepspeed else default)
    # Progress is logged by the main process only; the other processes report warnings and errors (prefixed by
    # their rank). `PIXEL_DIFFUSERS_LOG_ALL_PROCESSES=1` has every process log everything.
    every_process = os.environ.get("PIXEL_DIFFUSERS_LOG_ALL_PROCESSES", "") not in ("", "0")
    logging.basicConfig(
        format=("" if accelerator.is_main_process else f"[rank {accelerator.process_index}] ")
        + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process or every_process else logging.WARNING,
    )
    logger.info("%s: %s", project_name, engine.describe(accelerator, args.train_batch_size, args.gradient_accumulation_steps))
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.scale_lr:
        factor = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        for name, value in vars(args).items():
            if name.endswith("learning_rate") and value is not None:
                setattr(args, name, value * factor)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "training_config.yaml").write_text(training_config_yaml(args), encoding="utf-8")
    if report_to is not None:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        config.pop("hub_token", None)
        started = {getattr(tracker, "value", str(tracker)) for tracker in accelerator.log_with}
        missing = sorted(set(report_to) - started - {"all"})
        if missing:
            raise ValueError(
                f"report_to={args.report_to!r}: {missing} cannot start (is the package installed?); use "
                "--report_to none to train without a tracker."
            )
        try:
            accelerator.init_trackers(project_name, config=config)
        except Exception as error:  # noqa: BLE001 - a tracker that fails to start stops the run, naming it
            raise ValueError(f"report_to={args.report_to!r}: the tracker could not start: {error}") from error
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
