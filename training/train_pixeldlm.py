#!/usr/bin/env python
"""Train PixelDLM: pre-training on plain text, or conditional fine-tuning on prompt / answer pairs.

    accelerate launch training/train_pixeldlm.py --data data/train --tokenizer_name_or_path Qwen/Qwen2.5-7B-Instruct \
        --output_dir pixeldlm-pretrain --preset PixelDLM-B/4
    accelerate launch training/train_pixeldlm.py --data sft.json --pretrained_model pixeldlm-pretrain/pipeline \
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
    SAVE_DTYPES,
    AdaptiveGradClip,
    addition_pairs,
    exact_match,
    CheckpointManager,
    TrainingState,
    add_common_training_args,
    lr_scheduler_from_args,
    build_optimizer,
    make_accelerator,
    parse_args,
    push_checkpoint,
    step_generator,
    training_config_yaml,
)

logger = logging.getLogger("train_pixeldlm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    group = parser.add_argument_group("PixelDLM")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=str, help="JSON/JSONL/TXT file or a folder of them.")
    source.add_argument("--synthetic_addition", action="store_true",
                        help='The 64 built-in pairs "13+27=" -> "40" (training_utils.addition_pairs).')
    group.add_argument("--pretrained_model", type=str, default=None, help="A PixelDLMPipeline folder or Hub id.")
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
    group.add_argument("--num_validation_items", type=int, default=64, help="Items whose answers are decoded at the end.")
    return parser


def read_items(path: str | Path) -> tuple[list[dict], int]:
    """Items `{"text"}` / `{"prompt", "answer"}` from a file or folder, and the number of unreadable files/items."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".txt")) if path.is_dir() else [path]
    items, skipped = [], 0
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
            if file.suffix == ".txt":
                raw = [{"text": line} for line in text.splitlines() if line.strip()]
            elif file.suffix == ".jsonl":
                raw = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                raw = json.loads(text)
                raw = raw if isinstance(raw, list) else [raw]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            logger.warning("skipping unreadable %s: %s", file, error)
            skipped += 1
            continue
        for item in raw:
            if isinstance(item, dict) and isinstance(item.get("answer"), str) and isinstance(item.get("prompt"), str):
                items.append({"prompt": item["prompt"], "answer": item["answer"]})
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                items.append({"prompt": None, "answer": item["text"]})
            else:
                skipped += 1
    if not items:
        raise ValueError(f"--data={str(path)!r} holds no {{'text'}} or {{'prompt', 'answer'}} items.")
    return items, skipped


def load_pipeline(args) -> PixelDLMPipeline:
    if args.pretrained_model:
        pipe = PixelDLMPipeline.from_pretrained(args.pretrained_model)
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
        raise ValueError("A fresh model needs --tokenizer_name_or_path or --tiny_tokenizer (or --pretrained_model).")
    transformer = JiTTransformer2DModel.from_preset(args.preset, **(args.transformer_config or {}))
    scheduler = PixelFlowMatchScheduler(solver="euler", prediction_type="flow_prediction")
    return PixelDLMPipeline(transformer, scheduler, tokenizer, color_levels=args.color_levels or 256)


class ItemBatches:
    """Shuffled batches of item indices, one permutation per epoch from (seed, epoch, rank); resumable exactly."""

    def __init__(self, num_items: int, batch_size: int, seed: int, num_replicas: int, rank: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.position = 0

    def next(self) -> list[int]:
        batch = []
        for _ in range(self.batch_size):
            epoch, offset = divmod(self.position * self.num_replicas + self.rank, self.num_items)
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            batch.append(int(order[offset]))
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def main(argv: list[str] | None = None) -> None:
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
    codec, tokenizer = pipe.codec, pipe.tokenizer
    transformer = pipe.transformer.train()
    if transformer.config.architecture != "pixeldlm":
        raise ValueError("The transformer must have architecture='pixeldlm'.")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    items, skipped = (addition_pairs(), 0) if args.synthetic_addition else read_items(args.data)

    optimizer = build_optimizer(list(transformer.named_parameters()), args.optimizer, args.learning_rate,
                                (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.adam_weight_decay)
    processes = accelerator.num_processes
    lr_scheduler = lr_scheduler_from_args(args, optimizer, processes)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(list(transformer.parameters()), decay=args.ema_decay)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(transformer)
    batches = ItemBatches(len(items), args.train_batch_size, args.seed, processes, accelerator.process_index)
    clipper = AdaptiveGradClip(args.max_grad_norm, args.zclip_threshold)
    state = TrainingState(step=0, texts_seen=0, skipped_items=skipped)
    for stateful in (batches, clipper, state) + ((ema,) if ema is not None else ()):
        accelerator.register_for_checkpointing(stateful)
    checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit)
    checkpoints.resume(accelerator, args.resume_from_checkpoint)
    if ema is not None:
        ema.to(device)

    def micro_step(indices: list[int], generator: torch.Generator) -> torch.Tensor:
        chunk = [items[i] for i in indices]
        target, mask = codec.encode_text(tokenizer, [item["answer"] for item in chunk], truncate=True)
        condition, _ = codec.encode_text(tokenizer, [item["prompt"] or "" for item in chunk], truncate=True)
        keep = torch.tensor([item["prompt"] is not None for item in chunk])
        keep &= torch.rand(len(chunk), generator=generator) >= args.condition_dropout
        sigmas = torch.randint(0, 1000, (len(chunk),), generator=generator).float() / 1000  # upstream's integer t
        noise = torch.randn(target.shape, generator=generator)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * target + s * noise
        with accelerator.autocast():
            prediction = transformer(noisy.to(device), sigmas.to(device) * 1000, condition=condition.to(device),
                                     condition_mask=keep.to(device)).sample.float()
        weight = mask + args.pad_loss_weight * (1 - mask)
        weight = weight.to(device)[:, None].expand_as(prediction)
        loss = (weight * (prediction - target.to(device)) ** 2).sum() / weight.sum().clamp(min=1)
        accelerator.backward(loss / args.gradient_accumulation_steps)
        return loss.detach()

    logger.info("Training on %d items (%d skipped) from step %d to %d.", len(items), skipped, state.step, args.max_train_steps)
    while state.step < args.max_train_steps:
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            generator = step_generator(args.seed, state.step * args.gradient_accumulation_steps + micro, accelerator.process_index)
            losses.append(micro_step(batches.next(), generator))
        grad_norm = clipper.clip(accelerator, list(transformer.parameters()))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        state.step += 1
        state.texts_seen += args.train_batch_size * args.gradient_accumulation_steps * processes
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        accelerator.log({"loss": loss, "grad_norm": grad_norm, "lr": lr_scheduler.get_last_lr()[0]}, step=state.step)
        if state.step % 50 == 0 or state.step == 1:
            logger.info("step %d: loss=%.4g grad_norm=%.4g lr=%.3g", state.step, loss, grad_norm, lr_scheduler.get_last_lr()[0])
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            path = checkpoints.save(accelerator, state.step)
            if args.push_checkpoints_to_hub and accelerator.is_main_process:
                push_checkpoint(args, path)

    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(model.parameters())
        pipe.transformer = model.eval()
        folder = Path(args.output_dir) / "pipeline"
        pipe.to(dtype=SAVE_DTYPES[args.save_precision]).save_pretrained(folder)
        pairs = [item for item in items if item["prompt"] is not None][: args.num_validation_items]
        accuracy = exact_match(pipe, pairs, args.validation_num_inference_steps, seed=args.seed) if pairs else None
        result = {"step": state.step, "exact_match": accuracy, "num_items": len(pairs)}
        (Path(args.output_dir) / "exact_match.json").write_text(json.dumps(result))
        logger.info("exact-match accuracy on %d prompt/answer items: %s", len(pairs), accuracy)
        if args.push_to_hub:
            card = {"training_config": training_config_yaml(args), "exact_match": accuracy}
            pipe.save_pretrained(folder, push_to_hub=True, repo_id=args.hub_model_id, token=args.hub_token,
                                 private=args.hub_private_repo or None, model_card_kwargs=card)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
