"""The optimisation loop every training script runs, and how a run's final outputs are written and pushed."""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import shapes
from .checkpointing import CheckpointManager, TrainingState
from .config import SAVE_DTYPES, log_sample_grid, push_checkpoint, step_generator, training_config_yaml
from .ema import ShardedEMA
from .engines import Engine
from .optim import AdaptiveGradClip, LossSpikeGuard, run_with_oom_retry
from .progress import TrainingProgress

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """Everything a training loop holds, prepared by accelerate and restored from the checkpoint to resume."""

    model: torch.nn.Module  # as prepared by accelerate (wrapped or sharded by the engine)
    unwrapped: torch.nn.Module
    extra_modules: tuple
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: ShardedEMA | None
    clipper: AdaptiveGradClip
    state: TrainingState
    checkpoints: CheckpointManager
    guard: LossSpikeGuard | None
    engine: Engine
    batches: object

    @classmethod
    def prepare(cls, accelerator, args, model, optimizer, lr_scheduler, batches, dataset=None, extra_modules=(),
                state: TrainingState | None = None):
        """Prepares `model` (and trained `extra_modules`, e.g. a loss's projector) with accelerate under the engine
        the launch chose, creates the EMA of the model's trainable parameters (`args.use_ema`, see `ShardedEMA`),
        the ZClip state and the loop counters, and resumes all of them from `args.resume_from_checkpoint`."""
        engine = Engine.of(accelerator)
        check_engine_options(args, engine, extra_modules)
        prepared = accelerator.prepare(model, *extra_modules, optimizer, lr_scheduler)
        model, extra_modules, optimizer, lr_scheduler = prepared[0], tuple(prepared[1:-2]), prepared[-2], prepared[-1]
        unwrapped = accelerator.unwrap_model(model)
        ema = ShardedEMA(unwrapped, engine, args.ema_decay) if args.use_ema else None
        clipper = AdaptiveGradClip(args.max_grad_norm, args.zclip_threshold if args.zclip_threshold else float("inf"))
        state = state or TrainingState(step=0, images_seen=0, skipped_files=0, skipped_batches=0)
        checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit)
        extras = {"batches": batches, "clipper": clipper, "state": state}
        checkpoints.resume(accelerator, args.resume_from_checkpoint, extras, ema, engine)
        guard = None
        if args.spike_rollback_every:
            guard = LossSpikeGuard(unwrapped, optimizer, ema, args.spike_rollback_every, args.spike_factor)
        if dataset is not None and dataset.num_unreadable:
            state.skipped_files = max(state.skipped_files, dataset.num_unreadable)
        return cls(model, unwrapped, extra_modules, optimizer, lr_scheduler, ema, clipper, state, checkpoints, guard,
                   engine, batches)

    def train(self, accelerator, args, batches, micro_step, trainable, validate=None) -> None:
        """`train_loop` with this run's pieces."""
        train_loop(
            accelerator, args, self.model, self.optimizer, self.lr_scheduler, batches, micro_step, self.state,
            self.checkpoints, self.clipper, trainable, self.ema, self.guard, validate, self.engine,
        )

    def save_checkpoint(self, accelerator, step: int) -> Path:
        extras = {"batches": self.batches, "clipper": self.clipper, "state": self.state}
        return self.checkpoints.save(accelerator, step, extras, self.ema, self.engine)

    def save_final_outputs(self, accelerator, args, pipe, component: str, grid: Path | None = None,
                           card_fields: dict | None = None) -> Path | None:
        """`save_final_outputs` of this run's model (with its EMA) as `pipe.<component>`."""
        return save_final_outputs(pipe, component, self.unwrapped, self.ema, args, accelerator, grid, card_fields,
                                  self.engine)


def check_engine_options(args, engine: Engine, extra_modules=()) -> None:
    """Refuses, naming the flag and the engine, what a run asks for and its engine cannot do.

    Under DeepSpeed the optimiser steps inside `accelerator.backward` with DeepSpeed's own clipping at
    `--max_grad_norm`, so ZClip (`--zclip_threshold`) cannot adjust the gradients first and a rollback cannot restore
    its partitioned optimiser state (`--spike_rollback_every`); pass 0 for both. DeepSpeed also trains one model per
    run, so a trained loss module (REPA's projector) needs another engine.
    """
    if engine.is_deepspeed:
        for flag in ("zclip_threshold", "spike_rollback_every"):
            if getattr(args, flag, 0):
                raise ValueError(
                    f"--{flag} {getattr(args, flag)} is not supported under DeepSpeed ({engine.name}): DeepSpeed "
                    f"steps the optimiser inside backward. Pass --{flag} 0 (DeepSpeed clips at --max_grad_norm), or "
                    "train with DDP or FSDP2."
                )
        if extra_modules:
            raise ValueError(
                f"DeepSpeed ({engine.name}) trains a single model, and this run also trains "
                f"{[type(m).__name__ for m in extra_modules]} (e.g. REPA's projector): use DDP or FSDP2."
            )


def _agree_on_usable(flags: list[bool], device) -> list[bool]:
    """Every process keeps a micro batch only where all processes have data for it, so collectives stay paired."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    agreed = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return [bool(v) for v in agreed.tolist()]


@contextlib.contextmanager
def _micro_batch(accelerator, model, synchronise: bool):
    """Gradients of a micro batch: synchronised (and, under DeepSpeed, stepped) only on the last one of a step."""
    accelerator.gradient_state._set_sync_gradients(synchronise)
    try:
        with contextlib.nullcontext() if synchronise else accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


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
    ema: ShardedEMA | None = None,
    guard: LossSpikeGuard | None = None,
    validate=None,
    engine: Engine | None = None,
) -> None:
    """Runs optimiser steps from `state.step` to `args.max_train_steps`.

    Each step draws `args.gradient_accumulation_steps` batches and runs `micro_step(batch, generator)` on each, which
    does the forward and `accelerator.backward` and returns its detached loss terms (a "loss" key included) plus
    "images"; gradients synchronise on the last one. A micro batch with no readable image on some process is skipped
    on every process (so the engine's collectives stay paired); an out-of-memory batch is retried halved (single
    process and DDP; sharded engines cannot retry one process alone); a loss spike rolls back. Then come the clip, the
    optimiser, scheduler and EMA steps, logging, checkpoints every `args.checkpointing_steps` (and at the end) and
    `validate(step)` on every process (it samples collectively; the main process writes) every
    `args.validation_steps`. The random draws of a step depend only on (seed, step, process), so resumed runs are
    exact.
    """
    engine = engine or Engine.of(accelerator)
    accumulation = args.gradient_accumulation_steps
    processes = accelerator.num_processes
    retry_oom = not (engine.shards_parameters or engine.is_deepspeed)
    stream = iter(batches)
    logger.info("Training from step %d to %d: %s.", state.step, args.max_train_steps,
                engine.describe(accelerator, args.train_batch_size, accumulation))
    progress = TrainingProgress(accelerator, args.max_train_steps, state, args.disable_progress_bar)
    while state.step < args.max_train_steps:
        if guard is not None:
            guard.maybe_snapshot(state.step)
        drawn = [next(stream) for _ in range(accumulation)]
        for batch in drawn:
            state.skipped_files += batch.get("num_skipped", 0)
        has_data = ["pixel_values" not in b or b["pixel_values"] is not None for b in drawn]
        usable = _agree_on_usable(has_data, accelerator.device)
        chosen = [micro for micro in range(accumulation) if usable[micro]]
        results = []
        for micro in chosen:
            generator = step_generator(args.seed, state.step * accumulation + micro, accelerator.process_index)
            with _micro_batch(accelerator, model, synchronise=micro == chosen[-1]):
                step_fn = lambda b: micro_step(b, generator)  # noqa: E731
                result = run_with_oom_retry(step_fn, drawn[micro], optimizer) if retry_oom else step_fn(drawn[micro])
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
            ema.step()
        state.step += 1
        state.images_seen += sum(r["images"] for r in results) * processes
        logs = {name: torch.stack([r[name] for r in results]).mean().item() for name in results[0] if name != "images"}
        logs |= {"grad_norm": grad_norm, "lr": lr_scheduler.get_last_lr()[0], "skipped_files": state.skipped_files}
        accelerator.log(logs, step=state.step)
        progress.update(state.step, state.images_seen, logs)
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            extras = {"batches": batches, "clipper": clipper, "state": state}
            path = checkpoints.save(accelerator, state.step, extras, ema, engine)
            if args.push_checkpoints_to_hub and accelerator.is_main_process:
                push_checkpoint(args, path)
        validation_steps = getattr(args, "validation_steps", None)
        if validate is not None and validation_steps and state.step % validation_steps == 0:
            validate(state.step)
            accelerator.wait_for_everyone()
    progress.close(state.step)


def ema_weights(ema: ShardedEMA | None):
    """The block runs with the EMA weights swapped in (on every process) when there is an EMA."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()


def save_final_outputs(
    pipe, component: str, model, ema, args, accelerator, grid: Path | None = None, card_fields: dict | None = None,
    engine: Engine | None = None,
) -> Path | None:
    """Writes the run's result and pushes it when `args.push_to_hub`; every process calls it, the main one writes.

    The full state dict is gathered from every process, with the EMA weights in place of the trained ones when there
    is an EMA. A full run saves the pipeline to `output_dir/pipeline` (in `args.save_precision`, after which `pipe`
    keeps that precision): under FSDP2 and ZeRO-3 into a fresh, unsharded copy of the model, which then replaces the
    sharded one in `pipe`. A LoRA run gathers only the adapter's weights (under every engine) and writes the adapter
    of `component` to `output_dir/lora` with its metadata (rank, alpha, target modules), so that `load_lora_weights`
    restores the trained scale. The sample grid goes in as `samples.png` and the model card carries the training
    configuration. Returns the folder on the main process, None elsewhere.
    """
    engine = engine or Engine.of(accelerator)
    lora = getattr(args, "lora_rank", 0)
    averaged = ema.full_state() if ema is not None else None
    trained = {name for name, param in model.named_parameters() if param.requires_grad} if lora else None
    full = engine.full_state_dict(model, averaged, keep=accelerator.is_main_process, names=trained)
    if not accelerator.is_main_process:
        return None
    card = {"training_config": training_config_yaml(args), **(card_fields or {})}
    if grid is not None:
        card["sample_grid"] = "samples.png"
    folder = Path(args.output_dir) / ("lora" if lora else "pipeline")
    if lora:
        from diffusers.training_utils import _collate_lora_metadata
        from peft.utils import get_peft_model_state_dict

        layers = {f"{component}_lora_layers": get_peft_model_state_dict(model, state_dict=full)}
        type(pipe).save_lora_weights(folder, **layers, **_collate_lora_metadata({component: model}))
    else:
        final = type(model).from_config(model.config) if engine.shards_parameters else model
        final.load_state_dict(full, strict=True)
        setattr(pipe, component, final.eval())
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
    """Generates the validation prompts (or, given `class_labels`, those classes) with the EMA weights swapped in,
    saves the grid as `output_dir/samples/<name>.png` and logs it.

    Every process samples (a sharded model computes collectively) with the same generator; the main process writes
    and returns the grid, the others return None, as does a run with nothing to sample.
    """
    inputs = {} if "class_labels" in call_kwargs else {"prompt": validation_prompts(args)}
    if inputs and not inputs["prompt"]:
        return None
    if inputs:
        resolution = args.validation_resolution or args.min_resolution
        inputs |= {"height": resolution, "width": resolution}
    model.eval()
    count = len(call_kwargs.get("class_labels") or inputs["prompt"])
    logger.info("Sampling %d validation images (%s), %d steps.", count, name, args.validation_num_inference_steps)
    try:
        with ema_weights(ema):
            images = pipe(
                **inputs, num_inference_steps=args.validation_num_inference_steps,
                guidance_scale=args.validation_guidance_scale, generator=torch.Generator().manual_seed(args.seed),
                **call_kwargs,
            ).images
    finally:
        Engine.of(accelerator).reshard(model)
        model.train()
    if not accelerator.is_main_process:
        return None
    return log_sample_grid(accelerator, images, args.output_dir, step, name)
