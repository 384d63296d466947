"""What the upstream-checkpoint converters share: reading a checkpoint file safely, the strict key check and the
`pixel-diffusers convert <system> SRC DST` command frame."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..loading import nonfinite_keys


def read_checkpoint(src: str | Path, safe_globals: tuple = ()) -> tuple[object, str]:
    """Reads `src` without unpickling anything: `.safetensors` with safetensors, anything else with
    `torch.load(weights_only=True)` (plus the plain classes in `safe_globals`). Returns `(object, kind)`, kind
    "safetensors" or "torch"; every failure is a ValueError that names the file and says why."""
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"src={str(src)!r} is not a file.")
    if src.stat().st_size == 0:
        raise ValueError(f"src={str(src)!r} is empty (0 bytes): the file was truncated or never written.")
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(src)), "safetensors"
        except Exception as error:  # SafetensorError, or an OSError for an unreadable file
            raise ValueError(
                f"src={str(src)!r} is not a readable safetensors file ({type(error).__name__}: {error})."
            ) from error
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as error:  # an unsafe pickle, a foreign format or a damaged file
        raise ValueError(
            f"src={str(src)!r} could not be read with torch.load(weights_only=True) ({type(error).__name__}: "
            f"{error or 'no details'}). Only plain tensor containers are loaded (never arbitrary pickles); re-save the "
            "state dict with torch.save or as safetensors."
        ) from error
    return obj, "torch"


# Wrappers that prefix every key of the state dict they save.
WRAPPER_PREFIXES = {"_orig_mod.": "torch.compile", "module.": "DistributedDataParallel"}


def strip_wrapper_prefixes(state: dict, notes: list[str], prefixes: dict[str, str] = WRAPPER_PREFIXES) -> dict:
    """`state` without each of `prefixes` (prefix -> the wrapper that adds it) that every key carries, in order; a
    note per prefix removed."""
    for prefix, wrapper in prefixes.items():
        if state and all(key.startswith(prefix) for key in state):
            notes.append(f"stripped the '{prefix}' prefix that {wrapper} adds to every key.")
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def check_converted_state_dict(
    converted: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    src: str | Path,
    model_name: str,
    config_source: str,
) -> None:
    """Raises a ValueError when the converted tensors do not fill `expected` (a model's state dict) exactly: keys of
    ours that nothing maps to (`missing`), upstream keys that map to nothing of ours (`unexpected`), or a tensor whose
    shape differs from the model's, or a tensor holding NaN or inf."""
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {str(src)!r} does not match {model_name}({config_source}). "
            f"Missing keys (ours): {missing}. Unexpected upstream keys: {unexpected}."
        )
    mismatched = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if converted[key].shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError(f"Checkpoint {str(src)!r} has tensors of the wrong shape for {config_source}: {mismatched}.")
    nonfinite = nonfinite_keys(converted)
    if nonfinite:
        raise ValueError(f"Checkpoint {str(src)!r} has tensors holding NaN or inf: {nonfinite}.")


def add_convert_command(subparsers, name: str, help: str, run, src_help: str, dst_help: str) -> argparse.ArgumentParser:
    """Adds `pixel-diffusers convert <name> SRC DST` running `run(args)` to `subparsers` (those of `convert`) and
    returns its parser, for the converter's own flags."""
    parser = subparsers.add_parser(name, help=help)
    parser.add_argument("src", help=src_help)
    parser.add_argument("dst", help=dst_help)
    parser.set_defaults(func=run)
    return parser


def save_converted(converted, report, dst: str | Path) -> None:
    """Saves a converted model (or pipeline) to `dst` with `save_pretrained`, then prints the conversion report and
    what was saved, with its parameter count."""
    converted.save_pretrained(dst)
    print(report)
    modules = [converted] if isinstance(converted, torch.nn.Module) else converted.components.values()
    count = sum(p.numel() for module in modules if isinstance(module, torch.nn.Module) for p in module.parameters())
    print(f"saved {type(converted).__name__} ({count:,} parameters) to {dst}")
