"""The Analytic Diffusion Studio run behind `pixel-diffusers analytic --config FILE`: fit an analytic denoiser, sample,
write images, a grid and metrics.

The config (YAML or JSON)::

    denoiser: pca_locality            # nearest_dataset | optimal | scfdm | wiener | pca_locality
    params: {mask_threshold: 0.02}    # the denoiser's config arguments
    dataset: {source: path/or/name, resolution: 32, channels: 3, split: train, subset_size: null,
              image_column: image, batch_size: 256}
    sampling: {num_samples: 8, batch_size: 8, num_inference_steps: 10, seed: 42}
    reference: path/to/unet           # optional: a diffusers UNet2DModel (epsilon) to compare trajectories with
    output_dir: analytic_output
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SECTIONS = ("denoiser", "params", "dataset", "sampling", "reference", "output_dir")


def load_config(path: str) -> dict:
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"`--config` {path!r} must hold a mapping, got {type(config).__name__}.")
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; allowed: {list(SECTIONS)}.")
    if "denoiser" not in config or "dataset" not in config:
        raise ValueError("the config must name a `denoiser` and a `dataset`.")
    return config


def run(config: dict) -> dict:
    """Fits, samples and writes everything to ``output_dir``; returns the metrics."""
    import torch

    from ...models.analytic import ANALYTIC_DENOISERS
    from .data import AnalyticImageDataset
    from .pipeline_analytic import AnalyticDiffusionPipeline, studio_scheduler

    name = config["denoiser"]
    if name not in ANALYTIC_DENOISERS:
        raise ValueError(f"`denoiser` must be one of {sorted(ANALYTIC_DENOISERS)}, got {name!r}.")
    data_config = dict(config["dataset"])
    fit_batch_size = data_config.pop("batch_size", 256)
    dataset = AnalyticImageDataset(**data_config)
    channels = data_config.get("channels", 3)
    denoiser = ANALYTIC_DENOISERS[name](sample_size=dataset.resolution, in_channels=channels, **config.get("params", {}))
    print(f"fitting {name} on {len(dataset)} images of {dataset.resolution}²...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    denoiser.fit(dataset, batch_size=fit_batch_size)
    fit_time = time.perf_counter() - start

    sampling = {"num_samples": 8, "batch_size": 8, "num_inference_steps": 10, "seed": 42, **config.get("sampling", {})}
    print(f"fitted in {fit_time:.1f} s; sampling {sampling['num_samples']} images", file=sys.stderr, flush=True)
    pipe = AnalyticDiffusionPipeline(denoiser=denoiser, scheduler=studio_scheduler())  # its progress bar: per batch
    reference = None
    if config.get("reference"):
        from diffusers import UNet2DModel

        reference = AnalyticDiffusionPipeline(denoiser=UNet2DModel.from_pretrained(config["reference"]), scheduler=studio_scheduler())
        reference.set_progress_bar_config(disable=True)

    output_dir = Path(config.get("output_dir", "analytic_output"))
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(sampling["seed"])
    reference_generator = torch.Generator().manual_seed(sampling["seed"])
    images, comparisons, sampling_time, batches = [], [], 0.0, 0
    remaining = sampling["num_samples"]
    while remaining > 0:
        size = min(sampling["batch_size"], remaining)
        start = time.perf_counter()
        output = pipe(batch_size=size, num_inference_steps=sampling["num_inference_steps"], generator=generator,
                      return_trajectory=reference is not None)
        sampling_time += time.perf_counter() - start
        images += output.images
        if reference is not None:
            reference_output = reference(batch_size=size, num_inference_steps=sampling["num_inference_steps"],
                                         generator=reference_generator, return_trajectory=True)
            comparisons.append(pipe.compare_trajectories(reference, output, reference_output))
        remaining -= size
        batches += 1

    for index, image in enumerate(images):
        image.save(output_dir / "images" / f"sample_{index:04d}.png")
    from ...training_utils.config import image_grid

    image_grid(images, columns=min(4, len(images))).save(output_dir / "grid.png")
    metrics = {
        "denoiser": name,
        "num_training_images": len(dataset),
        "fit_time_s": fit_time,
        "sampling_time_total_s": sampling_time,
        "sampling_time_per_step_s": sampling_time / (batches * sampling["num_inference_steps"]),
    }
    if comparisons:
        metrics["r2_vs_reference_final"] = sum(c["r2_final"] for c in comparisons) / len(comparisons)
        metrics["mse_vs_reference_final"] = sum(c["mse_final"] for c in comparisons) / len(comparisons)
        metrics["comparison_details"] = comparisons[0]["steps"] if len(comparisons) == 1 else [c["steps"] for c in comparisons]
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

