"""The optimisation loop every training script runs, and how a run's final outputs are written and pushed."""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpointing import CheckpointManager, TrainingState
from . import shapes
from .config import SAVE_DTYPES, log_sample_grid, push_checkpoint, step_generator, training_config_yaml
from .optim import AdaptiveGradClip, LossSpikeGuard, run_with_oom_retry
from .progress import TrainingProgress

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """Everything a training loop holds, prepared by accelerate and restored from the checkpoint to resume."""

    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped when distributed)
    unwrapped: torch.nn.Module
    extra_modules: tuple
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None
    clipper: AdaptiveGradClip
    state: TrainingState
    checkpoints: CheckpointManager
    guard: LossSpikeGuard | None

    @classmethod
    def prepare(cls, accelerator, args, model, optimizer, lr_scheduler, batches, dataset=None, extra_modules=()):
        """Prepares `model` (and trained `extra_modules`, e.g. a loss's projector) with accelerate, creates the EMA of
        the model's trainable parameters (`args.use_ema`), the ZClip state and the loop counters, registers them and
        the batch stream for checkpointing, and resumes from `args.resume_from_checkpoint`."""
        ema = None
        if args.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel([p for p in model.parameters() if p.requires_grad], decay=args.ema_decay)
        prepared = accelerator.prepare(model, *extra_modules, optimizer, lr_scheduler)
        model, extra_modules, optimizer, lr_scheduler = prepared[0], tuple(prepared[1:-2]), prepared[-2], prepared[-1]
        unwrapped = accelerator.unwrap_model(model)
        clipper = AdaptiveGradClip(args.max_grad_norm, args.zclip_threshold)
        state = TrainingState(step=0, images_seen=0, skipped_files=0, skipped_batches=0)
        for stateful in (batches, clipper, state) + ((ema,) if ema is not None else ()):
            accelerator.register_for_checkpointing(stateful)
        checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit)
        checkpoints.resume(accelerator, args.resume_from_checkpoint)
        if ema is not None:
            ema.to(accelerator.device)
        guard = None
        if args.spike_rollback_every:
            guard = LossSpikeGuard(unwrapped, optimizer, ema, args.spike_rollback_every, args.spike_factor)
        if dataset is not None and dataset.num_unreadable:
            state.skipped_files = max(state.skipped_files, dataset.num_unreadable)
        return cls(model, unwrapped, extra_modules, optimizer, lr_scheduler, ema, clipper, state, checkpoints, guard)

    def train(self, accelerator, args, batches, micro_step, trainable, validate=None) -> None:
        """`train_loop` with this run's pieces."""
        train_loop(
            accelerator, args, self.model, self.optimizer, self.lr_scheduler, batches, micro_step, self.state,
            self.checkpoints, self.clipper, trainable, self.ema, self.guard, validate,
        )


def train_loop(
    accelerator,
    args,
    model,
    optimizer,
    lr_scheduler,
    batches,
    micro_step,
    state: TrainingState,
    checkpoints: CheckpointManager,
    clipper: AdaptiveGradClip,
    trainable: list[torch.nn.Parameter],
    ema=None,
    guard: LossSpikeGuard | None = None,
    validate=None,
) -> None:
    """Runs optimiser steps from `state.step` to `args.max_train_steps`.

    Each step accumulates `args.gradient_accumulation_steps` batches through `micro_step(batch, generator)`, which
    does the forward and `accelerator.backward` and returns its detached loss terms (a "loss" key included) plus
    "images". Batches with no readable image are skipped; an out-of-memory batch is retried halved; a loss spike rolls
    back. Then come the adaptive clip, the optimiser, scheduler and EMA steps, logging, checkpoints every
    `args.checkpointing_steps` (and at the end) and `validate(step)` on the main process every `args.validation_steps`.
    The random draws of a step depend only on (seed, step, process), so resumed runs are exact.
    """
    accumulation = args.gradient_accumulation_steps
    processes = accelerator.num_processes
    ema_params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    stream = iter(batches)
    logger.info("Training from step %d to %d on %d process(es).", state.step, args.max_train_steps, processes)
    progress = TrainingProgress(accelerator, args.max_train_steps, state, args.disable_progress_bar)
    while state.step < args.max_train_steps:
        if guard is not None:
            guard.maybe_snapshot(state.step)
        results = []
        for micro in range(accumulation):
            batch = next(stream)
            state.skipped_files += batch["num_skipped"]
            if batch["pixel_values"] is None:
                continue
            generator = step_generator(args.seed, state.step * accumulation + micro, accelerator.process_index)
            sync = accelerator.no_sync(model) if micro < accumulation - 1 else contextlib.nullcontext()
            with sync:
                result = run_with_oom_retry(lambda b: micro_step(b, generator), batch, optimizer)
            if result is not None:
                results.append(result)
        if not results:
            state.skipped_batches += 1
            state.step += 1
            continue
        loss = accelerator.reduce(torch.stack([r["loss"] for r in results]).mean().to(accelerator.device), "mean")
        if guard is not None and guard.is_spike(loss.item()):
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            continue
        grad_norm = clipper.clip(accelerator, trainable)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(ema_params)
        state.step += 1
        state.images_seen += sum(r["images"] for r in results) * processes
        logs = {name: torch.stack([r[name] for r in results]).mean().item() for name in results[0] if name != "images"}
        logs |= {"grad_norm": grad_norm, "lr": lr_scheduler.get_last_lr()[0], "skipped_files": state.skipped_files}
        accelerator.log(logs, step=state.step)
        progress.update(state.step, state.images_seen, logs)
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            path = checkpoints.save(accelerator, state.step)
            if args.push_checkpoints_to_hub and accelerator.is_main_process:
                push_checkpoint(args, path)
        validation_steps = getattr(args, "validation_steps", None)
        if validate is not None and validation_steps and state.step % validation_steps == 0:
            if accelerator.is_main_process:
                validate(state.step)
            accelerator.wait_for_everyone()
    progress.close(state.step)


def save_final_outputs(pipe, component: str, model, ema, args, grid: Path | None, save_lora, card_fields=None) -> Path:
    """Writes the run's result (main process only) and pushes it when `args.push_to_hub`.

    With EMA the averaged weights replace the trained ones. A full run saves the pipeline to `output_dir/pipeline` (in
    `args.save_precision`, after which `pipe` keeps that precision); a LoRA run calls `save_lora(folder, model)` for
    `output_dir/lora`. The sample grid goes in as `samples.png` and the model card carries the training configuration.
    """
    if ema is not None:
        ema.copy_to([p for p in model.parameters() if p.requires_grad])
    setattr(pipe, component, model.eval())
    lora = getattr(args, "lora_rank", 0)
    card = {"training_config": training_config_yaml(args), **(card_fields or {})}
    if grid is not None:
        card["sample_grid"] = "samples.png"
    folder = Path(args.output_dir) / ("lora" if lora else "pipeline")
    if lora:
        save_lora(folder, model)
    else:
        for module in pipe.components.values():  # not `pipe.to(dtype)`: diffusers 0.42's ModelMixin.to then warns
            if isinstance(module, torch.nn.Module):  # "modules ... should be kept in float32: []" for every model
                torch.nn.Module.to(module, dtype=SAVE_DTYPES[args.save_precision])
        pipe.save_pretrained(folder)
    if grid is not None:
        shutil.copy(grid, folder / "samples.png")
    if args.push_to_hub:
        private = args.hub_private_repo or None
        if lora:
            pipe._upload(str(folder), args.hub_model_id, args.hub_token, private, model_card_kwargs=card)
        else:
            pipe.save_pretrained(
                folder, push_to_hub=True, repo_id=args.hub_model_id, token=args.hub_token, private=private,
                model_card_kwargs=card,
            )
    return folder


def add_lora_adapter(model, rank: int, alpha: float | None = None) -> None:
    """Freezes `model` and adds a peft LoRA of `rank` on its attention projections (diffusers' module names)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )


def validation_prompts(args) -> list[str]:
    """`--validation_prompts`, or 16 shapes captions (held-out pairs included) when training on the shapes set."""
    if args.validation_prompts:
        return args.validation_prompts
    if getattr(args, "shapes_dataset_size", None):
        return [shapes.caption(*combo) for combo in shapes.evaluation_prompts(16, seed=1)]
    return []


@torch.no_grad()
def sample_validation_grid(pipe, model, ema, args, accelerator, step: int, name: str, **call_kwargs) -> Path | None:
    """Generates the validation prompts with the EMA weights swapped in (restored afterwards), saves the grid as
    `output_dir/samples/<name>.png` and logs it; None when there is no prompt to sample."""
    prompts = validation_prompts(args)
    if not prompts:
        return None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    model.eval()
    resolution = args.validation_resolution or args.min_resolution
    logger.info("Sampling %d validation images (%s) at %d², %d steps.", len(prompts), name, resolution,
                args.validation_num_inference_steps)
    try:
        images = pipe(
            prompts, height=resolution, width=resolution, num_inference_steps=args.validation_num_inference_steps,
            guidance_scale=args.validation_guidance_scale, generator=torch.Generator().manual_seed(args.seed),
            **call_kwargs,
        ).images
    finally:
        model.train()
        if ema is not None:
            ema.restore(trainable)
    return log_sample_grid(accelerator, images, args.output_dir, step, name)
