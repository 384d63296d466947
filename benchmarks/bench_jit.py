"""Speed of the real-size JiT / PixelDLM transformers and of PixelDLM generation.

- PixelDLM-B/4 (upstream's "JiT-B/4", 127.7M parameters) at 64 x 64: full `PixelDLMPipeline` calls (prompt
  encoding, `--steps` transformer evaluations, decoding), batch 1 and 16, float32 and bfloat16, in images/s and
  token slots/s (an image carries 64 * 64 = 4096 tokens);
- JiT-B/16 (131.1M parameters) at 256 x 256, batch 1: the transformer forward time and its achieved TFLOP/s (FLOPs
  counted by torch's FlopCounterMode) against the matrix-multiply peak of the same dtype measured in the same run.

    python benchmarks/bench_jit.py --output benchmarks/results/bench_jit.json

Prints a table and writes JSON. Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import platform
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


def matmul_peak(dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best achieved TFLOP/s of a square matrix multiply of `size` in `dtype`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _timed(lambda: torch.mm(a, b), repeats) / 1e12


def jit_forward(dtype_name: str, repeats: int, device: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from pixel_diffusers.models.transformers.transformer_jit import JiTTransformer2DModel

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = JiTTransformer2DModel.from_preset("JiT-B/16").to(device=device, dtype=dtype).eval()
    x = torch.randn(1, 3, 256, 256, dtype=dtype, device=device)
    t, y = torch.tensor([500.0], device=device), torch.tensor([1], device=device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(x, t, class_labels=y)
        flops = counter.get_total_flops()

        def run():
            model(x, t, class_labels=y)
            if device == "cuda":
                torch.cuda.synchronize()

        seconds = _timed(run, repeats)
    return {"model": "JiT-B/16", "resolution": 256, "dtype": dtype_name, "gflops": flops / 1e9,
            "seconds": seconds, "tflops_per_s": flops / seconds / 1e12}


def pixeldlm_generation(dtype_name: str, batch: int, steps: int, repeats: int, device: str) -> dict:
    from pixel_diffusers.models.transformers.transformer_jit import JiTTransformer2DModel
    from pixel_diffusers.pipelines.pixeldlm.pipeline_pixeldlm import PixelDLMPipeline
    from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
    from pixel_diffusers.testing import make_tiny_tokenizer

    torch.manual_seed(0)
    model = JiTTransformer2DModel.from_preset("PixelDLM-B/4").to(device=device, dtype=DTYPES[dtype_name]).eval()
    pipe = PixelDLMPipeline(model, PixelFlowMatchScheduler(prediction_type="flow_prediction"), make_tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"question number {i}: what is {i} + {i}?" for i in range(batch)]

    def run():
        pipe(prompts, num_inference_steps=steps, output_type="pt")
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = _timed(run, repeats)
    capacity = model.config.sample_size**2
    return {"model": "PixelDLM-B/4", "resolution": 64, "dtype": dtype_name, "batch": batch, "steps": steps,
            "seconds": seconds, "images_per_s": batch / seconds, "tokens_per_s": batch * capacity / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="PixelDLM sampling steps (upstream's default: 20)")
    parser.add_argument("--batch_sizes", "--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul_size", "--matmul-size", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="benchmarks/results/bench_jit.json")
    args = parser.parse_args()

    rows = {"machine": {"platform": platform.platform(), "device": args.device, "torch": torch.__version__,
                        "threads": torch.get_num_threads()}, "pixeldlm": [], "jit": []}
    for dtype_name in args.dtypes:
        for batch in args.batch_sizes:
            rows["pixeldlm"].append(pixeldlm_generation(dtype_name, batch, args.steps, args.repeats, args.device))
            print(rows["pixeldlm"][-1], flush=True)
        result = jit_forward(dtype_name, args.repeats, args.device)
        if args.device == "cuda":
            a = torch.randn(args.matmul_size, args.matmul_size, dtype=DTYPES[dtype_name], device="cuda")
            seconds = _timed(lambda: (torch.mm(a, a), torch.cuda.synchronize()), 5)
            peak = 2 * args.matmul_size**3 / seconds / 1e12
        else:
            peak = matmul_peak(DTYPES[dtype_name], args.matmul_size)
        result.update(matmul_peak_tflops=peak, fraction_of_peak=result["tflops_per_s"] / peak)
        rows["jit"].append(result)
        print(result, flush=True)

    print(f"\nPixelDLM-B/4 generation at 64x64 ({args.steps} steps, {args.device})")
    print(f"{'dtype':<10}{'batch':>6}{'s/call':>10}{'images/s':>10}{'tokens/s':>12}")
    for r in rows["pixeldlm"]:
        print(f"{r['dtype']:<10}{r['batch']:>6}{r['seconds']:>10.3f}{r['images_per_s']:>10.3f}{r['tokens_per_s']:>12.0f}")
    print(f"\nJiT-B/16 forward at 256x256, batch 1 ({args.device})")
    print(f"{'dtype':<10}{'GFLOP':>8}{'s':>9}{'TFLOP/s':>9}{'peak':>8}{'of peak':>9}")
    for r in rows["jit"]:
        print(f"{r['dtype']:<10}{r['gflops']:>8.1f}{r['seconds']:>9.4f}{r['tflops_per_s']:>9.3f}"
              f"{r['matmul_peak_tflops']:>8.3f}{r['fraction_of_peak']:>9.1%}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
