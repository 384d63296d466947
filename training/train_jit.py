#!/usr/bin/env python
"""Train a class-conditional JiT (`JiTTransformer2DModel`, architecture "jit") with accelerate.

    accelerate launch training/train_jit.py --preset JiT-B/16 --dataset_name imagenet-1k --num_classes 1000 ...
    python training/train_jit.py --shapes_dataset_size 2048 --min_resolution 32 --max_resolution 32 \
        --preset JiT-B/16 --transformer_config '{"sample_size": 32, "patch_size": 4}' --output_dir shapes-jit

The objective is JiT's (paper Sec. 3-4, official `denoiser.py`): time `t = sigmoid(N(P_mean, P_std^2))`
(1 = clean; `--weighting_scheme logit_normal --logit_mean -0.8 --logit_std 0.8`, the defaults, are JiT's
P_mean / P_std in diffusers' flags, whose other schemes work too), `z = t x + (1 - t) e` with `e ~ N(0, s^2)` (`s`: the transformer's `noise_scale`, JiT's rule
size / 256 by default), the network predicts x and the loss is the velocity MSE
`|(x_pred - z) / max(1 - t, t_eps) - (x - z) / max(1 - t, t_eps)|^2`; labels are replaced by the null class with
probability `--label_dropout` for classifier-free guidance. Classes come from the shapes set (`(shape, colour)`
classes, named in the saved config's `id2label`) or from the dataset's `--class_column` (e.g. `label` of a folder of
class subfolders; give `--num_classes`). Paper recipe: AdamW betas (0.9, 0.95),
no weight decay, lr 5e-5 * batch / 256 with 5 warm-up epochs, EMA 0.9999.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from accelerate.utils import set_seed

from pixel_diffusers.models.transformers.transformer_jit import JIT_PRESETS, JiTTransformer2DModel
from pixel_diffusers.pipelines.jit.pipeline_jit import JiTPipeline
from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
from pixel_diffusers.training_utils import (
    TrainingRun,
    add_common_training_args,
    add_lora_adapter,
    add_lora_args,
    add_image_data_args,
    add_validation_args,
    add_weighting_args,
    build_image_batches,
    build_optimizer,
    flow_loss_weights,
    lr_scheduler_from_args,
    make_accelerator,
    parse_args,
    resolve_training_length,
    sample_flow_sigmas,
    sample_validation_grid,
    shapes,
)

logger = logging.getLogger("train_jit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    add_lora_args(parser)
    add_validation_args(parser, prompts=False)
    add_image_data_args(parser)
    add_weighting_args(parser, logit_mean=-0.8, logit_std=0.8)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="A JiTPipeline to continue.")
    model.add_argument("--preset", choices=[k for k in JIT_PRESETS if k.startswith("JiT")], default="JiT-B/16")
    model.add_argument("--transformer_config", type=json.loads, default=None, help="JSON overrides of the preset.")
    model.add_argument("--num_classes", type=int, default=None, help="Defaults to the shapes set's class count.")
    model.add_argument("--class_column", type=str, default=None,
                       help='Integer class column of the dataset, e.g. "label" (a folder of class subfolders).')
    loss = parser.add_argument_group("loss")
    loss.add_argument("--t_eps", type=float, default=0.05, help="Floor of 1 - t in the velocity's denominator.")
    loss.add_argument("--label_dropout", type=float, default=0.1)
    sampling = parser.add_argument_group("validation sampling")
    sampling.add_argument("--validation_num_inference_steps", type=int, default=20)
    sampling.add_argument("--validation_guidance_scale", type=float, default=3.0)
    return parser


def load_pipeline(args) -> JiTPipeline:
    if args.pretrained_model_name_or_path:
        if args.transformer_config:
            raise ValueError(
                "--transformer_config shapes a fresh model; a --pretrained_model_name_or_path keeps its own."
            )
        return JiTPipeline.from_pretrained(args.pretrained_model_name_or_path)
    overrides = dict(args.transformer_config or {})
    if args.shapes_dataset_size:
        names = shapes.class_names()
        overrides.setdefault("num_classes", len(names))
        overrides.setdefault("id2label", dict(enumerate(names)))
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    transformer = JiTTransformer2DModel.from_preset(args.preset, **overrides)
    if transformer.config.sample_size != args.min_resolution or args.min_resolution != args.max_resolution:
        raise ValueError(
            f"JiT works at one size: --min_resolution and --max_resolution must equal the transformer's sample_size "
            f"{transformer.config.sample_size}; got {args.min_resolution} and {args.max_resolution}."
        )
    return JiTPipeline(transformer, PixelFlowMatchScheduler(solver="heun", prediction_type="flow_prediction"))


def sample_grid(pipe, model, ema, args, accelerator, step: int, name: str):
    """One image per class (up to 16) with the current (EMA) weights."""
    labels = list(range(min(16, model.config.num_classes)))
    return sample_validation_grid(pipe, model, ema, args, accelerator, step, name, class_labels=labels)


def main(argv: list[str] | None = None):
    args = parse_args(build_parser(), argv)
    if not 0.0 <= args.label_dropout <= 1.0:
        raise ValueError(f"--label_dropout must lie in [0, 1], got {args.label_dropout}.")
    if not args.shapes_dataset_size and args.class_column is None:
        raise ValueError("JiT trains on class labels: give --class_column (e.g. label) or --shapes_dataset_size.")
    accelerator = make_accelerator(args, "train_jit")
    device = accelerator.device
    set_seed(args.seed)  # the initial weights depend on the seed only
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.train()
    if args.lora_rank:
        add_lora_adapter(transformer, args.lora_rank, args.lora_alpha)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    noise_scale = transformer.noise_scale
    null_class = transformer.config.num_classes

    optimizer = build_optimizer(list(transformer.named_parameters()), args.optimizer, args.learning_rate,
                                (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay)
    processes = accelerator.num_processes
    batches, dataset = build_image_batches(args, processes, accelerator.process_index)
    resolve_training_length(args, batches)
    lr_scheduler = lr_scheduler_from_args(args, optimizer, accelerator)
    run = TrainingRun.prepare(accelerator, args, transformer, optimizer, lr_scheduler, batches, dataset)
    transformer, model, ema = run.model, run.unwrapped, run.ema

    def micro_step(batch, generator) -> dict:
        x = batch["pixel_values"].to(device)
        labels = batch["class_labels"].to(device)
        drop = (torch.rand(len(x), generator=generator) < args.label_dropout).to(device)
        labels = torch.where(drop, torch.full_like(labels, null_class), labels)
        sigmas = sample_flow_sigmas(len(x), generator, args.weighting_scheme, args.logit_mean, args.logit_std, 0.0,
                                    mode_scale=args.mode_scale)
        t = (1 - sigmas).to(device)
        noise = (torch.randn(x.shape, generator=generator) * noise_scale).to(device)
        t4 = t.view(-1, 1, 1, 1)
        z = t4 * x + (1 - t4) * noise
        with accelerator.autocast():
            x_pred = transformer(z, (1 - t) * 1000, class_labels=labels).sample.float()
        denominator = (1 - t4).clamp(min=args.t_eps)
        error = (((x_pred - z) / denominator - (x - z) / denominator) ** 2).mean(dim=(1, 2, 3))
        loss = (flow_loss_weights(args.weighting_scheme, sigmas).to(device) * error).mean()
        accelerator.backward(loss)
        return {"loss": loss.detach(), "images": len(x)}

    run.train(
        accelerator, args, batches, micro_step, [p for p in transformer.parameters() if p.requires_grad],
        validate=lambda step: sample_grid(pipe, model, ema, args, accelerator, step, f"step-{step}"),
    )
    grid = sample_grid(pipe, model, ema, args, accelerator, run.state.step, "final")
    folder = run.save_final_outputs(accelerator, args, pipe, "transformer", grid)
    if folder is not None:
        logger.info("Saved %s after %d steps (%d images, %d skipped files).", folder, run.state.step,
                    run.state.images_seen, run.state.skipped_files)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.state


if __name__ == "__main__":
    main(sys.argv[1:])
