"""Speed and memory of the real-size PixelHDM transformer and pipeline.

For the `default` preset (356M parameters) at 256² and 512², batch 1, float32 and bfloat16, it measures:
- the transformer forward time and its achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode), against the
  matrix-multiply peak of the same dtype measured in the same run;
- peak resident memory of each configuration (each runs in its own process);
- the pipeline overhead: wall time of a full `PixelHDMPipeline` call over the sum of its transformer calls.

    python benchmarks/bench_pixelhdm.py --output benchmarks/results/bench_pixelhdm.json

Prints a table and writes JSON. Weights are random (speed does not depend on them); the text encoder of the
pipeline measurement is a tiny Qwen3 of the right width, so that its cost is part of the overhead, as a real one is.
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """Best achieved TFLOP/s of a square matrix multiply of `size` in `dtype`."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    seconds = _timed(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds / 1e12


def _forward_job(queue, dtype_name: str, resolution: int, text_tokens: int, repeats: int, preset: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from pixel_diffusers import PixelHDMTransformer2DModel

    torch.manual_seed(0)
    model = PixelHDMTransformer2DModel.from_preset(preset).to(DTYPES[dtype_name]).eval()
    dtype = DTYPES[dtype_name]
    inputs = dict(
        hidden_states=torch.randn(1, 3, resolution, resolution, dtype=dtype),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, text_tokens, model.config.text_embed_dim, dtype=dtype),
        encoder_attention_mask=torch.ones(1, text_tokens, dtype=torch.long),
        pooled_projections=torch.randn(1, model.config.text_embed_dim, dtype=dtype),
    )
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(**inputs)
        seconds = _timed(lambda: model(**inputs), repeats)
    queue.put(
        {
            "flops": counter.get_total_flops(),
            "seconds": seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
    )


def _pipeline_job(queue, dtype_name: str, resolution: int, steps: int, preset: str) -> None:
    from pixel_diffusers import PixelFlowMatchScheduler, PixelHDMPipeline, PixelHDMTransformer2DModel
    from pixel_diffusers.testing import make_tiny_qwen3_text_encoder, make_tiny_tokenizer

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    transformer = PixelHDMTransformer2DModel.from_preset(preset).to(dtype).eval()
    pipe = PixelHDMPipeline(
        transformer=transformer,
        scheduler=PixelFlowMatchScheduler(solver="euler"),
        text_encoder=make_tiny_qwen3_text_encoder(transformer.config.text_embed_dim).to(dtype),
        tokenizer=make_tiny_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    transformer_seconds = []

    def before(module, args, kwargs):
        module._started = time.perf_counter()

    def after(module, args, kwargs, output):
        transformer_seconds.append(time.perf_counter() - module._started)

    transformer.register_forward_pre_hook(before, with_kwargs=True)
    transformer.register_forward_hook(after, with_kwargs=True)

    def run():
        transformer_seconds.clear()
        pipe(
            "a red circle on a blue background, photographed from above",
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
        )

    run()  # warm-up
    start = time.perf_counter()
    run()
    total = time.perf_counter() - start
    queue.put({"pipeline_seconds": total, "transformer_seconds": sum(transformer_seconds), "calls": len(transformer_seconds)})


def _in_subprocess(target, *args) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--text_tokens", "--text-tokens", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline_resolution", "--pipeline-resolution", type=int, default=256)
    parser.add_argument("--pipeline_steps", "--pipeline-steps", type=int, default=4)
    parser.add_argument("--output", default="benchmarks/results/bench_pixelhdm.json")
    args = parser.parse_args()

    peaks = {name: matmul_peak(dtype) for name, dtype in DTYPES.items() if name in args.dtypes}
    rows = []
    for resolution in args.resolutions:
        for dtype_name in args.dtypes:
            result = _in_subprocess(_forward_job, dtype_name, resolution, args.text_tokens, args.repeats, args.preset)
            tflops = result["flops"] / result["seconds"] / 1e12
            rows.append(
                {
                    "resolution": resolution,
                    "dtype": dtype_name,
                    "forward_ms": result["seconds"] * 1e3,
                    "gflop": result["flops"] / 1e9,
                    "tflops": tflops,
                    "fraction_of_matmul_peak": tflops / peaks[dtype_name],
                    "peak_rss_gib": result["peak_rss_gib"],
                }
            )
    pipeline_dtype = "bfloat16" if "bfloat16" in args.dtypes else args.dtypes[0]
    pipeline = _in_subprocess(_pipeline_job, pipeline_dtype, args.pipeline_resolution, args.pipeline_steps, args.preset)
    pipeline.update(
        dtype=pipeline_dtype,
        resolution=args.pipeline_resolution,
        steps=args.pipeline_steps,
        overhead=pipeline["pipeline_seconds"] / pipeline["transformer_seconds"] - 1,
    )

    print(f"matmul peak (4096³): " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()))
    print(f"{'res':>5} {'dtype':>9} {'forward ms':>11} {'GFLOP':>8} {'TFLOP/s':>8} {'of peak':>8} {'peak RSS GiB':>13}")
    for row in rows:
        print(
            f"{row['resolution']:>5} {row['dtype']:>9} {row['forward_ms']:>11.1f} {row['gflop']:>8.1f} "
            f"{row['tflops']:>8.3f} {row['fraction_of_matmul_peak']:>8.1%} {row['peak_rss_gib']:>13.2f}"
        )
    print(
        f"pipeline ({pipeline_dtype}, {args.pipeline_resolution}², {args.pipeline_steps} steps, CFG, "
        f"{pipeline['calls']} transformer calls): {pipeline['pipeline_seconds']:.2f} s total, "
        f"{pipeline['transformer_seconds']:.2f} s in the transformer, overhead {pipeline['overhead']:.2%}"
    )
    report = {
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "preset": args.preset,
        "text_tokens": args.text_tokens,
        "matmul_peak_tflops": peaks,
        "forward": rows,
        "pipeline": pipeline,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
