"""Convert smalldiffusion (github.com/yuanchenyang/smalldiffusion) state dicts to the small models.

smalldiffusion's examples save `torch.save(model.state_dict(), "checkpoint.pth")` (EMA weights when sampled inside
`ema.average_parameters()`); a `.safetensors` file of the same state dict works too. The model class is read from the
keys (`TimeInputMLP`, `ConditionalMLP`, `DiT`, `Unet`) and the config from the tensor shapes, except what no tensor
stores, which comes from the arguments: DiT's head count (`num_heads`), the U-Net's image size (`in_dim`), the label
dropout rates, and upstream's class modifiers `Scaled`, `PredX0` / `PredV` / `PredFlow` (`scaled`, `prediction_type`;
a DiT with the flow `TimestepEmbedder` is `PredFlow`).

Renames: `CondEmbedderLabel.embeddings` -> `embedding`; DiT: `x_embed.proj` -> `patch_embed`, `blocks.i.attn.*` ->
`blocks.i.*`, `blocks.i.norm{1,2}.modulation` -> `blocks.i.modulation{1,2}`, `scale_modulation` -> `gates`,
`final_norm.modulation` -> `final_modulation`, where the two halves of every norm modulation swap (upstream's
`ModulatedLayerNorm` reads (scale, shift), ours (shift, scale)); the fixed `pos_embed` is dropped after checking it
equals ours. U-Net: upstream's nested `downs.l.blocks.b` / `downs.l.downsample` / `ups.l.*` map to our flat `down` /
`up` lists, `layer1/2` -> `block1/2`, `attn.qkv/proj` -> `qkv/proj`, `out_layer` -> `conv_out`. Loading is strict.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from ..models.small import ConditionalMLP, SmallDiT, SmallUNet, TimeInputMLP
from ..models.small.small_utils import PREDICTION_TYPES
from .jit import _load
from .strict import add_convert_command, check_converted_state_dict, save_converted, strip_wrapper_prefixes

__all__ = ["SmallDiffusionConversionReport", "add_subparser", "convert_smalldiffusion_checkpoint"]

MODEL_TYPES = ("TimeInputMLP", "ConditionalMLP", "DiT", "Unet")
_CLASSES = {"TimeInputMLP": TimeInputMLP, "ConditionalMLP": ConditionalMLP, "DiT": SmallDiT, "Unet": SmallUNet}

_COMMON_RENAMES = [(r"^cond_embed\.embeddings\.", "cond_embed.embedding.")]
_DIT_RENAMES = [
    (r"^x_embed\.proj\.", "patch_embed."),
    (r"^(blocks\.\d+)\.attn\.", r"\1."),
    (r"^(blocks\.\d+)\.norm([12])\.modulation\.proj\.", r"\1.modulation\2.linear."),
    (r"^(blocks\.\d+)\.scale_modulation\.proj\.", r"\1.gates.linear."),
    (r"^final_norm\.modulation\.proj\.", "final_modulation.linear."),
]
_SWAPPED_HALVES = re.compile(r"^(blocks\.\d+\.norm[12]|final_norm)\.modulation\.proj\.1\.(weight|bias)$")
_UNET_BLOCK_RENAMES = [(r"\.layer1\.", ".block1."), (r"\.layer2\.", ".block2."), (r"\.attn\.(qkv|proj)\.", r".\1.")]


@dataclasses.dataclass
class SmallDiffusionConversionReport:
    """What a conversion did. `str(report)` is a printable summary."""

    source: str
    model_type: str
    config: dict
    mapped: dict[str, str] = dataclasses.field(default_factory=dict)  # upstream key -> our key
    dropped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"smalldiffusion {self.model_type} conversion of {self.source}",
            "  config: " + ", ".join(f"{k}={v}" for k, v in self.config.items()),
            f"  mapped: {len(self.mapped)} tensors ({sum(s != d for s, d in self.mapped.items())} renamed)",
        ]
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)} (fixed tables the model computes, values checked): "
                         + ", ".join(self.dropped))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _detect(state: dict) -> str:
    if "x_embed.proj.weight" in state:
        return "DiT"
    if "conv_in.weight" in state:
        return "Unet"
    if "net.0.weight" in state:
        return "ConditionalMLP" if "cond_embed.embeddings.weight" in state else "TimeInputMLP"
    raise ValueError(
        f"Not a smalldiffusion state dict of a known model {MODEL_TYPES} (no x_embed.proj / conv_in / net.0 weight); "
        f"first keys: {sorted(state)[:5]}."
    )


def _count(state: dict, pattern: str) -> int:
    """Number of distinct indices `pattern` (a regex with one group) captures over the keys."""
    return len({m.group(1) for key in state if (m := re.match(pattern, key))})


def _labels(state: dict) -> int | None:
    table = state.get("cond_embed.embeddings.weight")
    return None if table is None else table.shape[0] - 1


def _mlp_config(state: dict, model_type: str) -> dict:
    layers = sorted(int(m.group(1)) for key in state if (m := re.match(r"net\.(\d+)\.weight$", key)))
    outputs = [state[f"net.{i}.weight"].shape[0] for i in layers]
    inputs = state["net.0.weight"].shape[1]
    if model_type == "TimeInputMLP":
        dim, output = inputs - 2, outputs[-1]
        return {"dim": dim, "output_dim": None if output == dim else output, "hidden_dims": tuple(outputs[:-1])}
    cond_dim = state["cond_embed.embeddings.weight"].shape[1]
    dim = inputs - 2 - cond_dim
    return {"dim": dim, "output_dim": None if outputs[-1] == dim else outputs[-1], "hidden_dims": tuple(outputs[:-1]),
            "cond_dim": cond_dim, "num_classes": _labels(state)}


def _dit_config(state: dict, num_heads: int | None, prediction_type: str | None) -> dict:
    width, channels, patch, _ = state["x_embed.proj.weight"].shape
    if num_heads is None:
        raise ValueError(
            "A smalldiffusion DiT state dict does not store its head count: pass num_heads (upstream's default 6; "
            "its ImageNet example uses 12)."
        )
    if width % num_heads:
        raise ValueError(f"num_heads must divide the DiT width {width}; got {num_heads}.")
    flow = "sig_embed.mlp.4.weight" in state  # TimestepEmbedder (PredFlow models) vs SigmaEmbedderSinCos
    if prediction_type is None:
        prediction_type = "flow" if flow else "epsilon"
    if flow != (prediction_type == "flow"):
        raise ValueError(
            f"prediction_type={prediction_type!r} does not match the checkpoint's "
            f"{'flow TimestepEmbedder' if flow else 'SigmaEmbedderSinCos'}: SmallDiT embeds time with the "
            "TimestepEmbedder exactly when prediction_type='flow'."
        )
    grid = int(round(state["pos_embed"].shape[1] ** 0.5)) if "pos_embed" in state else None
    if grid is None:
        raise ValueError("Cannot infer the DiT image size: the state dict has no pos_embed.")
    return {"in_dim": grid * patch, "channels": channels, "patch_size": patch,
            "depth": _count(state, r"blocks\.(\d+)\."), "head_dim": width // num_heads, "num_heads": num_heads,
            "mlp_ratio": state["blocks.0.mlp.0.weight"].shape[0] / width, "num_classes": _labels(state),
            "prediction_type": prediction_type}


def _unet_config(state: dict, in_dim: int | None) -> dict:
    if in_dim is None:
        raise ValueError("A smalldiffusion Unet state dict does not store its image size: pass in_dim (e.g. 32, 28).")
    if "sig_embed.mlp.4.weight" in state:
        raise ValueError("This Unet embeds time with smalldiffusion's TimestepEmbedder; SmallUNet supports its default "
                         "SigmaEmbedderSinCos only.")
    ch, in_ch = state["conv_in.weight"].shape[:2]
    levels = _count(state, r"downs\.(\d+)\.")
    ch_mult = tuple(state[f"downs.{level}.blocks.0.0.layer1.2.weight"].shape[0] // ch for level in range(levels))
    attn = tuple(in_dim >> level for level in range(levels) if f"downs.{level}.blocks.0.1.norm.weight" in state)
    return {"in_dim": in_dim, "in_ch": in_ch, "out_ch": state["out_layer.2.weight"].shape[0], "ch": ch,
            "ch_mult": ch_mult, "embed_ch_mult": state["sig_embed.mlp.0.weight"].shape[0] // ch,
            "num_res_blocks": _count(state, r"downs\.0\.blocks\.(\d+)\."), "attn_resolutions": attn,
            "num_classes": _labels(state)}


def _unet_key(key: str, num_res_blocks: int) -> str:
    if m := re.match(r"downs\.(\d+)\.blocks\.(\d+)\.(.*)$", key):
        key = f"down.{int(m.group(1)) * (num_res_blocks + 1) + int(m.group(2))}.{m.group(3)}"
    elif m := re.match(r"downs\.(\d+)\.downsample\.1\.(.*)$", key):  # (ConstantPad2d, Conv2d); we pad in forward
        key = f"down.{int(m.group(1)) * (num_res_blocks + 1) + num_res_blocks}.{m.group(2)}"
    elif m := re.match(r"ups\.(\d+)\.blocks\.(\d+)\.(.*)$", key):
        key = f"up.{int(m.group(1)) * (num_res_blocks + 2) + int(m.group(2))}.{m.group(3)}"
    elif m := re.match(r"ups\.(\d+)\.upsample\.(.*)$", key):
        key = f"up.{int(m.group(1)) * (num_res_blocks + 2) + num_res_blocks + 1}.{m.group(2)}"
    key = re.sub(r"^out_layer\.", "conv_out.", key)
    for pattern, replacement in _UNET_BLOCK_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_smalldiffusion_checkpoint(
    src: str | Path,
    model_type: str | None = None,
    prediction_type: str | None = None,
    scaled: bool = False,
    num_heads: int | None = None,
    in_dim: int | None = None,
    **config_overrides,
) -> tuple[TimeInputMLP | ConditionalMLP | SmallDiT | SmallUNet, SmallDiffusionConversionReport]:
    """Convert a smalldiffusion state dict to the matching small model (float32, eval mode).

    Args:
        src: `torch.save(model.state_dict())` output (`.pth`, `.pt`) or a `.safetensors` file.
        model_type: one of `MODEL_TYPES`; default: read from the keys.
        prediction_type: upstream's modifier, "epsilon" (none), "x0" (`PredX0`), "v" (`PredV`) or "flow"
            (`PredFlow`); default "epsilon", or "flow" for a DiT with the `TimestepEmbedder`.
        scaled: the model was wrapped in upstream's `Scaled`.
        num_heads: DiT's head count (required for a DiT).
        in_dim: the U-Net's image size (required for a Unet).
        config_overrides: other config fields no tensor stores, e.g. `dropout_prob` (label dropout, 0.1) or the
            U-Net's `dropout` (0.1).

    Returns:
        (model, report). Save with `model.save_pretrained(dst)`.
    """
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {model_type!r}.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}.")
    src = Path(src)
    notes: list[str] = []
    state, _ = _load(src)
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"src={str(src)!r} is not a state dict (a dict of tensors); top-level keys: {sorted(state)[:10]}.")
    state = strip_wrapper_prefixes(dict(state), notes)
    detected = _detect(state)
    if model_type is not None and model_type != detected:
        raise ValueError(f"model_type={model_type!r} but the keys are those of a smalldiffusion {detected}.")
    model_type = detected

    if model_type in ("TimeInputMLP", "ConditionalMLP"):
        config = _mlp_config(state, model_type)
    elif model_type == "DiT":
        config = _dit_config(state, num_heads, prediction_type)
    else:
        config = _unet_config(state, in_dim)
    config.setdefault("prediction_type", prediction_type or "epsilon")
    config["scaled"] = bool(scaled)
    config.update(config_overrides)
    notes.append(f"prediction_type={config['prediction_type']!r}, scaled={config['scaled']} (upstream's class "
                 "modifiers are not stored in a state dict).")
    model = _CLASSES[model_type](**config)

    dropped = []
    if model_type == "DiT":
        value = state.pop("pos_embed")
        if value.shape != (1, *model.positions.shape) or not torch.allclose(value[0].float(), model.positions, atol=1e-6):
            raise ValueError("Upstream tensor 'pos_embed' differs from the sin-cos table SmallDiT computes.")
        dropped.append("pos_embed")
    converted, mapped = {}, {}
    for key, value in state.items():
        ours = key
        for pattern, replacement in _COMMON_RENAMES + (_DIT_RENAMES if model_type == "DiT" else []):
            ours = re.sub(pattern, replacement, ours)
        if model_type == "Unet":
            ours = _unet_key(ours, model.config.num_res_blocks)
        if model_type == "DiT" and _SWAPPED_HALVES.match(key):
            scale, shift = value.chunk(2, dim=0)
            value = torch.cat([shift, scale], dim=0)
        mapped[key], converted[ours] = ours, value.float() if value.is_floating_point() else value

    expected = model.state_dict()
    missing = sorted(key for key in expected if key not in converted)
    unexpected = sorted(upstream for upstream, ours in mapped.items() if ours not in expected)
    check_converted_state_dict(converted, expected, missing, unexpected, src, type(model).__name__, f"smalldiffusion {model_type}")
    model.load_state_dict(converted, strict=True)
    model.eval()
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    report = SmallDiffusionConversionReport(str(src), model_type, config, mapped, dropped, notes)
    return model, report


def _cmd_convert(args) -> None:
    overrides = {name: getattr(args, name) for name in ("dropout_prob", "dropout") if getattr(args, name) is not None}
    converted = convert_smalldiffusion_checkpoint(
        args.src, model_type=args.model_type, prediction_type=args.prediction_type, scaled=args.scaled,
        num_heads=args.num_heads, in_dim=args.in_dim, **overrides,
    )
    save_converted(*converted, args.dst)


def add_subparser(subparsers) -> None:
    """Adds `smalldiffusion` to the `pixel-diffusers convert` sub-commands (`subparsers` of `convert`)."""
    sub = add_convert_command(
        subparsers, "smalldiffusion", "a smalldiffusion model's state dict (torch.save / safetensors)", _cmd_convert,
        "the saved state dict", "the folder to save the converted model to",
    )
    sub.add_argument("--model_type", "--model-type", choices=MODEL_TYPES, default=None, help="default: read from the keys")
    sub.add_argument("--prediction_type", "--prediction-type", choices=PREDICTION_TYPES, default=None,
                     help="upstream's modifier: x0 = PredX0, v = PredV, flow = PredFlow (default epsilon; flow for a "
                          "DiT with the TimestepEmbedder)")
    sub.add_argument("--scaled", action="store_true", help="the model was wrapped in upstream's Scaled")
    sub.add_argument("--num_heads", "--num-heads", type=int, default=None, help="DiT's head count (required for a DiT)")
    sub.add_argument("--in_dim", "--in-dim", type=int, default=None, help="the U-Net's image size (required for a Unet)")
    sub.add_argument("--dropout_prob", "--dropout-prob", type=float, default=None, help="label dropout of a conditional model (0.1)")
    sub.add_argument("--dropout", type=float, default=None, help="the U-Net's dropout (0.1)")
