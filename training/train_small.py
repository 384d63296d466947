"""Train a smalldiffusion-style model (2-D toys or an image folder) with accelerate, EMA and label dropout for CFG.

    accelerate launch training/train_small.py --data swissroll --output_dir out/swissroll
    accelerate launch training/train_small.py --data tree --output_dir out/tree --batch_size 512 \
        --max_train_steps 12000 --learning_rate 2e-3 --lr_scheduler cosine --final_sigmas_type zero --gam 1 --guidance_scale 0.5
    accelerate launch training/train_small.py --data path/to/images --resolution 32 --model unet --output_dir out/img

As smalldiffusion: AdamW, a noise level drawn uniformly from the schedule's training table per sample, by default no
learning rate schedule. The final EMA model is saved as a `SmallDiffusionPipeline` with its `GradientEstimationScheduler`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from pixel_diffusers.models.small import ConditionalMLP, SmallDiT, SmallUNet, Swissroll, TimeInputMLP, TreeDataset
from pixel_diffusers.pipelines.small import SmallDiffusionPipeline
from pixel_diffusers.schedulers.scheduling_gradient_estimation import SCHEDULES, GradientEstimationScheduler
from pixel_diffusers.training_utils import CheckpointManager


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="'swissroll', 'tree', or an image folder")
    parser.add_argument("--model", choices=("mlp", "dit", "unet"), default="mlp")
    parser.add_argument("--prediction_type", choices=("epsilon", "x0", "v", "flow"), default="epsilon")
    parser.add_argument("--scaled", action="store_true")
    parser.add_argument("--schedule", choices=SCHEDULES, default="log_linear")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=2048)
    parser.add_argument("--max_train_steps", type=int, default=5000)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_scheduler", choices=("constant", "cosine", "linear"), default="constant",
                        help="decay to 0 over the run (upstream: constant)")
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--dropout_prob", type=float, default=0.1, help="label dropout (conditional data)")
    parser.add_argument("--checkpointing_steps", type=int, default=1000)
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--gam", type=float, default=2.0)
    parser.add_argument("--final_sigmas_type", choices=("sigma_min", "zero"), default="sigma_min",
                        help="end sampling at the smallest sigma (upstream) or jump to the clean estimate")
    parser.add_argument("--guidance_scale", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


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
    accelerator = Accelerator()
    set_seed(args.seed)
    dataset, num_classes = build_data(args)
    model = build_model(args, dataset, num_classes)
    scheduler = GradientEstimationScheduler(schedule=args.schedule, gam=args.gam, final_sigmas_type=args.final_sigmas_type,
                                            prediction_type="flow_prediction" if args.prediction_type == "flow" else "epsilon")
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(args.batch_size, len(dataset)), shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=0,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    ema = EMAModel(model.parameters(), decay=args.ema_decay)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    accelerator.register_for_checkpointing(ema)
    checkpoints = CheckpointManager(Path(args.output_dir) / "checkpoints")
    step = checkpoints.resume(accelerator, args.resume_from_checkpoint)
    ema.to(accelerator.device)
    train_sigmas = scheduler.train_sigmas.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    while step < args.max_train_steps:
        for batch in loader:
            x0, cond = batch if num_classes else (batch, None)
            sigma = train_sigmas[torch.randint(len(train_sigmas), (x0.shape[0],), device=x0.device)]
            sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
            loss = unwrapped.get_loss(x0, sigma, torch.randn_like(x0), cond=cond)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            ema.step(model.parameters())
            step += 1
            if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
                checkpoints.save(accelerator, step)
                accelerator.print(f"step {step} loss {loss.item():.4f}")
            if step >= args.max_train_steps:
                break

    if accelerator.is_main_process:
        ema.copy_to(unwrapped.parameters())
        pipeline = SmallDiffusionPipeline(model=unwrapped.eval(), scheduler=scheduler)
        pipeline.save_pretrained(args.output_dir)
        if isinstance(dataset, (Swissroll, TreeDataset)):
            print(json.dumps(evaluate(pipeline, dataset, args), indent=2))


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
    main()
