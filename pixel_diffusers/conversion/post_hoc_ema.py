"""Post-hoc EMA: a geometrically weighted average of saved checkpoints (upstream pixel-space SDXL's `post_hoc_ema`).

This is not Karras-style power-EMA reconstruction: snapshot i of N (given oldest first) gets the weight
`mu ** (N - 1 - i)`, normalised to sum to 1, so the newest snapshot weighs most. Every floating-point tensor is averaged
in float32; all files must hold the same keys and shapes.

Inputs are `.safetensors` files or `.pt`/`.pth` files read with `torch.load(weights_only=True)` (a top-level
`"model"` dict is used when present, as in upstream's training checkpoints), or folders saved by `save_pretrained`
(every `*.safetensors` file inside, e.g. a pipeline's components, averaged file by file).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .strict import read_checkpoint

__all__ = ["post_hoc_ema_weights", "post_hoc_ema", "add_subparser"]

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def post_hoc_ema_weights(count: int, mu: float = 0.9) -> list[float]:
    """Normalised weights `mu ** (count - 1 - i)` for `count` snapshots ordered oldest first."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be a positive int, got {count!r}.")
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"`mu` must lie in (0, 1], got {mu!r}.")
    raw = [mu ** (count - 1 - i) for i in range(count)]
    total = sum(raw)
    return [w / total for w in raw]


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix not in (".safetensors", ".pt", ".pth", ".ckpt"):
        raise ValueError(f"{str(path)!r} must be a .safetensors, .pt, .pth or .ckpt file.")
    obj, _ = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{str(path)!r} holds no state dict of tensors.")
    return obj


def _average(states: list[dict[str, torch.Tensor]], weights: list[float], names: list[str]) -> dict[str, torch.Tensor]:
    keys = set(states[0])
    for name, state in zip(names[1:], states[1:]):
        if set(state) != keys:
            difference = sorted(keys ^ set(state))
            raise ValueError(f"{name} does not hold the same keys as {names[0]}: {difference[:10]}")
    averaged = {}
    for key in sorted(keys):
        first = states[0][key]
        if any(state[key].shape != first.shape for state in states):
            raise ValueError(f"tensor {key!r} has different shapes across the checkpoints.")
        if not first.is_floating_point():
            averaged[key] = first.clone()  # integer buffers (step counters, ids) are taken from the oldest
            continue
        total = torch.zeros(first.shape, dtype=torch.float32)
        for weight, state in zip(weights, states):
            total += weight * state[key].to(torch.float32)
        averaged[key] = total
    return averaged


def post_hoc_ema(sources: list[str | Path], output: str | Path, mu: float = 0.9, dtype: str = "float32") -> list[float]:
    """Averages `sources` (oldest first) into `output` and returns the weights used.

    `sources` are all files (then `output` must end in `.safetensors`) or all `save_pretrained` folders (then
    `output` is a folder receiving the averaged `*.safetensors` files under the same relative paths, with every
    other file of the newest source, configs included, copied alongside: `from_pretrained(output)` loads it).
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}.")
    paths = [Path(p) for p in sources]
    if len(paths) < 1:
        raise ValueError("`sources` must name at least one checkpoint.")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ValueError(f"These sources do not exist: {missing}.")
    weights = post_hoc_ema_weights(len(paths), mu)
    output = Path(output)
    if all(p.is_dir() for p in paths):
        relative = sorted(str(f.relative_to(paths[0])) for f in paths[0].rglob("*.safetensors"))
        if not relative:
            raise ValueError(f"{str(paths[0])!r} holds no .safetensors files.")
        for name in relative:
            states = [load_file(str(p / name)) for p in paths]
            averaged = _average(states, weights, [str(p / name) for p in paths])
            target = output / name
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(SAVE_DTYPES[dtype]) if v.is_floating_point() else v for k, v in averaged.items()}, str(target))
        for extra in paths[-1].rglob("*"):  # configs, tokenizer files, model_index.json, ...
            if extra.is_file() and extra.suffix != ".safetensors":
                target = output / extra.relative_to(paths[-1])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(extra, target)
        return weights
    if any(p.is_dir() for p in paths):
        raise ValueError("`sources` must be all files or all folders, not a mix.")
    if output.suffix != ".safetensors":
        raise ValueError(f"`output` must end in .safetensors, got {str(output)!r}.")
    averaged = _average([_read(p) for p in paths], weights, [str(p) for p in paths])
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(SAVE_DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in averaged.items()}, str(output))
    return weights


def _run(args) -> None:
    weights = post_hoc_ema(args.sources, args.output, mu=args.mu, dtype=args.dtype)
    for source, weight in zip(args.sources, weights):
        print(f"{weight:.4f}  {source}")
    print(f"saved the average to {args.output}")


def add_subparser(subparsers) -> None:
    """Registers `pixel-diffusers post-hoc-ema`."""
    parser = subparsers.add_parser(
        "post-hoc-ema", help="geometrically weighted average of saved checkpoints (newest weighs most)"
    )
    parser.add_argument("sources", nargs="+", help="checkpoint files or save_pretrained folders, oldest first")
    parser.add_argument("--output", required=True, help="a .safetensors file (file inputs) or a folder (folder inputs)")
    parser.add_argument("--mu", type=float, default=0.9, help="decay per snapshot: weight of snapshot i is mu^(N-1-i)")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), default="float32")
    parser.set_defaults(func=_run)
