"""Forward time and memory of the real-size pixel-space SDXL U-Net against diffusers' SDXL U-Net, in one run.

Configurations (batch 1, bfloat16 by default):
- `PixelSDXLUNet2DConditionModel` "patch16" and "patch32" on a 1024² image;
- diffusers' `UNet2DConditionModel` with SDXL's config on the equivalent 128² latent (what SDXL's U-Net sees for a
  1024² image; the VAE is not counted).

For each it reports the median forward time, FLOPs (torch's FlopCounterMode), achieved TFLOP/s against the
matrix-multiply peak of the same dtype measured in the same run, and memory: peak resident memory of the process
(CPU; each configuration runs in its own process) or peak allocated memory (CUDA). Weights are random (speed does not
depend on them), built in code from the configs: nothing is downloaded.

    python benchmarks/bench_pixel_sdxl.py --output benchmarks/results/bench_pixel_sdxl.json

On a small CPU machine keep the defaults (one FLOP-counting pass that doubles as the warm-up, then 1 timed forward):
each bf16 model holds about 5 GiB of weights (the machine needs about 6 GiB free per configuration, run one after
the other), and at 1024² a forward of the full SDXL U-Net takes minutes on two cores; `--resolution 256` is a quick
check.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIGS = ("patch16", "patch32", "sdxl")


def _timed(fn, repeats: int, device: str, warm_up: bool = True) -> float:
    def synced():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    if warm_up:
        synced()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synced()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, device: str, size: int = 4096, repeats: int = 5) -> float:
    """Best achieved TFLOP/s of a square matrix multiply of `size` in `dtype`."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return 2 * size**3 / _timed(lambda: torch.mm(a, b), repeats, device) / 1e12


def _build(name: str, dtype: torch.dtype, device: str):
    """The model on `device` in `dtype`, with N(0, 0.02) weights (built on the meta device, then filled: fast)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    from pixel_diffusers.models.unets.unet_pixel_sdxl import PixelSDXLUNet2DConditionModel

    with torch.device("meta"):
        if name == "sdxl":
            model = UNet2DConditionModel(
                sample_size=128,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
        else:
            model = PixelSDXLUNet2DConditionModel.from_preset(name)
    logging.set_verbosity_error()  # silence the note about casting with `to()` (no module needs float32 here)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def _forward_job(queue, name: str, dtype_name: str, resolution: int, repeats: int, device: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = _build(name, dtype, device)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    side, channels = (resolution // 8, 4) if name == "sdxl" else (resolution, 3)
    inputs = dict(
        sample=torch.randn(1, channels, side, side, dtype=dtype, device=device),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=torch.randn(1, 77, 2048, dtype=dtype, device=device),
        added_cond_kwargs={
            "text_embeds": torch.randn(1, 1280, dtype=dtype, device=device),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype, device=device),
        },
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(**inputs)
        seconds = _timed(lambda: model(**inputs), repeats, device, warm_up=False)  # the counted pass warmed up
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put(
        {
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_gib": weights_gib,
            "flops": counter.get_total_flops(),
            "seconds": seconds,
            "peak_memory_gib": peak,
        }
    )


def _in_subprocess(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (SDXL gets side / 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards after one warm-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="benchmarks/results/bench_pixel_sdxl.json")
    args = parser.parse_args(argv)

    peak = matmul_peak(DTYPES[args.dtype], args.device)
    rows = {}
    for name in args.configs:
        rows[name] = _in_subprocess(_forward_job, name, args.dtype, args.resolution, args.repeats, args.device)
        rows[name]["tflops"] = rows[name]["flops"] / rows[name]["seconds"] / 1e12
        rows[name]["fraction_of_matmul_peak"] = rows[name]["tflops"] / peak
    if "sdxl" in rows:
        for row in rows.values():
            row["time_vs_sdxl"] = row["seconds"] / rows["sdxl"]["seconds"]
            row["flops_vs_sdxl"] = row["flops"] / rows["sdxl"]["flops"]

    memory = "peak allocated GiB" if args.device == "cuda" else "peak RSS GiB"
    print(f"device {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"{args.dtype}, {args.resolution}² image, batch 1; matmul peak {peak:.3f} TFLOP/s")
    print(f"{'config':<9} {'params':>14} {'GFLOP':>9} {'seconds':>9} {'TFLOP/s':>8} {'% peak':>7} {memory:>19} {'time/SDXL':>10}")
    for name, row in rows.items():
        ratio = f"{row['time_vs_sdxl']:.3f}" if "time_vs_sdxl" in row else "-"
        print(
            f"{name:<9} {row['parameters']:>14,} {row['flops'] / 1e9:>9.0f} {row['seconds']:>9.3f} {row['tflops']:>8.3f} "
            f"{100 * row['fraction_of_matmul_peak']:>6.1f}% {row['peak_memory_gib']:>19.2f} {ratio:>10}"
        )
    result = {
        "device": args.device,
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "resolution": args.resolution,
        "repeats": args.repeats,
        "matmul_peak_tflops": peak,
        "configs": rows,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
