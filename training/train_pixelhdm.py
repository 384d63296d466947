#!/usr/bin/env python
"""Train `PixelHDMTransformer2DModel` (flow matching, frozen Qwen3 text encoder) with accelerate.

    accelerate launch training/train_pixelhdm.py --config training/configs/pixelhdm_shapes.yaml
    torchrun --nproc_per_node 2 training/train_pixelhdm.py --config ...   # two CPU processes (gloo)

Losses (each weight configurable): velocity MSE, the JPEG-weighted DCT frequency loss, REPA against DINOv3 patch
features until `--repa_early_stop` (the projector is trained, checkpointed and saved, which upstream never did) and the
pixel AdaLN gamma L2 term. The final pipeline (EMA weights when `--use_ema`) is written to `output_dir/pipeline`;
with `--lora_rank` the LoRA weights go to `output_dir/lora` instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file

from pixel_diffusers import PixelFlowMatchScheduler, PixelHDMPipeline, PixelHDMTransformer2DModel
from pixel_diffusers.models.transformers.transformer_pixelhdm import PIXELHDM_PRESETS
from pixel_diffusers.pipelines.pixelhdm.pipeline_pixelhdm import DEFAULT_SCHEDULER_CONFIG
from pixel_diffusers.training_utils import (
    DINOv3Features,
    FrequencyLoss,
    REPALoss,
    TrainingRun,
    TrainingState,
    add_common_training_args,
    add_image_data_args,
    add_lora_adapter,
    add_lora_args,
    add_validation_args,
    add_weighting_args,
    build_image_batches,
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

logger = logging.getLogger("train_pixelhdm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_training_args(parser)
    add_validation_args(parser)
    add_lora_args(parser)
    add_image_data_args(parser)
    add_weighting_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A PixelHDM pipeline (folder or Hub id): text encoder, tokenizer, scheduler and, unless "
                            "--preset is given, the transformer to continue from.")
    model.add_argument("--preset", choices=sorted(PIXELHDM_PRESETS), default=None, help="Start a fresh transformer.")
    model.add_argument("--transformer_config", type=json.loads, default=None,
                       help='JSON overrides of the preset, e.g. \'{"patch_size": 8}\'.')
    model.add_argument("--text_encoder_name_or_path", type=str, default=None, help="Qwen3 model with its tokenizer.")
    model.add_argument("--tiny_text_encoder", action="store_true",
                       help="Use the tiny Qwen3 built in code by pixel_diffusers.testing (offline demos and tests).")
    model.add_argument("--max_sequence_length", type=int, default=511)
    loss = parser.add_argument_group("loss")
    loss.add_argument("--t_eps", type=float, default=0.05, help="Training times t = 1 - sigma lie in [t_eps, 1-t_eps].")
    loss.add_argument("--freq_loss_weight", type=float, default=1.0, help="0 disables the frequency loss.")
    loss.add_argument("--freq_quality", type=int, default=90)
    loss.add_argument("--repa_encoder_name_or_path", type=str, default=None, help="DINOv3 model; None disables REPA.")
    loss.add_argument("--repa_weight", type=float, default=0.5)
    loss.add_argument("--repa_early_stop", type=int, default=10000, help="REPA applies to steps below this.")
    loss.add_argument("--gamma_l2_weight", type=float, default=1e-4)
    sampling = parser.add_argument_group("validation sampling")
    sampling.add_argument("--validation_num_inference_steps", type=int, default=20)
    sampling.add_argument("--validation_guidance_scale", type=float, default=4.0)
    sampling.add_argument("--validation_resolution", type=int, default=None, help="Defaults to --min_resolution.")
    return parser


def load_pipeline(args) -> PixelHDMPipeline:
    """The pipeline whose transformer is trained: from a pretrained pipeline, or a preset with a text encoder."""
    if args.pretrained_model_name_or_path:
        pipe = PixelHDMPipeline.from_pretrained(args.pretrained_model_name_or_path)
        if args.preset is None:
            return pipe
        components = dict(pipe.components)
    elif args.preset is None:
        raise ValueError("Give --pretrained_model_name_or_path or --preset.")
    else:
        components = {"scheduler": PixelFlowMatchScheduler(**DEFAULT_SCHEDULER_CONFIG)}
    transformer = PixelHDMTransformer2DModel.from_preset(args.preset, **(args.transformer_config or {}))
    components["transformer"] = transformer
    if args.tiny_text_encoder:
        from pixel_diffusers.testing import make_tiny_qwen3_text_encoder, make_tiny_tokenizer

        components["text_encoder"] = make_tiny_qwen3_text_encoder(transformer.config.text_embed_dim, seed=args.seed)
        components["tokenizer"] = make_tiny_tokenizer()
    elif args.text_encoder_name_or_path:
        from transformers import AutoModel, AutoTokenizer

        components["text_encoder"] = AutoModel.from_pretrained(args.text_encoder_name_or_path)
        components["tokenizer"] = AutoTokenizer.from_pretrained(args.text_encoder_name_or_path)
    elif "text_encoder" not in components:
        raise ValueError("A fresh transformer needs --text_encoder_name_or_path, --tiny_text_encoder or a pipeline.")
    return PixelHDMPipeline(**components)


def main(argv: list[str] | None = None) -> TrainingState:
    args = parse_args(build_parser(), argv)
    accelerator = make_accelerator(args, "train_pixelhdm")
    set_seed(args.seed)  # the same fresh weights on every process and every run
    device = accelerator.device
    with frozen_models_unpartitioned(accelerator):  # the frozen Qwen3 text encoder, whole under ZeRO-3
        pipe = load_pipeline(args)
    if pipe.transformer.config.get("sample_size") is None:  # the saved pipeline generates at the training size by default
        pipe.transformer.register_to_config(sample_size=args.validation_resolution or args.min_resolution)
        pipe.default_sample_size = pipe.transformer.config.sample_size
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.train()
    pipe.text_encoder.requires_grad_(False).eval().to(device)
    if args.lora_rank:
        add_lora_adapter(transformer, args.lora_rank, args.lora_alpha)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    frequency_loss = FrequencyLoss(args.freq_quality, args.freq_loss_weight).to(device) if args.freq_loss_weight else None
    dino = repa_loss = None
    if args.repa_encoder_name_or_path:
        with frozen_models_unpartitioned(accelerator):
            dino = DINOv3Features.from_pretrained(args.repa_encoder_name_or_path).to(device)
        repa_loss = REPALoss(transformer.config.hidden_size, dino.feature_dim, args.repa_weight)

    named = list(transformer.named_parameters())
    if repa_loss is not None:
        named += [(f"repa.{n}", p) for n, p in repa_loss.named_parameters()]
    optimizer = build_optimizer(
        named, args.optimizer, args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon,
        args.adam_weight_decay,
    )
    batches, dataset = build_image_batches(args, accelerator.num_processes, accelerator.process_index)
    resolve_training_length(args, batches)
    lr_scheduler = lr_scheduler_from_args(args, optimizer, accelerator)

    run = TrainingRun.prepare(
        accelerator, args, transformer, optimizer, lr_scheduler, batches, dataset,
        extra_modules=(repa_loss,) if repa_loss is not None else (),
    )
    transformer, model, ema, state = run.model, run.unwrapped, run.ema, run.state
    if repa_loss is not None:
        (repa_loss,) = run.extra_modules

    def micro_step(batch, generator) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"].to(device)
        with torch.no_grad():
            embeds, mask, _, _ = pipe.encode_prompt(
                batch["captions"], do_classifier_free_guidance=False, device=device,
                max_sequence_length=args.max_sequence_length,
            )
            pooled = PixelHDMPipeline.pool_prompt_embeds(embeds, mask)
        sigmas = sample_flow_sigmas(
            len(pixels), generator, args.weighting_scheme, args.logit_mean, args.logit_std, args.t_eps,
            mode_scale=args.mode_scale,
        ).to(device)
        noise = torch.randn(pixels.shape, generator=generator).to(device)
        noisy = (1 - sigmas.view(-1, 1, 1, 1)) * pixels + sigmas.view(-1, 1, 1, 1) * noise
        use_repa = repa_loss is not None and state.step < args.repa_early_stop
        with accelerator.autocast():
            output = transformer(
                noisy, timestep=sigmas * 1000, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                pooled_projections=pooled, return_aux=use_repa or args.gamma_l2_weight > 0,
            )
        prediction, target = output.sample.float(), pixels - noise
        weights = flow_loss_weights(args.weighting_scheme, sigmas)
        terms = {"v_loss": (weights * (prediction - target).square().mean(dim=(1, 2, 3))).mean()}
        if frequency_loss is not None:
            terms["freq_loss"] = frequency_loss(prediction, target)
        if use_repa:
            features, feature_grid = dino(pixels)
            grid = (pixels.shape[-2] // model.config.patch_size, pixels.shape[-1] // model.config.patch_size)
            terms["repa_loss"] = repa_loss(output.repa_features, grid, features, feature_grid)
        if args.gamma_l2_weight > 0:
            terms["gamma_l2"] = args.gamma_l2_weight * output.gamma_l2.float()
        loss = sum(terms.values())
        accelerator.backward(loss)
        return {name: value.detach() for name, value in terms.items()} | {"loss": loss.detach(), "images": len(pixels)}

    trainable = [p for p in transformer.parameters() if p.requires_grad]
    if repa_loss is not None:
        trainable += list(repa_loss.parameters())
    run.train(
        accelerator, args, batches, micro_step, trainable,
        validate=lambda step: sample_validation_grid(
            pipe, model, ema, args, accelerator, step, f"step-{step}", max_sequence_length=args.max_sequence_length
        ),
    )
    save_outputs(pipe, run, repa_loss and accelerator.unwrap_model(repa_loss), args, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state


def save_outputs(pipe, run, repa_loss, args, accelerator) -> None:
    """Writes the final pipeline (or LoRA) of `run`, the REPA projector and a sample grid (every process takes part,
    the main one writes); pushes them when asked."""
    state = run.state
    grid = sample_validation_grid(
        pipe, run.unwrapped, run.ema, args, accelerator, state.step, "final", max_sequence_length=args.max_sequence_length
    )
    card = {}
    if grid is not None:
        resolution = args.validation_resolution or args.min_resolution
        card = {"height": resolution, "width": resolution, "prompt": validation_prompts(args)[0]}

    folder = run.save_final_outputs(accelerator, args, pipe, "transformer", grid, card)
    if repa_loss is not None:
        projector = run.engine.full_state_dict(repa_loss.projector, keep=accelerator.is_main_process)
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in projector.items()}, Path(args.output_dir) / "repa_projector.safetensors")
    if folder is None:
        return
    logger.info("Saved %s after %d steps (%d images, %d skipped files).", folder, state.step, state.images_seen,
                state.skipped_files)


if __name__ == "__main__":
    main(sys.argv[1:])
