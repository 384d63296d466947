#!/usr/bin/env python
"""Train PixelDLM: pre-training on plain text, or conditional fine-tuning on prompt / answer pairs.

    accelerate launch training/train_pixeldlm.py --data data/train --tokenizer_name_or_path Qwen/Qwen2.5-7B-Instruct \
        --output_dir pixeldlm-pretrain --preset PixelDLM-B/4
    accelerate launch training/train_pixeldlm.py --data sft.json --pretrained_model_name_or_path pixeldlm-pretrain/pipeline \
        --output_dir pixeldlm-sft --condition_dropout 0.1

Data (upstream's formats): a JSON list (or JSONL) of `{"text"}` (unconditional, pre-training) or
`{"prompt", "answer"}` items (the prompt becomes the condition image), a `.txt` file with one text per line, or a
folder of such files. Unreadable files and items are skipped and counted. `--synthetic_addition` trains on the 64
built-in pairs "13+27=" -> "40"; `training/configs/pixeldlm_addition.yaml` is the tiny recipe that answers them.

The objective is upstream's: `x_t = (1 - sigma) x0 + sigma noise` with `sigma = t / 1000`, t uniform in 0..999, an x0
prediction and the mean squared error over the text pixels (text + EOS; `--pad_loss_weight` adds the padding).
Deliberate differences from upstream `train.py`: the condition is dropped with probability `--condition_dropout`
(upstream never drops it, so its classifier-free guidance cannot work); the prediction is not clamped inside the loss
(clamping zeroes its gradient outside [0, 1]); the model is not given the target mask, which inference cannot know
(upstream trains with it and samples without); one optimiser step per update (upstream steps twice under AMP).
The loop is the shared one (`training_utils.TrainingRun`): progress bar, EMA, ZClip, spike rollback, exact resume;
`--validation_steps` / `--validation_epochs` log the exact-match accuracy of the prompt / answer items.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from pixel_diffusers.models.transformers.transformer_jit import JIT_PRESETS, JiTTransformer2DModel
from pixel_diffusers.pipelines.pixeldlm.pipeline_pixeldlm import PixelDLMPipeline
from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
from pixel_diffusers.training_utils import (
    TextItemBatches,
    TrainingRun,
    TrainingState,
    add_common_training_args,
    add_lora_adapter,
    add_lora_args,
    add_validation_args,
    addition_pairs,
    build_optimizer,
    ema_weights,
    exact_match,
    lr_scheduler_from_args,
    make_accelerator,
    parse_args,
    read_text_items,
    resolve_training_length,
)

logger = logging.getLogger("train_pixeldlm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    add_lora_args(parser)
    add_validation_args(parser, prompts=False)
    group = parser.add_argument_group("PixelDLM")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=str, help="JSON/JSONL/TXT file or a folder of them.")
    source.add_argument("--synthetic_addition", action="store_true",
                        help='The 64 built-in pairs "13+27=" -> "40" (training_utils.addition_pairs).')
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A PixelDLMPipeline folder or Hub id.")
    group.add_argument("--preset", choices=[k for k in JIT_PRESETS if k.startswith("PixelDLM")], default="PixelDLM-B/4")
    group.add_argument("--transformer_config", type=json.loads, default=None, help="JSON overrides of the preset.")
    group.add_argument("--tokenizer_name_or_path", type=str, default=None)
    group.add_argument("--tiny_tokenizer", action="store_true", help="The offline byte-level test tokenizer.")
    group.add_argument(
        "--color_levels", type=int, default=None,
        help="Colour levels per channel of a fresh model's token images (TextPixelCodec); default 256, upstream's. "
        "A small vocabulary trains far faster with fewer, e.g. 7 for the byte-level tokenizer.",
    )
    group.add_argument("--condition_dropout", type=float, default=0.1, help="Probability of training unconditionally.")
    group.add_argument("--pad_loss_weight", type=float, default=0.0, help="Loss weight of padding pixels.")
    group.add_argument("--validation_num_inference_steps", type=int, default=20)
    group.add_argument("--num_validation_items", type=int, default=64, help="Items whose answers are decoded.")
    return parser


def load_pipeline(args) -> PixelDLMPipeline:
    if args.pretrained_model_name_or_path:
        pipe = PixelDLMPipeline.from_pretrained(args.pretrained_model_name_or_path)
        if args.color_levels not in (None, pipe.config.color_levels):
            raise ValueError(
                f"--color_levels={args.color_levels} differs from the pretrained model's {pipe.config.color_levels}; "
                "a trained model keeps the layout it learned."
            )
        return pipe
    if args.tiny_tokenizer:
        from pixel_diffusers.testing import make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
    elif args.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    else:
        raise ValueError(
            "A fresh model needs --tokenizer_name_or_path or --tiny_tokenizer (or --pretrained_model_name_or_path)."
        )
    transformer = JiTTransformer2DModel.from_preset(args.preset, **(args.transformer_config or {}))
    scheduler = PixelFlowMatchScheduler(solver="euler", prediction_type="flow_prediction")
    return PixelDLMPipeline(transformer, scheduler, tokenizer, color_levels=args.color_levels or 256)


def main(argv: list[str] | None = None) -> TrainingState:
    args = parse_args(build_parser(), argv)
    if args.data and args.synthetic_addition:
        raise ValueError("Pass either --data or --synthetic_addition (a config file may set one of them), not both.")
    if not 0.0 <= args.condition_dropout <= 1.0:
        raise ValueError(f"--condition_dropout must lie in [0, 1], got {args.condition_dropout}.")
    accelerator = make_accelerator(args, "train_pixeldlm")
    device = accelerator.device
    set_seed(args.seed)  # the initial weights depend on the seed only
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.train()
    if args.lora_rank:
        add_lora_adapter(transformer, args.lora_rank, args.lora_alpha)
    if transformer.config.architecture != "pixeldlm":
        raise ValueError("The transformer must have architecture='pixeldlm'.")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    items, skipped = (addition_pairs(), 0) if args.synthetic_addition else read_text_items(args.data)
    pairs = [item for item in items if item["prompt"] is not None][: args.num_validation_items]

    optimizer = build_optimizer(list(transformer.named_parameters()), args.optimizer, args.learning_rate,
                                (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay)
    processes = accelerator.num_processes
    batches = TextItemBatches(items, pipe.codec, pipe.tokenizer, args.train_batch_size, args.seed, processes,
                              accelerator.process_index, num_unreadable=skipped)
    resolve_training_length(args, batches)
    lr_scheduler = lr_scheduler_from_args(args, optimizer, accelerator)
    run = TrainingRun.prepare(accelerator, args, transformer, optimizer, lr_scheduler, batches, dataset=batches)
    transformer, model, ema = run.model, run.unwrapped, run.ema

    def micro_step(batch, generator) -> dict:
        target = batch["pixel_values"]
        keep = batch["has_prompt"] & (torch.rand(len(target), generator=generator) >= args.condition_dropout)
        sigmas = torch.randint(0, 1000, (len(target),), generator=generator).float() / 1000  # upstream's integer t
        noise = torch.randn(target.shape, generator=generator)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * target + s * noise
        with accelerator.autocast():
            prediction = transformer(noisy.to(device), sigmas.to(device) * 1000, condition=batch["condition"].to(device),
                                     condition_mask=keep.to(device)).sample.float()
        mask = batch["text_mask"]
        weight = (mask + args.pad_loss_weight * (1 - mask)).to(device)[:, None].expand_as(prediction)
        loss = (weight * (prediction - target.to(device)) ** 2).sum() / weight.sum().clamp(min=1)
        accelerator.backward(loss)
        return {"loss": loss.detach(), "images": len(target)}

    def validate(step: int) -> float | None:
        """Exact match with the EMA weights, decoded on every process (a sharded model answers collectively)."""
        if not pairs:
            return None
        model.eval()
        with ema_weights(ema):
            accuracy = exact_match(pipe, pairs, args.validation_num_inference_steps, seed=args.seed)
        model.train()
        accelerator.log({"exact_match": accuracy}, step=step)
        logger.info("step %d: exact-match accuracy %.3f on %d prompt/answer items", step, accuracy, len(pairs))
        return accuracy

    logger.info("Training on %d items (%d skipped).", len(items), skipped)
    run.train(accelerator, args, batches, micro_step, [p for p in transformer.parameters() if p.requires_grad],
              validate=validate)
    accuracy = validate(run.state.step)  # with the EMA weights, as saved
    folder = run.save_final_outputs(accelerator, args, pipe, "transformer", card_fields={"exact_match": accuracy})
    if folder is not None:
        result = {"step": run.state.step, "exact_match": accuracy, "num_items": len(pairs)}
        (Path(args.output_dir) / "exact_match.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.state


if __name__ == "__main__":
    main(sys.argv[1:])
