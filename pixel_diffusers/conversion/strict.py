"""The strict key and shape check shared by the upstream-checkpoint converters."""

from __future__ import annotations

from pathlib import Path

import torch


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
    shape differs from the model's."""
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
