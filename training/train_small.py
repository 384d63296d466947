"""Train a smalldiffusion-style model (2-D toys or an image folder) with accelerate, EMA and label dropout for CFG.

    accelerate launch training/train_small.py --data swissroll --output_dir out/swissroll
    accelerate launch training/train_small.py --data tree --output_dir out/tree --batch_size 512 \
        --max_train_steps 12000 --learning_rate 2e-3 --lr_scheduler cosine --final_sigmas_type zero --gam 1 --guidance_scale 0.5
    accelerate launch training/train_small.py --data path/to/images --resolution 32 --model unet --output_dir out/img
    accelerate launch --config_file training/configs/accelerate/fsdp2.yaml training/train_small.py --data tree ...

As smalldiffusion: AdamW, a noise level drawn uniformly from the schedule's training table per sample, by default no
learning rate schedule and no gradient clipping (biases and norms get no weight decay, as in the other scripts). The
run takes the shared training flags and engines (DDP, FSDP2, DeepSpeed) of the other scripts; the final EMA model is
saved to `output_dir/pipeline` as a `SmallDiffusionPipeline` with its `GradientEstimationScheduler`, checkpoints to
`output_dir/checkpoint-<step>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import torch
from accelerate.utils import set_seed

from pixel_diffusers.models.small import ConditionalMLP, SmallDiT, SmallUNet, Swissroll, TimeInputMLP, TreeDataset
from pixel_diffusers.pipelines.small import SmallDiffusionPipeline
from pixel_diffusers.schedulers.scheduling_gradient_estimation import SCHEDULES, GradientEstimationScheduler
from pixel_diffusers.training_utils import (
    IndexBatches,
    TrainingRun,
    add_common_training_args,
    build_optimizer,
    lr_scheduler_from_args,
    make_accelerator,
    parse_args as parse_training_args,
    resolve_training_length,
)

logger = logging.getLogger("train_small")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    small = parser.add_argument_group("smalldiffusion")
    small.add_argument("--data", required=True, help="'swissroll', 'tree', or an image folder")
    small.add_argument("--model", choices=("mlp", "dit", "unet"), default="mlp")
    small.add_argument("--prediction_type", choices=("epsilon", "x0", "v", "flow"), default="epsilon")
    small.add_argument("--scaled", action="store_true")
    small.add_argument("--schedule", choices=SCHEDULES, default="log_linear")
    small.add_argument("--resolution", type=int, default=32)
    small.add_argument("--batch_size", dest="train_batch_size", type=int, help="Alias of --train_batch_size.")
    small.add_argument("--dropout_prob", type=float, default=0.1, help="label dropout (conditional data)")
    small.add_argument("--num_inference_steps", type=int, default=20)
    small.add_argument("--gam", type=float, default=2.0)
    small.add_argument("--final_sigmas_type", choices=("sigma_min", "zero"), default="sigma_min",
                       help="end sampling at the smallest sigma (upstream) or jump to the clean estimate")
    small.add_argument("--guidance_scale", type=float, default=0.0)
    # smalldiffusion's recipe: epochs of the whole data, a constant rate of 1e-3, EMA 0.99, no gradient clipping.
    parser.set_defaults(train_batch_size=2048, num_train_epochs=5000, learning_rate=1e-3, use_ema=True,
                        ema_decay=0.99, checkpointing_steps=1000, max_grad_norm=math.inf, zclip_threshold=0,
                        spike_rollback_every=0)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = parse_training_args(build_parser(), argv)
    if args.gradient_checkpointing:
        raise ValueError("--gradient_checkpointing is not supported by train_small.py's small models.")
    return args


def build_data(args):
    """(dataset, num_classes or None)."""
    if args.data == "swissroll":
        return Swissroll(math.pi / 2, 5 * math.pi, 100), None
    if args.data == "tree":
        return TreeDataset(), TreeDataset().num_leaves
    from pixel_diffusers.pipelines.analytic.data import AnalyticImageDataset

    return AnalyticImageDataset(args.data, args.resolution), None


def build_model(args, dataset, num_classes):
    common = dict(prediction_type=args.prediction_type, scaled=args.scaled)
    if args.model == "mlp":
        if num_classes:
            return ConditionalMLP(num_classes=num_classes, dropout_prob=args.dropout_prob, **common)
        return TimeInputMLP(hidden_dims=(16, 128, 128, 128, 128, 16), **common)
    channels, size = dataset[0].shape[0], dataset[0].shape[-1]
    if args.model == "dit":
        return SmallDiT(size, channels, 2, depth=6, head_dim=32, num_heads=6, num_classes=num_classes, **common)
    return SmallUNet(size, channels, channels, ch=64, ch_mult=(1, 1, 2), attn_resolutions=(size // 2,), num_classes=num_classes, **common)


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args, "train_small")
    set_seed(args.seed)  # the same fresh weights on every process and every run
    device = accelerator.device
    dataset, num_classes = build_data(args)
    model = build_model(args, dataset, num_classes)
    scheduler = GradientEstimationScheduler(schedule=args.schedule, gam=args.gam, final_sigmas_type=args.final_sigmas_type,
                                            prediction_type="flow_prediction" if args.prediction_type == "flow" else "epsilon")
    pipe = SmallDiffusionPipeline(model=model, scheduler=scheduler)
    optimizer = build_optimizer(list(model.named_parameters()), args.optimizer, args.learning_rate,
                                (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay)
    batch_size = min(args.train_batch_size, len(dataset))
    batches = IndexBatches(len(dataset), batch_size, args.seed, accelerator.num_processes, accelerator.process_index)
    resolve_training_length(args, batches)
    lr_scheduler = lr_scheduler_from_args(args, optimizer, accelerator)
    run = TrainingRun.prepare(accelerator, args, model, optimizer, lr_scheduler, batches)
    wrapped, model = run.model, run.unwrapped
    train_sigmas = scheduler.train_sigmas

    def micro_step(batch: dict, generator: torch.Generator) -> dict:
        items = [dataset[i] for i in batch["indices"]]
        x0 = torch.stack([item[0] for item in items]) if num_classes else torch.stack(items)
        cond = torch.tensor([item[1] for item in items], device=device) if num_classes else None
        sigma = train_sigmas[torch.randint(len(train_sigmas), (len(x0),), generator=generator)]
        eps = torch.randn(x0.shape, generator=generator)
        sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        with accelerator.autocast():
            loss = model.get_loss(x0.to(device), sigma.to(device), eps.to(device), cond=cond, denoiser=wrapped)
        accelerator.backward(loss)
        return {"loss": loss.detach(), "images": len(x0)}

    run.train(accelerator, args, batches, micro_step, [p for p in wrapped.parameters() if p.requires_grad])
    folder = run.save_final_outputs(accelerator, args, pipe, "model")
    if folder is not None and isinstance(dataset, (Swissroll, TreeDataset)):
        quality = evaluate(pipe, dataset, args)
        (folder.parent / "evaluation.json").write_text(json.dumps(quality, indent=2))
        print(json.dumps(quality, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.state


@torch.no_grad()
def evaluate(pipeline, dataset, args, num_samples: int = 2000) -> dict:
    """Toy quality: mean distance to the spiral (Swissroll); for the tree, the share of samples on the requested leaf
    (:meth:`TreeDataset.on_leaf`: its path is the nearest, within half the leaf spacing) and, looser, the share
    within 0.04 of the requested leaf's path whatever path is nearest."""
    generator = torch.Generator().manual_seed(args.seed)
    pipeline.set_progress_bar_config(disable=True)
    if isinstance(dataset, Swissroll):
        samples = pipeline(batch_size=num_samples, num_inference_steps=args.num_inference_steps, generator=generator).images
        distance = dataset.distance_to_curve(samples)
        return {"mean_distance_to_spiral": distance.mean().item(), "median_distance": distance.median().item()}
    labels = torch.arange(num_samples) % dataset.num_leaves
    samples = pipeline(batch_size=num_samples, num_inference_steps=args.num_inference_steps, class_labels=labels,
                       guidance_scale=args.guidance_scale, generator=generator).images
    on_leaf = dataset.on_leaf(samples, labels)
    near_path = dataset.distance_to_path(samples, labels) < 0.04
    return {"on_requested_leaf": on_leaf.float().mean().item(),
            "within_0.04_of_requested_path": near_path.float().mean().item(), "guidance_scale": args.guidance_scale}


if __name__ == "__main__":
    main(sys.argv[1:])
