"""Convert an upstream PixelHDM checkpoint (github.com/yetrtyog-creator/PixelHDM) to `PixelHDMTransformer2DModel`.

Accepted sources:

* a training checkpoint `.pt`/`.pth` (read with `torch.load(weights_only=True)`): a dict holding `model` and/or
  `ema` (`{"shadow": {...}, ...}`) and usually the upstream `config` dict;
* a plain state dict saved with `torch.save`;
* a `.safetensors` file holding the state dict.

The config comes from the checkpoint's upstream `config` dict when present, else from `preset`, else it is inferred
from the tensor shapes. Every upstream tensor is either mapped to one of ours (diffusers-style names, e.g.
`attention.qkv_proj.q_proj` -> `attn.to_q`; a `text_projector.proj` found in some upstream revisions -> `text_proj`)
or dropped for a stated reason (the duplicate alias keys upstream's attention registers, after checking they equal
their canonical tensors; the T2I wrapper's `_text_encoder.*`, `_dino_encoder.*`, `_dino_projector.*`). Anything
unknown or missing raises a `ValueError` that lists the keys; nothing is loaded with `strict=False`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from ..models.transformers.transformer_pixelhdm import PIXELHDM_PRESETS, PixelHDMTransformer2DModel
from .strict import check_converted_state_dict, read_checkpoint, strip_wrapper_prefixes

__all__ = ["PixelHDMConversionReport", "convert_pixelhdm_checkpoint"]

# Upstream key (after alias resolution) -> our key. Applied in order; every rule that matches is applied.
_RENAMES = [
    (r"^pixel_embed\.proj\.", "pixel_embed."),
    (r"^time_embed\.mlp\.0\.", "time_embed.linear_1."),
    (r"^time_embed\.mlp\.2\.", "time_embed.linear_2."),
    (r"^text_projector\.proj\.", "text_proj."),
    (r"^output_norm\.", "norm_out."),
    (r"^output_proj\.proj\.", "proj_out."),
    (r"^(patch_blocks\.\d+\.adaln)\.proj\.1\.", r"\1."),
    (r"^(pixel_blocks\.\d+\.adaln)\.param_gen\.1\.", r"\1.linear."),
    (r"^(pixel_blocks\.\d+\.compaction)\.norm\.", r"\1.norm_in."),
    (r"^(pixel_blocks\.\d+\.compaction)\.post_norm\.", r"\1.norm_out."),
    (r"\.mlp\.(gate|up|down)_proj\.", r".ff.\1_proj."),
    (r"\.attention\.qkv_proj\.([qkv])_proj\.", r".attn.to_\1."),
    (r"\.attention\.out_proj_layer\.out_proj\.", ".attn.to_out.0."),
    (r"\.attention\.gate\.proj\.", ".attn.to_gate."),
    (r"\.attention\.([qk])_norm\.", r".attn.norm_\1."),
]

# Upstream re-registers some attention submodules under a second name, so its state dict holds each of these tensors
# twice. Alias pattern -> canonical replacement.
_ALIASES = [
    (r"\.attention\.([qkv])_proj\.", r".attention.qkv_proj.\1_proj."),
    (r"\.attention\.out_proj\.", ".attention.out_proj_layer.out_proj."),
    (r"\.attention\.gate_proj\.", ".attention.gate.proj."),
]

# Parts of upstream's text-to-image wrapper that are not the diffusion transformer.
_LEFTOVERS = {
    "_text_encoder.": "upstream T2I wrapper's Qwen3 text encoder (load the text encoder separately)",
    "_dino_encoder.": "upstream T2I wrapper's DINOv3 encoder (used only for the REPA training loss)",
    "_dino_projector.": "upstream T2I wrapper's unused DINO feature projector",
}

# Upstream `PixelHDMConfig` defaults for the fields that shape the network.
_UPSTREAM_DEFAULTS = {
    "hidden_dim": 1024,
    "pixel_dim": 16,
    "patch_size": 16,
    "patch_layers": 16,
    "pixel_layers": 4,
    "num_heads": 16,
    "num_kv_heads": 4,
    "head_dim": 64,
    "mlp_ratio": 3.0,
    "bottleneck_dim": None,
    "in_channels": 3,
    "out_channels": 3,
    "text_hidden_size": 1024,
    "norm_eps": 1e-6,
    "mrope_text_dim": 16,
    "mrope_img_h_dim": 24,
    "mrope_img_w_dim": 24,
    "mrope_theta": 10000.0,
    "repa_align_layer": 8,
}

# Upstream options with one supported value: the architecture reproduced here.
_UPSTREAM_FIXED = {
    "mlp_type": "swiglu",
    "norm_type": "rmsnorm",
    "gate_type": "headwise",
    "gate_activation": "sigmoid",
    "gate_bias": False,
    "adaln_num_params": 6,
    "time_embed_dim": 256,
    "text_processor_layers": 0,
    "image_processor_layers": 0,
    "pixel_rope_type": "mrope",
}


@dataclasses.dataclass
class PixelHDMConversionReport:
    """What `convert_pixelhdm_checkpoint` did. `str(report)` is a printable summary."""

    source: str
    weights: str
    config_source: str
    config: dict
    mapped: dict[str, str] = dataclasses.field(default_factory=dict)  # upstream key -> our key
    dropped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> upstream keys
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"PixelHDM conversion of {self.source}",
            f"  weights: {self.weights}",
            f"  config ({self.config_source}): "
            + ", ".join(f"{key}={value}" for key, value in self.config.items()),
            f"  mapped: {len(self.mapped)} tensors "
            f"({sum(1 for src, dst in self.mapped.items() if src != dst)} renamed to diffusers-style names)",
        ]
        for reason, keys in self.dropped.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys) - 3} more)" if len(keys) > 3 else "")
            lines.append(f"  dropped {len(keys)} ({reason}): {shown}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _to_ours(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _canonical(key: str) -> str | None:
    for pattern, replacement in _ALIASES:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _load_source(src: Path) -> tuple[dict, str]:
    obj, kind = read_checkpoint(src)
    if not isinstance(obj, dict):
        raise ValueError(f"src={str(src)!r} holds a {type(obj).__name__}; expected a checkpoint dict or a state dict.")
    return obj, kind


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _select_weights(obj: dict, use_ema: bool, notes: list[str]) -> tuple[dict, str, dict | None]:
    """Pick the state dict in a checkpoint. Returns (state, description, fallback state for keys EMA lacks)."""
    model = obj.get("model")
    ema = obj.get("ema")
    shadow = ema.get("shadow") if isinstance(ema, dict) else None
    if model is None and shadow is None:
        if _is_state_dict(obj):
            return obj, "plain state dict", None
        raise ValueError(
            "The checkpoint holds neither 'model' nor 'ema.shadow' and is not a plain state dict; top-level keys: "
            f"{sorted(map(str, obj))}."
        )
    if use_ema and shadow is not None:
        return shadow, "EMA weights (ema.shadow)", model
    if use_ema:
        notes.append("use_ema=True but the checkpoint has no EMA weights (ema.shadow); converted 'model' instead.")
        return model, "training weights (model)", None
    if model is None:
        notes.append("use_ema=False but the checkpoint has no 'model' weights; converted the EMA weights instead.")
        return shadow, "EMA weights (ema.shadow)", None
    return model, "training weights (model)", None


def _config_from_upstream(upstream: dict, notes: list[str]) -> dict:
    cfg = {**_UPSTREAM_DEFAULTS, **{k: v for k, v in upstream.items() if k in _UPSTREAM_DEFAULTS}}
    for field, allowed in _UPSTREAM_FIXED.items():
        if field in upstream and upstream[field] != allowed:
            raise ValueError(
                f"Upstream config {field}={upstream[field]!r} is not supported; allowed value: {allowed!r}."
            )
    if cfg["in_channels"] != cfg["out_channels"]:
        raise ValueError(
            f"Upstream config out_channels={cfg['out_channels']} must equal in_channels={cfg['in_channels']}."
        )
    hidden, heads = cfg["hidden_dim"], cfg["num_heads"]
    head_dim = hidden // heads  # upstream's attention always uses hidden_dim // num_heads
    if cfg["head_dim"] != head_dim:
        notes.append(f"upstream config head_dim={cfg['head_dim']} is unused upstream; the attention uses {head_dim}.")
    if cfg["text_hidden_size"] != hidden:
        notes.append(
            f"upstream config text_hidden_size={cfg['text_hidden_size']} differs from hidden_dim={hidden}, but "
            "upstream has no text projection (its text input must be hidden_dim wide); text_embed_dim is set to "
            f"{hidden}."
        )
    if cfg["norm_eps"] != 1e-6:
        notes.append(f"upstream config norm_eps={cfg['norm_eps']} is unused upstream (every RMSNorm uses 1e-6).")
    return {
        "patch_size": cfg["patch_size"],
        "in_channels": cfg["in_channels"],
        "hidden_size": hidden,
        "pixel_dim": cfg["pixel_dim"],
        "num_patch_layers": cfg["patch_layers"],
        "num_pixel_layers": cfg["pixel_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg["num_kv_heads"],
        "attention_head_dim": head_dim,
        "mlp_ratio": float(cfg["mlp_ratio"]),
        "bottleneck_dim": cfg["bottleneck_dim"] or cfg["patch_size"] ** 2 // 4,
        "text_embed_dim": hidden,
        "rope_axes_dim": (cfg["mrope_text_dim"], cfg["mrope_img_h_dim"], cfg["mrope_img_w_dim"]),
        "rope_theta": float(cfg["mrope_theta"]),
        "repa_align_layer": cfg["repa_align_layer"],
        "norm_eps": 1e-6,
    }


def _config_from_shapes(state: dict, notes: list[str]) -> dict:
    """Infer the config from canonical upstream tensor shapes (RoPE split and REPA layer are assumptions)."""

    def shape(key):
        if key not in state:
            raise ValueError(
                f"Cannot infer the config: the checkpoint lacks {key!r}; pass preset=... (`--preset NAME` on the "
                f"command line, one of {sorted(PIXELHDM_PRESETS)})"
            )
        return state[key].shape

    hidden, bottleneck = shape("patch_embed.proj_up.weight")
    pixel_dim, in_channels = shape("pixel_embed.proj.weight")
    patch_size = math.isqrt(shape("patch_embed.proj_down.weight")[1] // in_channels)
    num_patch = len({k.split(".")[1] for k in state if k.startswith("patch_blocks.")})
    num_pixel = len({k.split(".")[1] for k in state if k.startswith("pixel_blocks.")})
    head_dim = shape("patch_blocks.0.attention.q_norm.weight")[0]
    heads = shape("patch_blocks.0.attention.qkv_proj.q_proj.weight")[0] // head_dim
    kv_heads = shape("patch_blocks.0.attention.qkv_proj.k_proj.weight")[0] // head_dim
    inner = shape("patch_blocks.0.mlp.gate_proj.weight")[0]
    mlp_ratio = inner / hidden
    side = (head_dim - 16) // 2
    repa = min(8, num_patch)
    notes.append(
        f"config inferred from tensor shapes; assumed rope_axes_dim=(16, {side}, {side}) (upstream's split) and "
        f"repa_align_layer={repa} (only affects return_aux)."
    )
    text_dim = state["text_projector.proj.weight"].shape[1] if "text_projector.proj.weight" in state else hidden
    return {
        "patch_size": patch_size,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "pixel_dim": pixel_dim,
        "num_patch_layers": num_patch,
        "num_pixel_layers": num_pixel,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "attention_head_dim": head_dim,
        "mlp_ratio": mlp_ratio,
        "bottleneck_dim": bottleneck,
        "text_embed_dim": text_dim,
        "rope_axes_dim": (16, side, side),
        "repa_align_layer": repa,
    }


def _canonicalize(state: dict, notes: list[str]) -> tuple[dict, dict[str, list[str]]]:
    """Drop the T2I leftovers and the duplicate alias keys (checking they equal their canonical tensors)."""
    dropped: dict[str, list[str]] = {}
    canonical: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        prefix = next((p for p in _LEFTOVERS if key.startswith(p)), None)
        if prefix is not None:
            dropped.setdefault(_LEFTOVERS[prefix], []).append(key)
            continue
        target = _canonical(key)
        if target is None:
            canonical[key] = value
        else:
            aliases[key] = target
    for alias, target in aliases.items():
        if target in state:
            if not torch.equal(state[alias], state[target]):
                raise ValueError(f"Upstream alias {alias!r} differs from its canonical tensor {target!r}.")
            dropped.setdefault("duplicate alias of an upstream attention tensor (identical, checked)", []).append(
                alias
            )
        else:
            canonical[target] = state[alias]
            notes.append(f"{alias!r} used for {target!r} (the canonical key is absent).")
    return canonical, dropped


def convert_pixelhdm_checkpoint(
    src: str | Path, use_ema: bool = True, preset: str | None = None
) -> tuple[PixelHDMTransformer2DModel, PixelHDMConversionReport]:
    """Convert an upstream PixelHDM checkpoint to a `PixelHDMTransformer2DModel` (float32, eval mode).

    Args:
        src: a `.pt`/`.pth` checkpoint or state dict, or a `.safetensors` state dict.
        use_ema: convert the EMA weights (`ema.shadow`, upstream's inference default) rather than `model`; falls back
            to the other with a note in the report when only one is present.
        preset: config to use when the checkpoint carries no upstream `config` dict ("default", "small", "large",
            "for_testing"); without either, the config is inferred from the tensor shapes.

    Returns:
        (model, report). Save with `model.save_pretrained(dst)`.
    """
    if preset is not None and preset not in PIXELHDM_PRESETS:
        raise ValueError(f"Unknown PixelHDM preset={preset!r}; allowed values: {sorted(PIXELHDM_PRESETS)}.")
    src = Path(src)
    notes: list[str] = []
    obj, kind = _load_source(src)
    if kind == "safetensors":
        state, weights, fallback = obj, "safetensors state dict", None
    else:
        state, weights, fallback = _select_weights(obj, use_ema, notes)
    state = strip_wrapper_prefixes(dict(state), notes)
    if fallback is not None:
        fallback = strip_wrapper_prefixes(dict(fallback), [])

    canonical, dropped = _canonicalize(state, notes)
    fallback = _canonicalize(fallback, [])[0] if fallback is not None else None

    # Config.
    upstream_config = obj.get("config") if kind == "torch" and not _is_state_dict(obj) else None
    if isinstance(upstream_config, dict):
        config = _config_from_upstream(upstream_config, notes)
        config_source = "upstream checkpoint config"
        if preset is not None:
            notes.append(f"preset={preset!r} ignored: the checkpoint carries its own config.")
    elif preset is not None:
        config = dict(PIXELHDM_PRESETS[preset])
        config_source = f"preset {preset!r}"
        if "text_projector.proj.weight" not in canonical:
            hidden_size = config.get("hidden_size", 1024)
            if config.get("text_embed_dim", 1024) != hidden_size:
                notes.append(
                    f"preset {preset!r} has text_embed_dim={config.get('text_embed_dim', 1024)}, but the checkpoint "
                    f"has no text projection (upstream has none); text_embed_dim set to {hidden_size}."
                )
            config["text_embed_dim"] = hidden_size
    else:
        config = _config_from_shapes(canonical, notes)
        config_source = "inferred from tensor shapes"
    if "text_projector.proj.weight" in canonical:
        config["text_embed_dim"] = canonical["text_projector.proj.weight"].shape[1]

    model = PixelHDMTransformer2DModel(**config)
    expected = model.state_dict()

    converted = {_to_ours(key): value for key, value in canonical.items()}
    mapped = {key: _to_ours(key) for key in canonical}
    missing = [key for key in expected if key not in converted]
    if missing and fallback is not None:
        from_model = {_to_ours(k): (k, v) for k, v in fallback.items() if _to_ours(k) in missing}
        if from_model:
            converted.update({key: value for key, (_, value) in from_model.items()})
            mapped.update({upstream: key for key, (upstream, _) in from_model.items()})
            notes.append(f"{len(from_model)} tensors absent from ema.shadow taken from 'model': {sorted(from_model)}.")
            missing = [key for key in missing if key not in from_model]
    unexpected = sorted(src_key for src_key, key in mapped.items() if key not in expected)
    check_converted_state_dict(
        converted, expected, missing, unexpected, src, "PixelHDMTransformer2DModel", config_source
    )
    dtypes = sorted({str(value.dtype).replace("torch.", "") for value in converted.values()})
    if dtypes != ["float32"]:
        notes.append(f"source tensors in {', '.join(dtypes)}; loaded into a float32 model.")
    model.load_state_dict(converted, strict=True)
    model.eval()

    report = PixelHDMConversionReport(
        source=str(src),
        weights=weights,
        config_source=config_source,
        config={key: value for key, value in model.config.items() if not key.startswith("_")},
        mapped=mapped,
        dropped=dropped,
        notes=notes,
    )
    return model, report
