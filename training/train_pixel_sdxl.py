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
Noise levels follow diffusers' `--weighting_scheme`; the default, logit-normal with `--logit_mean -0.8 --logit_std
0.8` on 1 - sigma, is upstream's sigma ~ sigmoid(N(0.8, 0.8)). Optional LPIPS (VGG) on half-resolution x0 estimates,
weighted by (1 - sigma) per sample.

Data: `--metadata_json` reads upstream's metadata format (`{path: {"tags": "...", "image_size": [W, H]}}`) with its
bucketing and tag rules (`training_utils.metadata`); every shared image source works too, with SDXL's size
conditioning set to the bucket size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from pixel_diffusers.models.unets.unet_pixel_sdxl import PIXEL_SDXL_PRESETS, PixelSDXLUNet2DConditionModel
from pixel_diffusers.pipelines.pixel_sdxl.pipeline_pixel_sdxl import PixelSDXLPipeline
from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
from pixel_diffusers.training_utils import (
    Engine,
    SDXLTeacher,
    TrainingRun,
    TrainingState,
    add_common_training_args,
    add_image_data_args,
    add_lora_adapter,
    add_lora_args,
    add_validation_args,
    add_weighting_args,
    build_image_batches,
    build_lpips,
    build_optimizer,
    flow_loss_weights,
    frozen_models_unpartitioned,
    lr_scheduler_from_args,
    make_accelerator,
    parse_args,
    resolve_training_length,
    sample_flow_sigmas,
    sample_validation_grid,
    validation_prompts,
)

logger = logging.getLogger("train_pixel_sdxl")

STAGES = ("train", "distill_encoder", "distill_decoder")
BODY_PREFIXES = ("time_embedding.", "add_embedding.", "down_blocks.", "mid_block.", "up_blocks.")
SIGMA_FLOOR = 0.05  # upstream's floor under sigma in the velocity loss


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_training_args(parser)
    add_validation_args(parser)
    add_lora_args(parser)
    add_image_data_args(parser)
    add_weighting_args(parser, logit_mean=-0.8, logit_std=0.8)  # upstream's sigma ~ sigmoid(N(0.8, 0.8))
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
    loss.add_argument("--lpips_weight", type=float, default=0.0, help="> 0 adds LPIPS (needs --lpips_vgg_weights).")
    loss.add_argument("--lpips_vgg_weights", type=str, default=None,
                      help="Local torchvision VGG16 state dict for LPIPS (nothing is downloaded).")
    sampling = parser.add_argument_group("validation sampling")
    sampling.add_argument("--validation_num_inference_steps", type=int, default=20)
    sampling.add_argument("--validation_guidance_scale", type=float, default=5.0)
    sampling.add_argument("--validation_resolution", type=int, default=None, help="Defaults to --min_resolution.")
    return parser


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
        from pixel_diffusers.testing import make_tiny_pixel_sdxl_pipeline

        components = dict(make_tiny_pixel_sdxl_pipeline(seed=args.seed).components)
    else:
        raise ValueError("A fresh U-Net needs --pretrained_model_name_or_path (for its encoders) or --tiny_text_encoders.")
    torch.manual_seed(args.seed)  # the fresh U-Net depends on the seed only
    components["unet"] = PixelSDXLUNet2DConditionModel.from_preset(args.preset, **(args.unet_config or {}))
    components["scheduler"] = components.get("scheduler") or PixelFlowMatchScheduler(
        solver="euler", prediction_type="sample", shift=3.0, sigma_max=1.0
    )
    return PixelSDXLPipeline(**components)


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
    engine = Engine.of(accelerator)
    if args.stage != "train" and engine.shards_parameters:
        raise ValueError(
            f"--stage {args.stage} runs the U-Net's patch coders outside its forward, where {engine.name} cannot "
            "gather their sharded weights; distil with DDP or ZeRO-1/2 (only the small coders train)."
        )
    set_seed(args.seed)
    device = accelerator.device
    with frozen_models_unpartitioned(accelerator):  # the two frozen CLIP text encoders, whole under ZeRO-3
        pipe = load_pipeline(args)
    if pipe.unet.config.get("sample_size") is None:  # the saved pipeline generates at the training size by default
        pipe.unet.register_to_config(sample_size=args.validation_resolution or args.min_resolution)
        pipe.default_sample_size = pipe.unet.config.sample_size
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.train()
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.requires_grad_(False).eval().to(device)
    teacher = SDXLTeacher(args.teacher_model_name_or_path, unet.first_level, device) if args.stage != "train" else None
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
    batches, dataset = build_image_batches(args, processes, accelerator.process_index)
    resolve_training_length(args, batches)
    lr_scheduler = lr_scheduler_from_args(args, optimizer, accelerator)

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
        sigmas = sample_flow_sigmas(batch_size, generator, args.weighting_scheme, args.logit_mean, args.logit_std, 0.0,
                                    mode_scale=args.mode_scale).to(device)
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
                terms = {f"{args.loss}_loss": (flow_loss_weights(args.weighting_scheme, sigmas) * error).mean()}
                if lpips_model is not None:
                    half = [F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False).clamp(-1, 1) for x in (x0, pixels)]
                    perceptual = lpips_model(half[0].float(), half[1].float()).view(-1)
                    terms["lpips_loss"] = args.lpips_weight * ((1 - sigmas) * perceptual).mean()
        loss = sum(terms.values())
        accelerator.backward(loss)
        return {name: value.detach() for name, value in terms.items()} | {"loss": loss.detach(), "images": batch_size}

    trainable = [p for p in model.parameters() if p.requires_grad]  # DeepSpeed's engine lists no parameters
    logger.info("Stage %s: %d trainable parameters.", args.stage, sum(engine.full_shape(p).numel() for p in trainable))
    run.train(
        accelerator, args, batches, micro_step, trainable,
        validate=lambda step: sample_validation_grid(pipe, model, ema, args, accelerator, step, f"step-{step}"),
    )
    save_outputs(pipe, run, args, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state


def save_outputs(pipe, run, args, accelerator) -> None:
    """Writes the final pipeline (or LoRA) of `run` and a sample grid (every process takes part, the main one writes);
    pushes them when asked."""
    state = run.state
    grid = sample_validation_grid(pipe, run.unwrapped, run.ema, args, accelerator, state.step, "final")
    card = {}
    if grid is not None:
        resolution = args.validation_resolution or args.min_resolution
        card = {"height": resolution, "width": resolution, "prompt": validation_prompts(args)[0]}

    folder = run.save_final_outputs(accelerator, args, pipe, "unet", grid, card)
    if folder is None:
        return
    logger.info("Saved %s after %d steps (%d images, %d skipped files).", folder, state.step, state.images_seen,
                state.skipped_files)


if __name__ == "__main__":
    main(sys.argv[1:])
