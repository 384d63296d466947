"""Analytic denoisers: fit time and per-step time, and our Wiener / PCA-locality steps against upstream's algorithms.

    python benchmarks/bench_analytic.py --sizes 32 64 --num-images 256 --batch-size 8

Upstream's Wiener step rebuilds the n x n filter ``U diag(shrink) U^T`` (O(n^3)) on every call and applies it;
upstream's PCA-locality step rebuilds that filter, derives the mask and applies it densely to every chunk
(``einsum('bkn,nm->bkm')``, O(B N n^2)). Both are re-stated here and timed in the same run as ours, so the ratios
are machine-independent; their outputs are checked against ours. Being O(n^3) per call, the upstream steps and our
PCA-locality first call at a timestep (which builds its mask) are timed over ``--upstream-steps`` calls without a
warm-up call; our other steps are the mean of 3 calls after one warm-up (1 call when the warm-up took over 1 s).

The library fits the Gaussian of Wiener / PCA-locality with a float64 ``eigh`` of the n x n covariance, O(n^3)
whatever the number of images (n = 12288 at 64x64 RGB: tens of minutes on two cores). Above ``--eigh-max-dim``
the benchmark instead fits the same statistics from the N x N Gram matrix of the centred images (O(N^2 n + N^3),
exact for N <= n: the covariance has rank < N and the discarded null space has zero Wiener gain) and reports
that fit as ``gram_fit_s``; at sizes where both run it checks that they give the same Wiener filter.

Training images are smooth random fields (sums of a few low-frequency cosines), so the covariance and the locality
masks look like those of natural images. Prints a table, writes JSON to benchmarks/results/.
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


def timed(function, repeats: int = 3, warmup: bool = True):
    """(mean seconds per call, last result); one timed call when the warm-up call took over a second."""
    if warmup:
        start = time.perf_counter()
        function()
        repeats = 1 if time.perf_counter() - start > 1.0 else repeats
    start = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return (time.perf_counter() - start) / repeats, result


def gram_fit(model, data: torch.Tensor) -> None:
    """Fills ``model``'s Gaussian statistics (eigenvalues ascending) from the Gram matrix of the centred data."""
    count = len(data)
    mean = data.double().mean(0)
    centred = data.double() - mean
    eigenvalues, coefficients = torch.linalg.eigh(centred @ centred.T / (count - 1))
    keep = eigenvalues > eigenvalues[-1] * 1e-10
    components = centred.T @ (coefficients[:, keep] / (eigenvalues[keep] * (count - 1)).sqrt())
    rank = int(keep.sum())
    if hasattr(model, "data"):
        model._stored_data("data", count)
        model.data.copy_(data)
    else:
        model.register_to_config(num_samples=count)
    model.mean.copy_(mean)
    model.eigenvalues.zero_()
    model.eigenvectors.zero_()
    model.eigenvalues[-rank:] = eigenvalues[keep].float()
    model.eigenvectors[:, -rank:] = components.float()
    model._masks = {}


def upstream_wiener_step(model, x_t, a):
    w = (model.eigenvectors * model.shrinkage(a)) @ model.eigenvectors.T  # U diag U^T, O(n^3) every call
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
    parser.add_argument("--num_images", "--num-images", type=int, default=256)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--timestep", type=int, default=500)
    parser.add_argument("--upstream_steps", "--upstream-steps", type=int, default=1, help="calls timed of each O(n^3) step")
    parser.add_argument("--eigh_max_dim", "--eigh-max-dim", type=int, default=4096, help="largest n fitted with the library's eigh")
    parser.add_argument("--output", default="benchmarks/results/bench_analytic.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    slow = dict(repeats=args.upstream_steps, warmup=False)
    print(f"O(n^3) steps (upstream Wiener / PCA-locality, our PCA-locality first call) timed over {args.upstream_steps} "
          f"call(s); Gaussian fits above n = {args.eigh_max_dim} use the Gram matrix, not the library's eigh", flush=True)
    rows = []
    for size in args.sizes:
        data = smooth_images(args.num_images, size)
        x_t = torch.randn(args.batch_size, 3, size, size)
        for name, cls in ANALYTIC_DENOISERS.items():
            model = cls(sample_size=size, in_channels=3)
            row = {"denoiser": name, "size": size, "n": model.dim, "num_images": args.num_images,
                   "batch_size": args.batch_size}
            gaussian = hasattr(model, "eigenvectors")
            if gaussian:
                start = time.perf_counter()
                gram_fit(model, data.flatten(1))
                row["gram_fit_s"] = time.perf_counter() - start
                gram_filter = model.filter_matrix(model.alphas_cumprod[args.timestep]) if model.dim <= args.eigh_max_dim else None
            if not gaussian or model.dim <= args.eigh_max_dim:
                start = time.perf_counter()
                model.fit(data)
                row["fit_s"] = time.perf_counter() - start
                if gaussian:
                    torch.testing.assert_close(model.filter_matrix(model.alphas_cumprod[args.timestep]), gram_filter,
                                               atol=1e-4, rtol=1e-4)
            a, flat = model.alphas_cumprod[args.timestep], x_t.flatten(1)
            if name == "pca_locality":
                model._masks = {}
                row["step_first_call_s"], _ = timed(lambda: model(x_t, args.timestep), **slow)
                mask = model._masks[float(a)]
                nonzero = mask.values().numel() if mask.layout == torch.sparse_csr else mask.count_nonzero().item()
                row["mask_density"] = nonzero / mask.numel()
            row["step_s"], ours = timed(lambda: model(x_t, args.timestep, generator=torch.Generator().manual_seed(0)))
            if name == "wiener":
                row["upstream_step_s"], theirs = timed(lambda: upstream_wiener_step(model, flat, a), **slow)
            if name == "pca_locality":
                row["upstream_step_s"], theirs = timed(lambda: upstream_pca_step(model, flat, a), **slow)
            if "upstream_step_s" in row:
                if args.num_images <= model.config.get("chunk_size", args.num_images):  # one chunk: same softmax
                    torch.testing.assert_close(theirs, ours.flatten(1), atol=1e-3, rtol=1e-3)
                row["speedup_vs_upstream"] = row["upstream_step_s"] / row["step_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    nan = float("nan")
    print(f"\n{'denoiser':16s} {'size':>4s} {'fit s':>9s} {'gram fit s':>10s} {'step s':>9s} {'1st call s':>10s} "
          f"{'upstream s':>10s} {'speedup':>8s}")
    for row in rows:
        print(f"{row['denoiser']:16s} {row['size']:4d} {row.get('fit_s', nan):9.3f} {row.get('gram_fit_s', nan):10.3f} "
              f"{row['step_s']:9.4f} {row.get('step_first_call_s', nan):10.3f} {row.get('upstream_step_s', nan):10.3f} "
              f"{row.get('speedup_vs_upstream', nan):8.1f}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__, "upstream_steps": args.upstream_steps,
                                  "eigh_max_dim": args.eigh_max_dim, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
