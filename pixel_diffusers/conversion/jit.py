"""Convert upstream JiT and PixelDLM checkpoints to `JiTTransformer2DModel`.

* **JiT** (github.com/LTH14/JiT): a training checkpoint `checkpoint-*.pth` holding `model` (the `Denoiser`, keys
  `net.*`), the EMA parameter dicts `model_ema1` / `model_ema2` and the training `args` (an `argparse.Namespace`,
  the only non-tensor object allowed while reading with `torch.load(weights_only=True)`); or a plain state dict
  (`.pth` or `.safetensors`). Upstream samples from `model_ema1`, our default. The architecture comes from the
  `args.model` name ("JiT-B/16", ...), else from `preset`, else from the tensor shapes; the training `args` always
  give the image size, class count, `noise_scale` and both dropouts (`proj_dropout` -> `dropout`, `attn_dropout` ->
  `attention_dropout`). The fixed sin-cos position table and the RoPE tables are dropped after checking they equal
  the ones the model computes.
* **PixelDLM** (github.com/Decalogue/PixelDLM): a checkpoint `{"model_state_dict", "epoch", ...}` as its `train.py`
  writes (`checkpoint_epoch_N.pth`, `best_model.pth`) or a plain state dict. The architecture (pixel decoder
  included) is read from the tensor shapes; the head count, which no tensor carries, from the width (upstream's
  presets) or `num_attention_heads`. The sinusoid frequency buffer is dropped after the same check, and the buffers of
  the training loss (`freq_loss_fn.*`, written by `--use_freq_loss`) are dropped as upstream's inference does.

Every other tensor is mapped to one of ours (upstream's fused attention `qkv` is cut into diffusers' `to_q`, `to_k`,
`to_v`, `proj` becomes `to_out.0`); anything unknown or missing raises a `ValueError` that lists the keys (upstream's
own inference loads with `strict=False`, which silently leaves random weights on a flag mismatch).

Two diffusers-style JiT layouts load through `JiTTransformer2DModel.from_pretrained` (their folders name the same
class): diffusers PR #13098's `JiTTransformer2DModel` (`models/transformers/jit_transformer_2d.py`: upstream's modules
flattened, `to_q`/`to_k`/`to_v`/`to_out.0`, `norm_final`, `linear_final`, `adaLN_modulation_final`) and the community
port BiliSakura/JiT-diffusers (github.com/Bili-Sakura/JiT-diffusers: upstream's `JiT` under `transformer.`, a config
naming the preset in `model_type`). Their weights are mapped to upstream's keys and then through the same JiT
conversion as an upstream checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import torch

from ..models.transformers.transformer_jit import (
    JIT_PRESETS,
    JiTTransformer2DModel,
    _rope_angles,
    split_fused_attention,
)
from .strict import (
    WRAPPER_PREFIXES,
    add_convert_command,
    check_converted_state_dict,
    read_checkpoint,
    save_converted,
    strip_wrapper_prefixes,
)

__all__ = [
    "JiTConversionReport",
    "add_subparser",
    "community_jit_state_dict_to_ours",
    "convert_jit_checkpoint",
    "convert_pixeldlm_checkpoint",
    "translate_community_jit_config",
]

_JIT_RENAMES = [
    (r"^t_embedder\.mlp\.0\.", "time_embed.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "time_embed.linear_2."),
    (r"^y_embedder\.embedding_table\.", "class_embed."),
    (r"^x_embedder\.proj1\.", "patch_embed.0."),
    (r"^x_embedder\.proj2\.", "patch_embed.1."),
    (r"^in_context_posemb$", "in_context_pos_embed"),
    (r"\.attn\.q_norm\.", ".attn.norm_q."),
    (r"\.attn\.k_norm\.", ".attn.norm_k."),
    (r"^(blocks\.\d+)\.adaLN_modulation\.1\.", r"\1.adaln."),
    (r"^final_layer\.norm_final\.", "norm_out."),
    (r"^final_layer\.linear\.", "proj_out."),
    (r"^final_layer\.adaLN_modulation\.1\.", "adaln_out."),
]

_PIXELDLM_RENAMES = [
    (r"^pos_embed_h$", "pos_embed_row"),
    (r"^pos_embed_w$", "pos_embed_col"),
    (r"^cond_pos_embed_h$", "condition_pos_embed_row"),
    (r"^cond_pos_embed_w$", "condition_pos_embed_col"),
    (r"^output_proj\.", "proj_out."),
    (r"^(blocks\.\d+)\.mlp\.0\.", r"\1.mlp.w12."),
    (r"^(blocks\.\d+)\.mlp\.3\.", r"\1.mlp.w3."),
    (r"^(blocks\.\d+)\.adaLN\.norm\.weight$", r"\1.adaln.norm_weight"),
    (r"^(blocks\.\d+)\.adaLN\.scale_mlp\.1\.", r"\1.adaln.scale."),
    (r"^(blocks\.\d+)\.adaLN\.shift_mlp\.1\.", r"\1.adaln.shift."),
    (r"^pixel_decoder\.unet\.encoder\.", "pixel_decoder.encoder."),
    (r"^pixel_decoder\.unet\.cond_proj\.0\.", "pixel_decoder.cond_proj."),
    (r"^pixel_decoder\.unet\.decoder_up\.", "pixel_decoder.up."),
    (r"^pixel_decoder\.unet\.decoder\.", "pixel_decoder.decoder."),  # the last decoder block -> `out` (see below)
]

# diffusers PR #13098's JiTTransformer2DModel -> upstream JiT (its to_q/to_k/to_v are re-fused into upstream's qkv).
_PR13098_RENAMES = [
    (r"^(blocks\.\d+)\.adaLN_modulation\.", r"\1.adaLN_modulation.1."),
    (r"^norm_final\.", "final_layer.norm_final."),
    (r"^linear_final\.", "final_layer.linear."),
    (r"^adaLN_modulation_final\.", "final_layer.adaLN_modulation.1."),
    (r"\.attn\.norm_q\.", ".attn.q_norm."),
    (r"\.attn\.norm_k\.", ".attn.k_norm."),
    (r"\.attn\.to_out\.0\.", ".attn.proj."),
]
_PR13098_CONFIG = ("sample_size", "patch_size", "in_channels", "hidden_size", "num_layers", "num_attention_heads",
                   "mlp_ratio", "num_classes", "bottleneck_dim", "in_context_len", "in_context_start", "dropout")

_WRAPPER_PREFIXES = {**WRAPPER_PREFIXES, "net.": "JiT's Denoiser"}

# Upstream presets by width: (heads, in-context start). Neither is stored in any tensor.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}
_IN_CONTEXT_START_BY_DEPTH = {12: 4, 24: 8, 32: 10, 40: 10}


@dataclasses.dataclass
class JiTConversionReport:
    """What a conversion did. `str(report)` is a printable summary."""

    source: str
    weights: str
    config_source: str
    config: dict
    mapped: dict[str, str] = dataclasses.field(default_factory=dict)  # upstream key -> our key
    dropped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> upstream keys
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"{self.config.get('architecture', 'jit')} conversion of {self.source}",
            f"  weights: {self.weights}",
            f"  config ({self.config_source}): " + ", ".join(f"{k}={v}" for k, v in self.config.items()),
            f"  mapped: {len(self.mapped)} tensors ({sum(s != d for s, d in self.mapped.items())} renamed)",
        ]
        for reason, keys in self.dropped.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys) - 3} more)" if len(keys) > 3 else "")
            lines.append(f"  dropped {len(keys)} ({reason}): {shown}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _load(src: Path) -> tuple[dict, str]:
    # JiT stores its argparse.Namespace of training arguments; that plain container is the only class allowed.
    obj, kind = read_checkpoint(src, safe_globals=(argparse.Namespace,))
    if not isinstance(obj, dict):
        raise ValueError(f"src={str(src)!r} holds a {type(obj).__name__}; expected a checkpoint dict or a state dict.")
    return obj, kind


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _check_derived(state: dict, key: str, expected: torch.Tensor, dropped: list[str]) -> None:
    """Drop an upstream tensor the model computes itself, after checking it holds the same values."""
    value = state.pop(key)
    if value.shape != expected.shape or not torch.allclose(value.float(), expected.float(), atol=1e-5):
        raise ValueError(f"Upstream tensor {key!r} differs from the one the converted model computes.")
    dropped.append(key)


def _our_keys(key: str, rules) -> str:
    """The key(s) of ours an upstream key maps to, comma-separated (a fused qkv tensor fills three)."""
    return ", ".join(split_fused_attention({_rename(key, rules): _PLACEHOLDER}))


_PLACEHOLDER = torch.empty(3)


def _load_strict(model: JiTTransformer2DModel, converted: dict, mapped: dict, src: Path, config_source: str) -> None:
    expected = model.state_dict()
    missing = sorted(key for key in expected if key not in converted)
    unexpected = sorted(upstream for upstream, ours in mapped.items() if any(k not in expected for k in ours.split(", ")))
    check_converted_state_dict(converted, expected, missing, unexpected, src, "JiTTransformer2DModel", config_source)
    model.load_state_dict({key: value.float() if value.is_floating_point() else value for key, value in converted.items()}, strict=True)
    model.eval()


def _jit_config_from_shapes(state: dict, notes: list[str], overrides: dict) -> dict:
    try:
        hidden = state["x_embedder.proj2.weight"].shape[0]
        bottleneck, _, patch, _ = state["x_embedder.proj1.weight"].shape
        num_patches = state["pos_embed"].shape[1] if "pos_embed" in state else None
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    except KeyError as error:
        raise ValueError(
            f"Cannot infer the JiT config: the checkpoint lacks {error}; pass preset=... (`--preset NAME` on the "
            f"command line, one of {sorted(JIT_PRESETS)})"
        ) from None
    depth = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key)))
    if num_patches is None:
        raise ValueError(
            f"Cannot infer the JiT image size (no pos_embed in the checkpoint); pass preset=... (`--preset NAME` on the "
            f"command line, one of {sorted(JIT_PRESETS)})"
        )
    if depth not in _IN_CONTEXT_START_BY_DEPTH and "in_context_start" not in overrides:
        raise ValueError(
            f"Cannot infer in_context_start for depth {depth} (not an upstream size); pass preset=... (`--preset NAME` "
            "on the command line) or in_context_start=..."
        )
    in_context = state["in_context_posemb"].shape[1] if "in_context_posemb" in state else 0
    if "in_context_start" not in overrides:
        notes.append("in_context_start taken from the upstream size of that depth (no tensor stores it).")
    return {
        "sample_size": patch * int(round(num_patches**0.5)),
        "patch_size": patch,
        "hidden_size": hidden,
        "num_layers": depth,
        "num_attention_heads": hidden // head_dim,
        "bottleneck_dim": bottleneck,
        "num_classes": num_classes,
        "in_context_len": in_context,
        "in_context_start": _IN_CONTEXT_START_BY_DEPTH.get(depth, 0),
    }


# Upstream `main_jit.py` argument -> our config field (upstream's `Denoiser` passes each to the network or sampler).
_ARGS_TO_CONFIG = {
    "img_size": ("sample_size", int),
    "class_num": ("num_classes", int),
    "noise_scale": ("noise_scale", float),
    "proj_dropout": ("dropout", float),
    "attn_dropout": ("attention_dropout", float),
}


def _config_from_args(args) -> dict:
    return {
        field: cast(getattr(args, name))
        for name, (field, cast) in _ARGS_TO_CONFIG.items()
        if getattr(args, name, None) is not None
    }


def _convert_jit_state(state: dict, model: JiTTransformer2DModel) -> tuple[dict, dict, list[str]]:
    """Upstream JiT tensors -> ours: the fixed tables are checked and dropped, every other key renamed.
    Returns (converted state dict, {upstream key: our key(s)}, dropped keys)."""
    state = dict(state)
    dropped: list[str] = []
    if "pos_embed" in state:
        _check_derived(state, "pos_embed", model.pos_embed, dropped)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for prefix, length in (("feat_rope.", 0), ("feat_rope_incontext.", model.config.in_context_len)):
        angles = _rope_angles(model.grid, head_dim, model.config.rope_theta, length, "cpu").repeat_interleave(2, -1)
        for table, values in (("freqs_cos", angles.cos()), ("freqs_sin", angles.sin())):
            if prefix + table in state:
                _check_derived(state, prefix + table, values, dropped)
    mapped = {key: _our_keys(key, _JIT_RENAMES) for key in state}
    converted = split_fused_attention({_rename(key, _JIT_RENAMES): value for key, value in state.items()})
    return converted, mapped, dropped


def _pr13098_to_upstream(state: dict) -> dict:
    upstream, split = {}, {}
    for key, value in state.items():
        match = re.match(r"^(blocks\.\d+\.attn)\.to_([qkv])\.(weight|bias)$", key)
        if match:
            split.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        else:
            upstream[_rename(key, _PR13098_RENAMES)] = value
    for (prefix, kind), parts in split.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{prefix}.to_{{q,k,v}}.{kind}: the checkpoint holds only {sorted(parts)}.")
        upstream[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return upstream


def community_jit_state_dict_to_ours(state: dict, model: JiTTransformer2DModel) -> dict:
    """The weights of a community JiT layout (diffusers PR #13098, BiliSakura/JiT-diffusers) under this model's keys,
    through upstream's keys and the JiT conversion; any other state dict is returned unchanged."""
    if state and all(key.startswith("transformer.") for key in state) and "transformer.t_embedder.mlp.0.weight" in state:
        return _convert_jit_state({key[len("transformer.") :]: value for key, value in state.items()}, model)[0]
    if "t_embedder.mlp.0.weight" in state:
        return _convert_jit_state(_pr13098_to_upstream(state), model)[0]
    return state


def translate_community_jit_config(config: dict) -> None:
    """Rewrites, in place, the config of a community JiT layout into `JiTTransformer2DModel`'s: BiliSakura's
    (`model_type` = a JiT preset name, `sample_size`, `num_class_embeds`, `dropout`, `attention_dropout`, or their
    legacy aliases) and PR #13098's (our field names plus `norm_eps`). A config of ours is left alone."""
    if "architecture" in config:
        return
    if "model_type" in config or "model_name" in config:
        name = config.get("model_name") or config.get("model_type")
        if name not in JIT_PRESETS or not name.startswith("JiT"):
            raise ValueError(f"model_type={name!r} is not a JiT preset; allowed values: {sorted(k for k in JIT_PRESETS if k.startswith('JiT'))}.")
        ours = dict(JIT_PRESETS[name])
        ours["sample_size"] = config.get("image_size") or config.get("sample_size", ours["sample_size"])
        ours["num_classes"] = config.get("num_classes") or config.get("num_class_embeds", 1000)
        dropout = config.get("proj_dropout") if config.get("proj_dropout") is not None else config.get("dropout", 0.0)
        attention_dropout = config.get("attn_dropout") if config.get("attn_dropout") is not None else config.get("attention_dropout", 0.0)
    elif "norm_eps" in config or "attention_dropout" in config:
        if config.get("norm_eps", 1e-6) != 1e-6:
            raise ValueError(f"norm_eps={config['norm_eps']} is not JiT's 1e-6, the only value JiTTransformer2DModel has.")
        ours = {key: config[key] for key in _PR13098_CONFIG if key in config}
        dropout, attention_dropout = config.get("dropout", 0.0), config.get("attention_dropout", 0.0)
    else:
        return
    ours["dropout"], ours["attention_dropout"] = dropout, attention_dropout
    kept = {key: value for key, value in config.items() if key.startswith("_")}
    config.clear()
    config.update({"architecture": "jit", **ours, **kept})


def convert_jit_checkpoint(
    src: str | Path, weights: str = "ema1", preset: str | None = None, **config_overrides
) -> tuple[JiTTransformer2DModel, JiTConversionReport]:
    """Convert an official JiT checkpoint to a `JiTTransformer2DModel` (float32, eval mode).

    Args:
        src: a JiT training checkpoint (`.pth`), a state dict, or a `.safetensors` state dict.
        weights: which weights of a training checkpoint: "ema1" (upstream's sampling default), "ema2" or "model".
        preset: a `JIT_PRESETS` name when the checkpoint has no `args` (else the shapes decide).
        config_overrides: config fields that replace the determined ones (e.g. `in_context_start`, which no tensor
            carries, for a depth that is not an upstream size).

    Returns:
        (model, report). Save with `model.save_pretrained(dst)`.
    """
    if weights not in ("ema1", "ema2", "model"):
        raise ValueError(f"weights must be one of ('ema1', 'ema2', 'model'); got {weights!r}.")
    if preset is not None and preset not in JIT_PRESETS:
        raise ValueError(f"Unknown JiT preset={preset!r}; allowed values: {sorted(JIT_PRESETS)}.")
    src = Path(src)
    notes: list[str] = []
    obj, kind = _load(src)
    args = None
    if kind == "torch" and "model" in obj and not _is_state_dict(obj):
        model_state = strip_wrapper_prefixes(dict(obj["model"]), notes, _WRAPPER_PREFIXES)
        args = obj.get("args")
        if weights == "model":
            state, description = model_state, "training weights (model)"
        else:
            ema = obj.get(f"model_{weights}")
            if ema is None:
                raise ValueError(f"weights={weights!r} but the checkpoint has no 'model_{weights}'; keys: {sorted(obj)}.")
            # The EMA dicts hold parameters only; buffers (RoPE tables) come from `model`.
            state = {**model_state, **strip_wrapper_prefixes(dict(ema), [], _WRAPPER_PREFIXES)}
            description = f"EMA weights (model_{weights})"
    elif _is_state_dict(obj):
        state, description = strip_wrapper_prefixes(dict(obj), notes, _WRAPPER_PREFIXES), f"{kind} state dict"
    else:
        raise ValueError(f"The checkpoint holds no 'model' and is not a state dict; top-level keys: {sorted(obj)}.")

    name = getattr(args, "model", None)
    if name in JIT_PRESETS:
        config, config_source = dict(JIT_PRESETS[name]), f"checkpoint args (model={name!r})"
    elif preset is not None:
        config, config_source = dict(JIT_PRESETS[preset]), f"preset {preset!r}"
    else:
        config, config_source = _jit_config_from_shapes(state, notes, config_overrides), "inferred from tensor shapes"
    if args is not None:
        config.update(_config_from_args(args))
        if name not in JIT_PRESETS:
            config_source += f" with the checkpoint args {sorted(_config_from_args(args))}"
    if config_overrides:
        config.update(config_overrides)
        config_source += f" with overrides {sorted(config_overrides)}"
    model = JiTTransformer2DModel(**config)
    converted, mapped, dropped = _convert_jit_state(state, model)
    _load_strict(model, converted, mapped, src, config_source)
    report = JiTConversionReport(
        source=str(src),
        weights=description,
        config_source=config_source,
        config={k: v for k, v in model.config.items() if not k.startswith("_")},
        mapped=mapped,
        dropped={"fixed tables the model computes (values checked)": dropped} if dropped else {},
        notes=notes,
    )
    return model, report


def convert_pixeldlm_checkpoint(
    src: str | Path, num_attention_heads: int | None = None
) -> tuple[JiTTransformer2DModel, JiTConversionReport]:
    """Convert an upstream PixelDLM checkpoint to a `JiTTransformer2DModel(architecture="pixeldlm")`.

    Args:
        src: `checkpoint_epoch_N.pth` / `best_model.pth` (or a state dict, `.pth` or `.safetensors`).
        num_attention_heads: heads, when the width is not one of upstream's presets (768 -> 12, 1024/1280 -> 16).
    """
    src = Path(src)
    notes: list[str] = []
    obj, kind = _load(src)
    if kind == "torch" and isinstance(obj.get("model_state_dict"), dict):
        state, description = obj["model_state_dict"], "model_state_dict"
        if "epoch" in obj:
            notes.append(f"upstream epoch {obj['epoch']}.")
    elif _is_state_dict(obj):
        state, description = obj, f"{kind} state dict"
    else:
        raise ValueError(f"The checkpoint holds no 'model_state_dict' and is not a state dict; keys: {sorted(obj)}.")
    state = strip_wrapper_prefixes(dict(state), notes, _WRAPPER_PREFIXES)
    loss_buffers = sorted(key for key in state if key.startswith("freq_loss_fn."))
    for key in loss_buffers:
        del state[key]

    try:
        hidden, patch_dim = state["patch_embed.weight"].shape
        grid = state["pos_embed_h"].shape[1]
        inner = state["blocks.0.mlp.3.weight"].shape[1]
    except KeyError as error:
        raise ValueError(f"Not a PixelDLM checkpoint: it lacks {error}.") from None
    patch = int(round((patch_dim / 3) ** 0.5))
    heads = num_attention_heads or _HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise ValueError(f"Cannot infer the head count for width {hidden}; pass num_attention_heads.")
    decoder_depth = len({m.group(1) for key in state if (m := re.match(r"pixel_decoder\.unet\.encoder\.(\d+)\.", key))})
    config = {
        "architecture": "pixeldlm",
        "sample_size": grid * patch,
        "patch_size": patch,
        "hidden_size": hidden,
        "num_layers": 1 + max(int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))),
        "num_attention_heads": heads,
        "mlp_ratio": inner / hidden,
        "use_pixel_decoder": decoder_depth > 0,
        "pixel_decoder_depth": decoder_depth or 3,
    }
    model = JiTTransformer2DModel(**config)

    dropped: list[str] = []
    if "time_embed.emb" in state:
        half = hidden // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        _check_derived(state, "time_embed.emb", freqs, dropped)
    dropped_reasons = {}
    if dropped:
        dropped_reasons["time sinusoid frequencies the model computes (values checked)"] = dropped
    if loss_buffers:
        dropped_reasons["buffers of the frequency-aware training loss, not part of the model"] = loss_buffers
    last = f"pixel_decoder.decoder.{decoder_depth - 1}."
    renamed = {}
    for key in state:
        ours = _rename(key, _PIXELDLM_RENAMES)
        renamed[key] = "pixel_decoder.out." + ours[len(last) :] if decoder_depth and ours.startswith(last) else ours
    mapped = {key: _our_keys(ours, []) for key, ours in renamed.items()}
    converted = split_fused_attention({renamed[key]: value for key, value in state.items()})
    _load_strict(model, converted, mapped, src, "inferred from tensor shapes")
    report = JiTConversionReport(
        source=str(src),
        weights=description,
        config_source="inferred from tensor shapes",
        config={k: v for k, v in model.config.items() if not k.startswith("_")},
        mapped=mapped,
        dropped=dropped_reasons,
        notes=notes,
    )
    return model, report


def _cmd_convert_jit(args) -> None:
    overrides = {} if args.in_context_start is None else {"in_context_start": args.in_context_start}
    save_converted(*convert_jit_checkpoint(args.src, weights=args.weights, preset=args.preset, **overrides), args.dst)


def _cmd_convert_pixeldlm(args) -> None:
    save_converted(*convert_pixeldlm_checkpoint(args.src, num_attention_heads=args.num_attention_heads), args.dst)


def add_subparser(subparsers) -> None:
    """Adds `jit` and `pixeldlm` to the `pixel-diffusers convert` sub-commands (`subparsers` of `convert`)."""
    dst_help = "the folder to save the converted JiTTransformer2DModel to"
    jit = add_convert_command(
        subparsers, "jit", "an official JiT checkpoint-*.pth (or state dict)", _cmd_convert_jit,
        "the upstream checkpoint file", dst_help,
    )
    jit.add_argument("--weights", choices=("ema1", "ema2", "model"), default="ema1")
    jit.add_argument("--preset", default=None, choices=sorted(JIT_PRESETS), help="architecture when the file has no args")
    jit.add_argument(
        "--in_context_start", "--in-context-start", type=int, default=None,
        help="block the class tokens enter at, for a depth other than upstream's 12/24/32/40 (no tensor stores it)",
    )
    pixeldlm = add_convert_command(
        subparsers, "pixeldlm", "an upstream PixelDLM checkpoint_epoch_N.pth / best_model.pth", _cmd_convert_pixeldlm,
        "the upstream checkpoint file", dst_help,
    )
    pixeldlm.add_argument("--num_attention_heads", "--num-attention-heads", type=int, default=None, help="heads, for a non-preset width")
