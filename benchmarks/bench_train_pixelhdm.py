#!/usr/bin/env python
"""Training throughput (images/s) and peak memory of PixelHDM: presets x resolutions x gradient checkpointing x
precision, one optimiser step = forward, v + frequency + gamma losses, backward, ZClip-free AdamW step.

    python benchmarks/bench_train_pixelhdm.py                      # tiny and small, 64² and 256², all variants
    python benchmarks/bench_train_pixelhdm.py --presets for_testing --resolutions 64

Each configuration runs in a fresh subprocess, so its peak memory (CUDA: max allocated; CPU: peak RSS) is its own.
Text embeddings are random tensors of the encoder's width (the frozen encoder is not part of the step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pixel_diffusers import PixelHDMTransformer2DModel
from pixel_diffusers.training_utils import FrequencyLoss

TEXT_TOKENS = 64


def measure(preset: str, resolution: int, checkpointing: bool, dtype: str, batch_size: int, steps: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = PixelHDMTransformer2DModel.from_preset(preset).to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    frequency = FrequencyLoss().to(device)
    width = model.config.text_embed_dim
    pixels = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    embeds = torch.randn(batch_size, TEXT_TOKENS, width, device=device)
    mask = torch.ones(batch_size, TEXT_TOKENS, dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        sigmas = torch.rand(batch_size, device=device)
        noise = torch.randn_like(pixels)
        noisy = (1 - sigmas.view(-1, 1, 1, 1)) * pixels + sigmas.view(-1, 1, 1, 1) * noise
        with autocast:
            out = model(noisy, timestep=sigmas * 1000, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                        pooled_projections=embeds[:, -1], return_aux=True)
        prediction, target = out.sample.float(), pixels - noise
        loss = F.mse_loss(prediction, target) + frequency(prediction, target) + 1e-4 * out.gamma_l2.float()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, optimiser state, the recomputation path of checkpointing
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    return {
        "preset": preset, "resolution": resolution, "gradient_checkpointing": checkpointing, "dtype": dtype,
        "batch_size": batch_size, "device": device, "seconds_per_step": round(seconds, 4),
        "images_per_second": round(batch_size / seconds, 2), "peak_memory_gib": round(peak, 3),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["for_testing", "small"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/bench_train_pixelhdm.json")
    parser.add_argument("--single", type=json.loads, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single is not None:  # child process: one configuration
        print(json.dumps(measure(**args.single, batch_size=args.batch_size, steps=args.steps)))
        return []
    rows = []
    print(f"{'preset':<12}{'res':>5}{'ckpt':>6}{'dtype':>6}{'img/s':>9}{'s/step':>9}{'peak GiB':>10}")
    for preset in args.presets:
        for resolution in args.resolutions:
            for dtype in ("fp32", "bf16"):
                for checkpointing in (False, True):
                    config = {"preset": preset, "resolution": resolution, "checkpointing": checkpointing, "dtype": dtype}
                    child = subprocess.run(
                        [sys.executable, __file__, "--single", json.dumps(config), "--batch_size", str(args.batch_size),
                         "--steps", str(args.steps)],
                        capture_output=True, text=True, check=True,
                    )
                    row = json.loads(child.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"{preset:<12}{resolution:>5}{str(checkpointing):>6}{dtype:>6}{row['images_per_second']:>9}"
                          f"{row['seconds_per_step']:>9}{row['peak_memory_gib']:>10}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
