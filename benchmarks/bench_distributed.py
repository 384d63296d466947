"""Per-process memory and step time of PixelHDM training under DDP, FSDP2, ZeRO-2 and ZeRO-3 with two processes.

    python benchmarks/bench_distributed.py --presets small default --output bench_distributed.json
    python benchmarks/bench_distributed.py --presets small default --mixed_precision bf16 --output bench_bf16.json

Each (preset, engine) pair is one `accelerate launch` of two processes with the engine's config from
`training/configs/accelerate/`. On a machine without GPUs the processes run on CPUs over gloo through
`pixel_diffusers.testing_distributed` (the real FSDP2 / DeepSpeed code); with GPUs they run as launched. A process
trains the real transformer of the preset with AdamW on random 32x32 images and text embeddings (batch 1, fp32
or accelerate's `--mixed_precision bf16`) and reports, right after an optimiser step (gradients still alive):

- `state_gib`: the bytes of every live tensor storage of the process (parameters, gradients, optimiser state and the
  engine's flat copies of them; each storage counted once), the memory the engine decides how to spend;
- `buckets_gib`: DeepSpeed's gradient-reduction buckets, left out of `state_gib` (their size is the config's
  `reduce_bucket_size`, 5e8 elements by default, whatever the model);
- `peak_rss_gib`: the peak resident memory of the process (also the libraries, activations, communication buffers);
- `step_s`: the mean time of the steps after the first.

Ratios are against DDP in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


def deepspeed_buckets(optimizer) -> list[torch.Tensor]:
    """DeepSpeed's gradient-reduction buckets (a fixed `reduce_bucket_size`, communication space, not state)."""
    zero = getattr(optimizer, "optimizer", optimizer)
    found = [getattr(b, "buffer", b) for b in getattr(zero, "ipg_buckets", {}).values()]
    found += list(getattr(zero, "ipg_buffer", None) or [])
    flat = []
    while found:
        item = found.pop()
        if isinstance(item, (list, tuple)):
            found.extend(item)
        elif torch.is_tensor(item):
            flat.append(item)
    return flat


def live_tensor_bytes(excluded: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages of all live plain tensors (DTensors are counted through their local tensors),
    leaving out the storages of `excluded`."""
    from torch.distributed.tensor import DTensor

    seen, total = {t.untyped_storage().data_ptr() for t in excluded}, 0
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or isinstance(obj, DTensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:
            continue
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(preset: str, steps: int, output: str) -> None:
    from accelerate import Accelerator

    from pixel_diffusers import PixelHDMTransformer2DModel
    from pixel_diffusers.training_utils.engines import Engine, configure_deepspeed, requested_engine

    requested = requested_engine()
    accelerator = Accelerator(cpu=requested is None and not torch.cuda.is_available())
    engine = Engine.of(accelerator)
    engine.check_requested(requested, int(os.environ.get("WORLD_SIZE", "1")))
    if engine.is_deepspeed:
        configure_deepspeed(accelerator, SimpleNamespace(train_batch_size=1, gradient_accumulation_steps=1,
                                                         max_grad_norm=1.0))
    torch.manual_seed(0)
    model = PixelHDMTransformer2DModel.from_preset(preset)
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    config = accelerator.unwrap_model(model).config
    device = accelerator.device
    generator = torch.Generator().manual_seed(accelerator.process_index)
    times, state, bucket_bytes = [], 0, 0
    for step in range(steps):
        pixels = torch.randn(1, 3, 32, 32, generator=generator).to(device)
        text = torch.randn(1, 8, config.text_embed_dim, generator=generator).to(device)
        start = time.perf_counter()
        velocity = model(pixels, timestep=torch.full((1,), 500.0, device=device), encoder_hidden_states=text,
                       encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool, device=device),
                       pooled_projections=text.mean(1)).sample
        accelerator.backward(velocity.float().square().mean())
        optimizer.step()
        if step == steps - 1:
            buckets = deepspeed_buckets(optimizer)
            state = live_tensor_bytes(buckets)
            bucket_bytes = sum(b.untyped_storage().nbytes() for b in buckets)
        optimizer.zero_grad(set_to_none=True)
        accelerator.wait_for_everyone()
        times.append(time.perf_counter() - start)
    result = {
        "engine": engine.name, "rank": accelerator.process_index, "parameters": num_parameters,
        "state_gib": state / 2**30, "buckets_gib": bucket_bytes / 2**30, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "step_s": sum(times[1:]) / max(len(times) - 1, 1),
    }
    Path(f"{output}.rank{accelerator.process_index}").write_text(json.dumps(result))
    accelerator.end_training()


def launch(engine: str, preset: str, steps: int, port: int, mixed_precision: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        output = str(Path(folder) / "result")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "training" / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", mixed_precision, "--main_process_port", str(port)]
        if not torch.cuda.is_available():
            command += ["-m", "pixel_diffusers.testing_distributed"]
        command += [__file__, "--worker", "--preset", preset, "--steps", str(steps), "--output", output]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{engine}/{preset} failed:\n{result.stderr[-3000:]}")
        return [json.loads(Path(f"{output}.rank{rank}").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "default"])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--output", default="bench_distributed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.preset, args.steps, args.output)
        return
    rows = []
    for preset in args.presets:
        for index, engine in enumerate(args.engines):
            ranks = launch(engine, preset, args.steps, 29800 + index, args.mixed_precision)
            rows.append({
                "preset": preset, "engine": engine, "mixed_precision": args.mixed_precision,
                "parameters": ranks[0]["parameters"],
                "state_gib": max(r["state_gib"] for r in ranks), "buckets_gib": max(r["buckets_gib"] for r in ranks),
                "peak_rss_gib": max(r["peak_rss_gib"] for r in ranks),
                "step_s": max(r["step_s"] for r in ranks),
            })
    print(f"{'preset':8} {'engine':6} {'params':>12} {'state GiB':>10} {'vs DDP':>7} {'buckets GiB':>12} "
          f"{'peak RSS GiB':>13} {'vs DDP':>7} {'step s':>7}")
    for row in rows:
        ddp = next((r for r in rows if r["preset"] == row["preset"] and r["engine"] == "ddp"), None)
        row["state_vs_ddp"] = row["state_gib"] / ddp["state_gib"] if ddp else None
        row["rss_vs_ddp"] = row["peak_rss_gib"] / ddp["peak_rss_gib"] if ddp else None
        ratio = lambda v: f"{v:7.2f}" if v is not None else f"{'-':>7}"  # noqa: E731
        print(f"{row['preset']:8} {row['engine']:6} {row['parameters']:12,} {row['state_gib']:10.2f} "
              f"{ratio(row['state_vs_ddp'])} {row['buckets_gib']:12.2f} {row['peak_rss_gib']:13.2f} {ratio(row['rss_vs_ddp'])} {row['step_s']:7.2f}")
    Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
