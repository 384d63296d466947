#!/usr/bin/env python
"""Train pixel-space SDXL (`PixelSDXLUNet2DConditionModel`, frozen CLIP encoders) with accelerate.

    accelerate launch training/train_pixel_sdxl.py --config training/configs/pixel_sdxl_shapes.yaml
    torchrun --nproc_per_node 2 training/train_pixel_sdxl.py --config ...   # two CPU processes (gloo)

Stages (upstream's recipe), chosen with `--stage`:

1. `distill_encoder` / `distill_decoder`: fit the patch encoder or decoder to a latent SDXL teacher (a diffusers SDXL
   folder, `--teacher_model_name_or_path`: its `unet/` and `vae/`). The encoder learns to map the noisy image to the
   teacher's features where the pixel body starts (the output of the last dropped level: 320 channels at 1/16 for
   patch 16, 640 at 1/32 for patch 32); the decoder learns to map the teacher's features where the pixel body ends
   (the last kept up block before its upsampler) to the clean image. Only that coder is trained.
   What the teacher sees: the VAE latent of the clean image (scaled by the VAE's own `scaling_factor`), noised with
   SDXL's DDPM schedule at the same timestep `sigma * 999` (`--teacher_input noisy`, the default), so that its features
   are those the body meets at that timestep. Upstream feeds the clean latent (`--teacher_input clean`), while the
   student sees the noisy image, and only supports patch 32; both are fixed here (its VAE also used SD1's
   scaling factor 0.18215 instead of SDXL's 0.13025).
2. `train` with `--body_learning_rate 0`: fine-tune encoder and decoder on the diffusion loss with the body frozen.
3. `train`: everything; `--learning_rate` for the encoder/decoder, `--body_learning_rate` for the SDXL body.

Diffusion loss: `x_t = (1 - sigma) x0 + sigma noise`, the model predicts x0; `--loss x0` is MSE(x0_hat, x0),
`--loss velocity` the MSE of the velocities `(x_t - x0) / max(sigma, 0.05)`, i.e. the x0 error over max(sigma, 0.05)^2.
Noise levels are logit-normal on sigma (`--logit_mean 0.8 --logit_std 0.8`, upstream's) or uniform. Optional LPIPS
(VGG) on half-resolution x0 estimates, weighted by (1 - sigma) per sample.

Data: `--metadata_json` reads upstream's metadata format (`{path: {"tags": "...", "image_size": [W, H]}}`) with its
bucketing and tag rules; the shared image sources (`--train_data_dir`, `--dataset_name`, `--shapes_dataset_size`)
work too, with SDXL's size conditioning set to the bucket size.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from PIL import Image

from pixel_diffusers.models.unets.unet_pixel_sdxl import PIXEL_SDXL_PRESETS, PixelSDXLUNet2DConditionModel
from pixel_diffusers.pipelines.pixel_sdxl.pipeline_pixel_sdxl import PixelSDXLPipeline
from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
from pixel_diffusers.training_utils import (
    TrainingRun,
    TrainingState,
    add_common_training_args,
    add_lora_adapter,
    add_image_data_args,
    build_image_batches,
    lr_scheduler_from_args,
    build_optimizer,
    make_accelerator,
    parse_args,
    sample_flow_sigmas,
    sample_validation_grid,
    save_final_outputs,
    validation_prompts,
)

logger = logging.getLogger("train_pixel_sdxl")

STAGES = ("train", "distill_encoder", "distill_decoder")
BODY_PREFIXES = ("time_embedding.", "add_embedding.", "down_blocks.", "mid_block.", "up_blocks.")
SIGMA_FLOOR = 0.05  # upstream's floor under sigma in the velocity loss


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_training_args(parser)
    add_image_data_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A PixelSDXLPipeline (folder or Hub id; see `pixel-diffusers convert pixel-sdxl`).")
    model.add_argument("--preset", choices=sorted(PIXEL_SDXL_PRESETS), default=None,
                       help="Start a fresh U-Net (text encoders from the pipeline or --tiny_text_encoders).")
    model.add_argument("--unet_config", type=json.loads, default=None, help="JSON overrides of the preset.")
    model.add_argument("--tiny_text_encoders", action="store_true",
                       help="The tiny CLIP encoders built in code (offline demos and tests).")
    stage = parser.add_argument_group("stage")
    stage.add_argument("--stage", choices=STAGES, default="train")
    stage.add_argument("--body_learning_rate", type=float, default=None,
                       help="Learning rate of the SDXL body (default: --learning_rate); 0 freezes it.")
    stage.add_argument("--teacher_model_name_or_path", type=str, default=None,
                       help="Diffusers SDXL folder (unet/, vae/) for the distillation stages.")
    stage.add_argument("--teacher_input", choices=("noisy", "clean"), default="noisy")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", choices=("x0", "velocity"), default="x0")
    loss.add_argument("--time_sampling", choices=("logit_normal", "uniform"), default="logit_normal")
    loss.add_argument("--logit_mean", type=float, default=0.8, help="Of logit(sigma) (sigma 1 = noise).")
    loss.add_argument("--logit_std", type=float, default=0.8)
    loss.add_argument("--lpips_weight", type=float, default=0.0, help="> 0 adds LPIPS (needs --lpips_vgg_weights).")
    loss.add_argument("--lpips_vgg_weights", type=str, default=None,
                      help="Local torchvision VGG16 state dict for LPIPS (nothing is downloaded).")
    data = parser.add_argument_group("metadata dataset")
    data.add_argument("--metadata_json", type=str, nargs="*", default=None,
                      help="Upstream metadata file(s): {image_path: {'tags': 't1, t2, ...', 'image_size': [W, H]}}.")
    data.add_argument("--bucket_area", type=int, default=1024 * 1024, help="Images larger than this are scaled down.")
    data.add_argument("--min_bucket_area", type=int, default=768 * 768, help="Smaller (floored) images are skipped.")
    data.add_argument("--bucket_step", type=int, default=32, help="Bucket sides are multiples of this.")
    data.add_argument("--max_tag_dropout", type=float, default=0.5, help="Per-sample tag dropout ~ U(0, this).")
    data.add_argument("--min_tags", type=int, default=15, help="Dropped tags are re-added up to this many.")
    sampling = parser.add_argument_group("validation sampling")
    sampling.add_argument("--validation_num_inference_steps", type=int, default=20)
    sampling.add_argument("--validation_guidance_scale", type=float, default=5.0)
    sampling.add_argument("--validation_resolution", type=int, default=None, help="Defaults to --min_resolution.")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Upstream's metadata dataset
# ---------------------------------------------------------------------------------------------------------------
def bucket_for(width: int, height: int, area: int, step: int) -> tuple[int, int]:
    """Upstream's bucket (width, height): floored to `step` when the image fits in `area`; otherwise scaled by
    sqrt(area / (W H)) and rounded (floor or ceil per side) to the candidate closest in aspect ratio, falling back to
    the floored scaled size when that candidate is larger than the image."""

    def floor(v):
        return int(v) // step * step

    if width * height <= area:
        return floor(width), floor(height)
    k = math.sqrt(area / (width * height))
    w, h = width * k, height * k
    candidates = [(fw(w), fh(h)) for fw in (floor, lambda v: math.ceil(v / step) * step) for fh in (floor, lambda v: math.ceil(v / step) * step)]
    best = min(candidates, key=lambda c: abs(c[0] / c[1] - width / height))
    if best[0] > width or best[1] > height:
        return floor(w), floor(h)
    return best


def process_tags(tags: str, rng: random.Random, max_dropout: float, min_tags: int) -> str:
    """Upstream's tag augmentation: the last two tags (quality, rating) are always kept; each other tag is dropped
    with p ~ U(0, max_dropout) drawn per sample; dropped tags are re-added at random until `min_tags` others remain;
    then all tags, the kept two included, are shuffled and joined with ", "."""
    parts = [t.strip() for t in tags.split(",") if t.strip()]
    others, fixed = parts[:-2], parts[-2:]
    p = rng.uniform(0.0, max_dropout)
    dropping = [rng.random() < p for _ in others]
    kept = [t for t, drop in zip(others, dropping) if not drop]
    dropped = [t for t, drop in zip(others, dropping) if drop]
    rng.shuffle(dropped)
    while len(kept) < min_tags and dropped:
        kept.append(dropped.pop())
    result = kept + fixed
    rng.shuffle(result)
    return ", ".join(result)


class MetadataBatches:
    """Batches of upstream's metadata dataset, resumable: each batch comes from one bucket; an epoch shuffles the
    items within buckets (a short last batch is filled with random items of the same bucket) and then the batch order,
    seeded by (seed, epoch); batch k goes to process k % num_replicas. Every item carries SDXL's conditioning:
    `original_size` (H, W) before resizing, `crop_top_left` after resizing, and the bucket as target size.
    A file that fails to load is skipped and counted in the batch's `num_skipped`."""

    def __init__(self, files, batch_size, seed, caption_dropout, flip_p, area, min_area, step, max_tag_dropout,
                 min_tags, num_replicas=1, rank=0):
        metadata = {}
        for file in files:
            metadata.update(json.loads(Path(file).read_text(encoding="utf-8")))
        self.items, self.buckets = [], {}
        skipped = 0
        for path in sorted(metadata):
            width, height = metadata[path]["image_size"]
            if (width // step * step) * (height // step * step) < min_area:
                skipped += 1
                continue
            bucket = bucket_for(width, height, area, step)
            self.buckets.setdefault(bucket, []).append(len(self.items))
            self.items.append((path, metadata[path].get("tags", ""), bucket))
        if not self.items:
            raise ValueError(f"No image of {files} reaches min_bucket_area={min_area} ({skipped} too small).")
        logger.info("Metadata dataset: %d images in %d buckets (%d too small).", len(self.items), len(self.buckets), skipped)
        self.batch_size, self.seed, self.caption_dropout, self.flip_p = batch_size, seed, caption_dropout, flip_p
        self.max_tag_dropout, self.min_tags = max_tag_dropout, min_tags
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.batches_done = 0, 0

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed + epoch)
        batches = []
        for bucket in sorted(self.buckets):
            indices = list(self.buckets[bucket])
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                batch += [rng.choice(indices) for _ in range(self.batch_size - len(batch))]
                batches.append(batch)
        rng.shuffle(batches)
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def load_item(self, index: int, rng: random.Random) -> dict:
        path, tags, (bucket_w, bucket_h) = self.items[index]
        image = Image.open(path).convert("RGB")
        original = (image.height, image.width)
        if image.size != (bucket_w, bucket_h):
            scale = max(bucket_w / image.width, bucket_h / image.height)
            image = image.resize((int(image.width * scale + 0.5), int(image.height * scale + 0.5)), Image.LANCZOS)
        if rng.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        top, left = rng.randint(0, image.height - bucket_h), rng.randint(0, image.width - bucket_w)
        array = np.asarray(image.crop((left, top, left + bucket_w, top + bucket_h)), dtype=np.float32)
        caption = "" if rng.random() < self.caption_dropout else process_tags(tags, rng, self.max_tag_dropout, self.min_tags)
        return {
            "pixel_values": torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0,
            "caption": caption,
            "time_ids": [*original, top, left, bucket_h, bucket_w],
        }

    def __iter__(self):
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.batches_done < len(batches):
                indices = batches[self.batches_done]
                rng = random.Random(f"{self.seed}-{self.epoch}-{self.batches_done}-{self.rank}")
                self.batches_done += 1
                items = []
                for index in indices:
                    try:
                        items.append(self.load_item(index, rng))
                    except Exception as error:  # noqa: BLE001 - a corrupt file is skipped and counted, never fatal
                        logger.warning("Skipping %s: %s", self.items[index][0], error)
                if not items:
                    yield {"pixel_values": None, "num_skipped": len(indices)}
                    continue
                yield {
                    "pixel_values": torch.stack([item["pixel_values"] for item in items]),
                    "captions": [item["caption"] for item in items],
                    "time_ids": torch.tensor([item["time_ids"] for item in items], dtype=torch.float32),
                    "num_skipped": len(indices) - len(items),
                }
            self.epoch += 1
            self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"The checkpoint's data order used seed {state['seed']}, this run uses seed {self.seed}.")
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def load_pipeline(args) -> PixelSDXLPipeline:
    """The pipeline whose U-Net is trained: a pretrained one, or a preset with the pipeline's or tiny text encoders."""
    if args.pretrained_model_name_or_path:
        pipe = PixelSDXLPipeline.from_pretrained(args.pretrained_model_name_or_path)
        if args.preset is None:
            return pipe
        components = dict(pipe.components)
    elif args.preset is None:
        raise ValueError("Give --pretrained_model_name_or_path or --preset.")
    elif args.tiny_text_encoders:
        from pixel_diffusers.pipelines.pixel_sdxl.testing_utils import make_tiny_pixel_sdxl_pipeline

        components = dict(make_tiny_pixel_sdxl_pipeline(seed=args.seed).components)
    else:
        raise ValueError("A fresh U-Net needs --pretrained_model_name_or_path (for its encoders) or --tiny_text_encoders.")
    torch.manual_seed(args.seed)  # the fresh U-Net depends on the seed only
    components["unet"] = PixelSDXLUNet2DConditionModel.from_preset(args.preset, **(args.unet_config or {}))
    components["scheduler"] = components.get("scheduler") or PixelFlowMatchScheduler(
        solver="euler", prediction_type="sample", shift=3.0, sigma_max=1.0
    )
    return PixelSDXLPipeline(**components)


class _Captured(Exception):
    """Stops the teacher's forward once the wanted features are captured."""


class Teacher:
    """A latent SDXL U-Net and its VAE; returns the features at the pixel body's entry or exit level."""

    def __init__(self, path: str, first_level: int, device):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False).eval().to(device)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False).eval().to(device)
        # SDXL's training schedule (scaled-linear betas), for the noisy teacher input.
        ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.alphas_cumprod = ddpm.alphas_cumprod.to(device)
        levels = len(self.unet.config.block_out_channels)
        self.entry = self.unet.down_blocks[first_level - 1]
        self.exit = self.unet.up_blocks[levels - 1 - first_level].upsamplers[0]

    @torch.no_grad()
    def features(self, which: str, pixels, sigmas, context, added, noisy: bool, generator) -> torch.Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        sample = torch.randn(posterior.mean.shape, generator=generator).to(pixels.device)
        latents = (posterior.mean + posterior.std * sample) * self.vae.config.scaling_factor
        timesteps = sigmas * 999
        if noisy:
            alpha = self.alphas_cumprod[timesteps.round().long()].view(-1, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            latents = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        captured = {}

        def at_entry(module, args, output):
            captured["features"] = output[0]
            raise _Captured

        def at_exit(module, args, kwargs):
            captured["features"] = kwargs.get("hidden_states", args[0] if args else None)
            raise _Captured

        handle = (
            self.entry.register_forward_hook(at_entry)
            if which == "entry"
            else self.exit.register_forward_pre_hook(at_exit, with_kwargs=True)
        )
        try:
            self.unet(latents, timesteps, context, added_cond_kwargs=added)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured["features"]


def build_lpips(weights_path: str | None, device):
    """Frozen LPIPS(VGG) whose VGG16 weights come from a local torchvision state dict; never downloads."""
    try:
        import lpips
    except ImportError as error:
        raise ValueError("--lpips_weight > 0 needs the `lpips` package (pip install lpips torchvision).") from error
    if not weights_path or not Path(weights_path).is_file():
        raise ValueError(
            f"--lpips_weight > 0 needs --lpips_vgg_weights, a local torchvision VGG16 state dict (vgg16-397923af.pth); "
            f"got {weights_path!r}. Nothing is downloaded."
        )
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # linear heads ship with the package
    vgg = torch.load(weights_path, map_location="cpu", weights_only=True)
    # lpips splits VGG16's `features` into five slices that keep torchvision's layer indices.
    bounds = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))
    mapped = {}
    for key, value in vgg.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            part = next(s for s, low, high in bounds if low <= index < high)
            mapped[f"slice{part}.{key[len('features.'):]}"] = value
    model.net.load_state_dict(mapped, strict=True)
    return model.requires_grad_(False).eval().to(device)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> TrainingState:
    args = parse_args(build_parser(), argv)
    if args.stage != "train" and not args.teacher_model_name_or_path:
        raise ValueError(f"--stage {args.stage} needs --teacher_model_name_or_path (a diffusers SDXL folder).")
    if args.stage != "train" and args.unet_config and args.unet_config.get("encoder_decoder_type") == "conv":
        raise ValueError("The distillation stages train the default patch encoder/decoder, not the conv ones.")
    accelerator = make_accelerator(args, "train_pixel_sdxl")
    set_seed(args.seed)
    device = accelerator.device
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.train()
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.requires_grad_(False).eval().to(device)
    teacher = Teacher(args.teacher_model_name_or_path, unet.first_level, device) if args.stage != "train" else None
    lpips_model = build_lpips(args.lpips_vgg_weights, device) if args.lpips_weight > 0 else None

    if args.lora_rank:
        add_lora_adapter(unet, args.lora_rank, args.lora_alpha)
        rates = None
    elif args.stage == "train":
        body_rate = args.learning_rate if args.body_learning_rate is None else args.body_learning_rate
        rates = {prefix: body_rate for prefix in BODY_PREFIXES}
    else:
        coder = "patch_encoder." if args.stage == "distill_encoder" else "patch_decoder."
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_(name.startswith(coder))
        rates = None
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = build_optimizer(
        list(unet.named_parameters()), args.optimizer, args.learning_rate, (args.adam_beta1, args.adam_beta2),
        args.adam_epsilon, args.adam_weight_decay, learning_rate_by_prefix=rates,
    )
    processes = accelerator.num_processes
    lr_scheduler = lr_scheduler_from_args(args, optimizer, processes)
    if args.metadata_json:
        batches = MetadataBatches(
            args.metadata_json, args.train_batch_size, args.seed, args.caption_dropout, args.random_flip,
            args.bucket_area, args.min_bucket_area, args.bucket_step, args.max_tag_dropout, args.min_tags,
            processes, accelerator.process_index,
        )
        dataset = None
    else:
        batches, dataset = build_image_batches(args, processes, accelerator.process_index)

    run = TrainingRun.prepare(accelerator, args, unet, optimizer, lr_scheduler, batches, dataset)
    unet, model, ema, state = run.model, run.unwrapped, run.ema, run.state
    patch = model.config.patch_size

    def micro_step(batch, generator) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"].to(device)
        batch_size, _, height, width = pixels.shape
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(batch["captions"], do_classifier_free_guidance=False, device=device)
        time_ids = batch.get("time_ids")
        if time_ids is None:  # shared sources: the image was rendered / resized to the bucket
            time_ids = PixelSDXLPipeline.get_time_ids((height, width), (0, 0), (height, width), batch_size, device)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(device)}
        # Upstream's sigma ~ sigmoid(N(m, s)); the shared sampler draws t = 1 - sigma, hence the negated mean.
        sigmas = sample_flow_sigmas(batch_size, generator, args.time_sampling, -args.logit_mean, args.logit_std, 0.0).to(device)
        noise = torch.randn(pixels.shape, generator=generator).to(device)
        noisy = (1 - sigmas.view(-1, 1, 1, 1)) * pixels + sigmas.view(-1, 1, 1, 1) * noise
        with accelerator.autocast():
            if args.stage == "distill_encoder":
                target = teacher.features("entry", pixels, sigmas, context, added, args.teacher_input == "noisy", generator)
                features = model.patch_encoder(F.pixel_unshuffle(noisy.to(model.dtype), patch))
                terms = {"distill_loss": F.mse_loss(features.float(), target.float())}
            elif args.stage == "distill_decoder":
                features = teacher.features("exit", pixels, sigmas, context, added, args.teacher_input == "noisy", generator)
                x0 = F.pixel_shuffle(model.patch_decoder(features.to(model.dtype)), patch)
                terms = {"distill_loss": F.mse_loss(x0.float(), pixels)}
            else:
                x0 = unet(noisy, sigmas * 1000, context, added).sample.float()
                error = (x0 - pixels).square().mean(dim=(1, 2, 3))
                if args.loss == "velocity":
                    error = error / sigmas.clamp(min=SIGMA_FLOOR).square()
                terms = {f"{args.loss}_loss": error.mean()}
                if lpips_model is not None:
                    half = [F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False).clamp(-1, 1) for x in (x0, pixels)]
                    perceptual = lpips_model(half[0].float(), half[1].float()).view(-1)
                    terms["lpips_loss"] = args.lpips_weight * ((1 - sigmas) * perceptual).mean()
        loss = sum(terms.values())
        accelerator.backward(loss / args.gradient_accumulation_steps)
        return {name: value.detach() for name, value in terms.items()} | {"loss": loss.detach(), "images": batch_size}

    trainable = [p for p in unet.parameters() if p.requires_grad]
    logger.info("Stage %s: %d trainable parameters.", args.stage, sum(p.numel() for p in trainable))
    run.train(
        accelerator, args, batches, micro_step, trainable,
        validate=lambda step: sample_validation_grid(pipe, model, ema, args, accelerator, step, f"step-{step}"),
    )
    if accelerator.is_main_process:
        save_outputs(pipe, model, ema, args, accelerator, state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state


def save_outputs(pipe, model, ema, args, accelerator, state) -> None:
    """Writes the final pipeline (or LoRA) and a sample grid; pushes them when asked."""
    grid = sample_validation_grid(pipe, model, ema, args, accelerator, state.step, "final")
    card = {}
    if grid is not None:
        resolution = args.validation_resolution or args.min_resolution
        card = {"height": resolution, "width": resolution, "prompt": validation_prompts(args)[0]}

    def save_lora(folder, lora_model):
        from peft.utils import get_peft_model_state_dict

        PixelSDXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(lora_model))

    folder = save_final_outputs(pipe, "unet", model, ema, args, grid, save_lora, card)
    logger.info("Saved %s after %d steps (%d images, %d skipped files).", folder, state.step, state.images_seen,
                state.skipped_files)


if __name__ == "__main__":
    main(sys.argv[1:])
