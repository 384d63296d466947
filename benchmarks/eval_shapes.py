#!/usr/bin/env python
"""Prompt adherence on the synthetic shapes set, scored by pixel classifiers (no learned judge).

    python benchmarks/eval_shapes.py --pipeline shapes-pixelhdm/pipeline --num_images 64
    python benchmarks/eval_shapes.py --pipeline checkpoints/shapes-pixelhdm --solver heun --time_grid linear --num_inference_steps 20

Text-to-image pipelines get prompts "a <colour> <shape> on a <background> background" cycling over every
combination, the held-out ones included; class-conditional pipelines (a `class_labels` argument) get the class of
each trained (shape, colour) pair (a held-out pair's label was never trained). Prints JSON: color_accuracy,
shape_accuracy, class_accuracy (both right), background_accuracy (text only) and the same on held-out combinations.
Sampling uses the pipeline's own defaults (scheduler and step count) unless ``--num_inference_steps``, ``--solver`` or
``--time_grid`` say otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import pixel_diffusers  # noqa: F401 - registers our pipelines with diffusers
from diffusers import DiffusionPipeline
from pixel_diffusers.pipelines import validation
from pixel_diffusers.schedulers import PixelFlowMatchScheduler
from pixel_diffusers.schedulers.scheduling_pixel_flow import SOLVERS, TIME_GRIDS
from pixel_diffusers.training_utils import image_grid, shapes


def is_class_conditional(pipe) -> bool:
    return "class_labels" in inspect.signature(pipe.__call__).parameters


def conditioning(pipe, combos) -> dict:
    """The call arguments naming each combination: class labels for a class-conditional pipeline, else prompts."""
    if is_class_conditional(pipe):
        return {"class_labels": [shapes.class_label(shape, color) for shape, color, _ in combos]}
    return {"prompt": [shapes.caption(*combo) for combo in combos]}


def generate(pipe, combos, args) -> list:
    images = []
    progress = tqdm(total=len(combos), unit="image", desc="generating", disable=args.quiet)
    for start in range(0, len(combos), args.batch_size):
        chunk = combos[start : start + args.batch_size]
        kwargs = {
            "height": args.resolution,
            "width": args.resolution,
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "generator": torch.Generator().manual_seed(args.seed + start),
        }
        images += pipe(**kwargs, **conditioning(pipe, chunk)).images
        progress.update(len(chunk))
    progress.close()
    return images


def score(images, combos, text_conditional: bool) -> dict:
    held_out = set(shapes.HELD_OUT)
    rows = []
    for image, (shape, color, background) in zip(images, combos):
        array = np.asarray(image.convert("RGB"))
        rows.append(
            {
                "color": shapes.classify_color(array) == color,
                "shape": shapes.classify_shape(array) == shape,
                "background": shapes.classify_background(array) == background,
                "held_out": (shape, color) in held_out,
            }
        )

    def rate(subset, key):
        return round(float(np.mean([r[key] for r in subset])), 4) if subset else None

    result = {"num_images": len(rows)}
    for prefix, subset in (("", rows), ("held_out_", [r for r in rows if r["held_out"]])):
        result[f"{prefix}color_accuracy"] = rate(subset, "color")
        result[f"{prefix}shape_accuracy"] = rate(subset, "shape")
        for r in subset:
            r["class"] = r["color"] and r["shape"]
        result[f"{prefix}class_accuracy"] = rate(subset, "class")
        if text_conditional:
            result[f"{prefix}background_accuracy"] = rate(subset, "background")
    result["num_held_out"] = sum(r["held_out"] for r in rows)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="A saved pipeline folder or Hub id.")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the pipeline's.")
    parser.add_argument("--solver", choices=SOLVERS, default=None, help="Default: the pipeline scheduler's.")
    parser.add_argument("--time_grid", choices=TIME_GRIDS, default=None, help="Default: the pipeline scheduler's.")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=str, default=None, help="Also save the generated images as one PNG grid.")
    parser.add_argument("--output", type=str, default=None, help="Also write the JSON here.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar (it goes to stderr; the JSON to stdout).")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {args.num_images}.")

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead (see `generate`)
    overrides = {key: value for key, value in (("solver", args.solver), ("time_grid", args.time_grid)) if value}
    if overrides:
        if not isinstance(pipe.scheduler, PixelFlowMatchScheduler):
            name = type(pipe.scheduler).__name__
            raise ValueError(f"--solver and --time_grid need a PixelFlowMatchScheduler, not {name}.")
        pipe.scheduler = PixelFlowMatchScheduler.from_config(pipe.scheduler.config, **overrides)
    if args.num_inference_steps is None:
        args.num_inference_steps = validation.call_default(pipe, "num_inference_steps")
    class_conditional = is_class_conditional(pipe)
    combos = shapes.evaluation_prompts(args.num_images, seed=args.seed, include_held_out=not class_conditional)
    images = generate(pipe, combos, args)
    result = {
        "pipeline": type(pipe).__name__,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
        "solver": pipe.scheduler.config.get("solver"),
        "time_grid": pipe.scheduler.config.get("time_grid"),
        **score(images, combos, not class_conditional),
    }
    if args.grid:
        image_grid(images, columns=8).save(args.grid)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
