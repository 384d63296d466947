"""Analytic denoisers: fit time and per-step time, and our Wiener / PCA-locality steps against upstream's algorithms.

    python benchmarks/bench_analytic.py --sizes 32 64 --num-images 1024 --batch-size 8

Upstream's Wiener step rebuilds the n x n filter ``U diag(shrink) V^T`` (O(n^3)) on every call and applies it;
upstream's PCA-locality step rebuilds that filter, derives the mask and applies it densely to every chunk
(``einsum('bkn,nm->bkm')``, O(B N n^2)). Both are re-stated here faithfully and timed in the same run as ours, so the
ratios are machine-independent. Training images are smooth random fields (sums of a few low-frequency cosines), so
the covariance and the locality masks look like those of natural images. Prints a table, writes JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from pixel_diffusers.models.analytic import ANALYTIC_DENOISERS


def smooth_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, size)
    images = torch.zeros(count, 3, size, size)
    for _ in range(6):
        fx, fy = torch.randint(0, 4, (2, count, 3, 1, 1), generator=generator).float()
        phase = torch.rand(count, 3, 1, 1, generator=generator) * 2 * math.pi
        images += torch.cos(2 * math.pi * (fx * grid[None, None, :, None] + fy * grid[None, None, None, :]) + phase)
    return (images / 6).clamp(-1, 1)


def timed(function, repeats: int = 1) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def upstream_wiener_step(model, x_t, a):
    w = (model.eigenvectors * model.shrinkage(a)) @ model.eigenvectors.T  # U diag V^T, O(n^3) every call
    return model.mean + (x_t / a.sqrt() - model.mean) @ w.T


def upstream_pca_step(model, x_t, a):
    mask = model.locality_mask(a)  # rebuilt every call
    numerator = torch.zeros_like(x_t)
    denominator = torch.zeros_like(x_t)
    for start in range(0, model.config.num_samples, model.config.chunk_size):
        chunk = model.data[start : start + model.config.chunk_size]
        squared = (x_t[:, None] - a.sqrt() * chunk[None]) ** 2
        logits = -torch.einsum("bkn,nm->bkm", squared, mask) / (2 * (1 - a))
        weights = torch.softmax(logits, dim=1)
        numerator += (weights * chunk[None]).sum(1)
        denominator += weights.sum(1)
    return numerator / (denominator + 1e-8)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timestep", type=int, default=500)
    parser.add_argument("--output", default="benchmarks/results/bench_analytic.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for size in args.sizes:
        data = smooth_images(args.num_images, size)
        x_t = torch.randn(args.batch_size, 3, size, size)
        for name, cls in ANALYTIC_DENOISERS.items():
            model = cls(sample_size=size, in_channels=3)
            start = time.perf_counter()
            model.fit(data)
            fit_s = time.perf_counter() - start
            step_s = timed(lambda: model(x_t, args.timestep, generator=torch.Generator().manual_seed(0)))
            row = {"denoiser": name, "size": size, "n": 3 * size * size, "num_images": args.num_images,
                   "batch_size": args.batch_size, "fit_s": fit_s, "step_s": step_s}
            a, flat = model.alphas_cumprod[args.timestep], x_t.flatten(1)
            if name == "wiener":
                row["upstream_step_s"] = timed(lambda: upstream_wiener_step(model, flat, a))
                torch.testing.assert_close(upstream_wiener_step(model, flat, a), model.predict_x0(flat, a), atol=1e-3, rtol=1e-3)
            if name == "pca_locality":
                row["mask_density"] = model.locality_mask(a).mean().item()
                # our first call at a timestep includes building its mask (O(n^3)); later calls reuse it
                model._masks = {}
                row["step_first_call_s"] = timed(lambda: (model._masks.clear(), model(x_t, args.timestep)), repeats=1)
                row["upstream_step_s"] = timed(lambda: upstream_pca_step(model, flat, a), repeats=1)
            if "upstream_step_s" in row:
                row["speedup_vs_upstream"] = row["upstream_step_s"] / row["step_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'denoiser':16s} {'size':>4s} {'fit s':>9s} {'step s':>9s} {'upstream s':>11s} {'speedup':>8s}")
    for row in rows:
        upstream = row.get("upstream_step_s")
        print(f"{row['denoiser']:16s} {row['size']:4d} {row['fit_s']:9.3f} {row['step_s']:9.4f} "
              f"{upstream if upstream is not None else float('nan'):11.4f} {row.get('speedup_vs_upstream', float('nan')):8.1f}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
