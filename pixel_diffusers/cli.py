"""The `pixel-diffusers` command line: generate images, convert upstream checkpoints, run the offline demo."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .conversion.jit import add_subparser as add_jit_converters
from .conversion.pixel_sdxl import add_subparser as add_pixel_sdxl_converter
from .conversion.post_hoc_ema import add_subparser as add_post_hoc_ema_subparser
from .conversion.smalldiffusion import add_subparser as add_smalldiffusion_converter
from .conversion.strict import add_convert_command, save_converted

DTYPES = ("float32", "bfloat16", "float16")


def _generate(pipeline, prompts, args, output: Path) -> list[Path]:
    import torch

    from .training_utils.config import image_grid

    output.mkdir(parents=True, exist_ok=True)
    steps = {} if args.num_inference_steps is None else {"num_inference_steps": args.num_inference_steps}
    images = pipeline(
        prompts,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images_per_prompt,
        generator=torch.Generator().manual_seed(args.seed),
        **steps,
    ).images
    paths = []
    for index, image in enumerate(images):
        paths.append(output / f"image_{index:03d}.png")
        image.save(paths[-1])
    grid_path = output / "grid.png"
    image_grid(images, columns=min(len(images), 4)).save(grid_path)
    return paths + [grid_path]


def cmd_generate(args) -> None:
    import torch

    from pixel_diffusers import PixelHDMPipeline

    pipeline = PixelHDMPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    pipeline.to(args.device)
    for path in _generate(pipeline, args.prompt, args, Path(args.output_dir)):
        print(path)


def cmd_demo(args) -> None:
    from pixel_diffusers import PixelHDMPipeline
    from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline

    output = Path(args.output_dir)
    model_dir = output / "tiny-pixelhdm"
    make_tiny_pixelhdm_pipeline(seed=0).save_pretrained(model_dir)
    print(f"saved an untrained tiny PixelHDM pipeline to {model_dir}")
    pipeline = PixelHDMPipeline.from_pretrained(model_dir)
    for path in _generate(pipeline, args.prompt, args, output / "images"):
        print(path)


def cmd_convert(args) -> None:
    from pixel_diffusers.conversion import convert_pixelhdm_checkpoint

    save_converted(*convert_pixelhdm_checkpoint(args.src, use_ema=not args.no_ema, preset=args.preset), args.dst)


def cmd_analytic(args) -> None:
    from .pipelines.analytic.studio import load_config, run

    metrics = run(load_config(args.config))
    print(json.dumps({key: value for key, value in metrics.items() if key != "comparison_details"}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixel-diffusers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    # Flags are spelled as in diffusers' scripts (underscores); the hyphenated spellings are accepted too.
    def add_sampling_arguments(sub, default_prompts, height, steps):
        sub.add_argument("--prompt", nargs="+", default=default_prompts, help="one or more prompts")
        sub.add_argument("--negative_prompt", "--negative-prompt", default=None)
        sub.add_argument("--height", type=int, default=height, help="default: the resolution the model was trained at")
        sub.add_argument("--width", type=int, default=height, help="default: the resolution the model was trained at")
        sub.add_argument("--num_inference_steps", "--num-inference-steps", "--steps", type=int, default=steps,
                         help="default: the pipeline's own" if steps is None else None)
        sub.add_argument("--guidance_scale", "--guidance-scale", type=float, default=3.0)
        sub.add_argument("--num_images_per_prompt", "--num-images-per-prompt", "--images-per-prompt", type=int, default=1)
        sub.add_argument("--seed", type=int, default=0)

    generate = commands.add_parser("generate", help="generate images with a saved PixelHDM pipeline")
    generate.add_argument("--model", required=True, help="a local pipeline folder or a Hub repo id")
    generate.add_argument("--output_dir", "--output-dir", default="generated")
    generate.add_argument("--dtype", choices=DTYPES, default="float32")
    generate.add_argument("--device", default="cpu")
    add_sampling_arguments(generate, ["a red circle on a blue background"], None, None)
    generate.set_defaults(func=cmd_generate)

    analytic = commands.add_parser("analytic", help="fit an analytic denoiser on an image folder or dataset and sample it")
    analytic.add_argument("--config", required=True, help="a YAML or JSON file (see `pixel_diffusers.pipelines.analytic.studio`)")
    analytic.set_defaults(func=cmd_analytic)

    demo = commands.add_parser(
        "demo", help="save an untrained tiny PixelHDM pipeline, load it back and generate (offline, seconds)"
    )
    demo.add_argument("--output_dir", "--output-dir", default="demo_output")
    add_sampling_arguments(
        demo,
        ["a red circle on a blue background", "a green square on a white background",
         "a blue triangle on a yellow background", "a white circle on a black background"],
        64,
        8,
    )
    demo.set_defaults(func=cmd_demo)

    convert = commands.add_parser("convert", help="convert an upstream checkpoint into a pixel_diffusers model")
    systems = convert.add_subparsers(dest="system", required=True)
    pixelhdm = add_convert_command(
        systems, "pixelhdm", "an upstream PixelHDM .pt/.pth/.safetensors checkpoint", cmd_convert,
        "the upstream checkpoint file", "the folder to save the converted PixelHDMTransformer2DModel to",
    )
    pixelhdm.add_argument("--no_ema", "--no-ema", action="store_true", help="convert the raw weights instead of the EMA ones")
    pixelhdm.add_argument("--preset", default=None, help="the architecture preset when the checkpoint has no config")
    add_pixel_sdxl_converter(systems)
    add_jit_converters(systems)
    add_smalldiffusion_converter(systems)
    add_post_hoc_ema_subparser(commands)
    return parser


_MISSING_CLASS = re.compile(r"module '?diffusers'? has no attribute '?(\w+)'?")


def error_message(error: BaseException) -> str:
    """One line a user can act on, for an error raised by a command."""
    text = " ".join(str(error).split()) or type(error).__name__
    missing = _MISSING_CLASS.search(text)
    if isinstance(error, AttributeError) and missing:
        return (
            f"{missing.group(1)} is not a diffusers class: it comes from pixel_diffusers, so run `import "
            "pixel_diffusers` before `diffusers.DiffusionPipeline.from_pretrained(...)`."
        )
    return text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}"


def main(argv: list[str] | None = None) -> None:
    """Runs a command; an error is printed as one line (`PIXEL_DIFFUSERS_TRACEBACK=1` shows the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    except Exception as error:
        if os.environ.get("PIXEL_DIFFUSERS_TRACEBACK"):
            raise
        parser.exit(1, f"{parser.prog} {args.command}: error: {error_message(error)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
