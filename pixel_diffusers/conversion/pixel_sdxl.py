"""Convert SDXL or upstream pixel-space SDXL weights to `PixelSDXLUNet2DConditionModel` and the two CLIP encoders.

Accepted sources:

* an SDXL single-file checkpoint in the original SGM layout (`.safetensors`, or `.ckpt`/`.pt`/`.pth` read with
  `torch.load(weights_only=True)`): `model.diffusion_model.*` (the latent U-Net), `conditioner.embedders.0.transformer.*`
  (CLIP ViT-L, transformers keys) and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG). The kept part of the
  U-Net is copied; the patch encoder/decoder start fresh (upstream does the same) and the VAE is dropped;
* an upstream pixel-space SDXL checkpoint (`{"model": state_dict, ...}` saved by its training scripts, or the bare
  state dict, as `.pt`/`.pth`/`.safetensors`): the same SGM layout with the pixel U-Net's keys
  (`patch_encoder.net.*`/`patch_decoder.net.*` or `conv_encoder.*`/`conv_decoder.*`). Patch size and coder type are
  read from the keys;
* a diffusers SDXL folder (`unet/`, `text_encoder/`, `text_encoder_2/`, optionally `tokenizer/`, `tokenizer_2/`):
  the kept U-Net blocks load under their own names.

Every source tensor is mapped to one of ours or dropped for a stated reason (the VAE, SDXL's first level, ...);
anything else, and anything missing, raises a `ValueError` that lists the keys. Nothing is loaded with `strict=False`.

Text encoder 2. OpenCLIP stores `text_projection` as the matrix `P` of `x @ P`; diffusers' converter (used here)
turns it into the Linear weight `P.T`, which is what SDXL computes. Upstream pixel-space SDXL loads the tensor as the
Linear weight without transposing it (an upstream bug: its pooled embedding is `x @ P.T`) and saves it back the same
way, and its models were trained on that embedding. So a latent SDXL converts correctly, and an upstream pixel
checkpoint converts the way upstream loads it, which gives upstream's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..loading import nonfinite_keys
from ..models.unets.unet_pixel_sdxl import PIXEL_SDXL_PRESETS, PixelSDXLUNet2DConditionModel
from .strict import add_convert_command, read_checkpoint, save_converted

__all__ = ["PixelSDXLConversionReport", "convert_pixel_sdxl_checkpoint", "add_subparser"]

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
_DROPPED_PREFIXES = {
    "first_stage_model.": "SDXL's VAE (pixel-space SDXL has none)",
    "model_ema.": "the SGM checkpoint's EMA copy (the live weights are converted)",
}
_RESNET_RENAMES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
# Upstream's ConvEncoder32 / ConvDecoder32 attribute names -> ours (resnet sub-keys are renamed afterwards).
_CONV_CODER_RENAMES = (
    (r"^conv_encoder\.stem_conv\.", "conv_encoder.conv_in."),
    (r"^conv_encoder\.stem_norm\.", "conv_encoder.norm_in.0."),
    (r"^conv_encoder\.downsample_(\d)_norm\.", lambda m: f"conv_encoder.downsamplers.{int(m[1]) - 1}.1."),
    (r"^conv_encoder\.downsample_(\d)\.", lambda m: f"conv_encoder.downsamplers.{int(m[1]) - 1}.0."),
    (r"^conv_encoder\.resblock_(\d)_(\d)\.", lambda m: f"conv_encoder.blocks.{int(m[1]) - 1}.{int(m[2]) - 1}."),
    (r"^conv_encoder\.resblock_(\d)\.", lambda m: f"conv_encoder.blocks.{int(m[1]) - 1}.0."),
    (r"^conv_encoder\.final_conv\.", "conv_encoder.conv_out."),
    (r"^conv_decoder\.initial_conv\.", "conv_decoder.fuse_convs.0.0."),
    (r"^conv_decoder\.initial_norm\.", "conv_decoder.fuse_convs.0.1."),
    (r"^conv_decoder\.upsample_(\d)_conv\.", lambda m: f"conv_decoder.fuse_convs.{m[1]}.0."),
    (r"^conv_decoder\.upsample_(\d)_norm\.", lambda m: f"conv_decoder.fuse_convs.{m[1]}.1."),
    (r"^conv_decoder\.resblock_(\d)_(\d)\.", lambda m: f"conv_decoder.blocks.{m[1]}.{int(m[2]) - 1}."),
    (r"^conv_decoder\.resblock_(\d)\.", lambda m: f"conv_decoder.blocks.{m[1]}.0."),
    (r"^conv_decoder\.final_conv_1\.", "conv_decoder.conv_norm_out.0."),
    (r"^conv_decoder\.final_norm\.", "conv_decoder.conv_norm_out.1."),
    (r"^conv_decoder\.final_conv_2\.", "conv_decoder.conv_out."),
)
_CONFIG_FROM_DIFFUSERS = {
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "transformer_layers_per_block": "transformer_layers_per_block",
    "attention_head_dim": "num_attention_heads",  # SDXL's diffusers config stores head counts there
    "cross_attention_dim": "cross_attention_dim",
    "addition_time_embed_dim": "addition_time_embed_dim",
    "projection_class_embeddings_input_dim": "projection_class_embeddings_input_dim",
    "norm_num_groups": "norm_num_groups",
    "norm_eps": "norm_eps",
    "use_linear_projection": "use_linear_projection",
}


@dataclasses.dataclass
class PixelSDXLConversionReport:
    """What `convert_pixel_sdxl_checkpoint` did. `str(report)` is a printable summary."""

    source: str
    kind: str
    config: dict
    mapped: dict[str, str] = dataclasses.field(default_factory=dict)  # source key -> our key (U-Net and encoders)
    dropped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> source keys
    fresh: list[str] = dataclasses.field(default_factory=list)  # our U-Net keys initialised fresh
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"pixel-SDXL conversion of {self.source} ({self.kind})",
            "  config: " + ", ".join(f"{key}={value}" for key, value in self.config.items()),
            f"  mapped: {len(self.mapped)} tensors",
        ]
        for reason, keys in self.dropped.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys) - 3} more)" if len(keys) > 3 else "")
            lines.append(f"  dropped {len(keys)} ({reason}): {shown}")
        if self.fresh:
            lines.append(f"  initialised fresh: {len(self.fresh)} tensors ({', '.join(sorted({k.split('.')[0] for k in self.fresh}))})")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------------------------
def _resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def sgm_unet_key_to_diffusers(key: str, layers_per_block: int = 2) -> str | None:
    """The diffusers name of an SGM U-Net key (without `model.diffusion_model.`), or None if it is not one.

    The standard LDM -> diffusers renaming, key by key. diffusers' `convert_ldm_unet_checkpoint` does the same for a
    whole U-Net, but it counts blocks from the keys present and so cannot read the pixel U-Net, which lacks the first
    ones.
    """
    per_level = layers_per_block + 1
    simple = {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.0.0.": "add_embedding.linear_1.",
        "label_emb.0.2.": "add_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
    }
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith(("patch_encoder.net.", "patch_decoder.net.")):
        return key
    if key.startswith(("conv_encoder.", "conv_decoder.")):
        for pattern, replacement in _CONV_CODER_RENAMES:
            match = re.match(pattern, key)
            if match:
                renamed = re.sub(pattern, replacement, key)
                head = re.match(r"^(conv_(?:en|de)coder\.blocks\.\d+\.\d+\.)(.*)$", renamed)
                return head[1] + _resnet(head[2]) if head else renamed
        return None
    match = re.match(r"^input_blocks\.(\d+)\.([01])\.(.+)$", key)
    if match:
        index, part, rest = int(match[1]), match[2], match[3]
        level, j = divmod(index - 1, per_level)
        if j == layers_per_block:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
        if part == "0":
            return f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    match = re.match(r"^middle_block\.([012])\.(.+)$", key)
    if match:
        part, rest = match[1], match[2]
        return f"mid_block.attentions.0.{rest}" if part == "1" else f"mid_block.resnets.{int(part) // 2}.{_resnet(rest)}"
    match = re.match(r"^output_blocks\.(\d+)\.([012])\.(.+)$", key)
    if match:
        block, j = divmod(int(match[1]), per_level)
        part, rest = match[2], match[3]
        if part == "0":
            return f"up_blocks.{block}.resnets.{j}.{_resnet(rest)}"
        if rest.startswith("conv."):  # the upsampler: part 2 after an attention, part 1 without
            return f"up_blocks.{block}.upsamplers.0.{rest}"
        return f"up_blocks.{block}.attentions.{j}.{rest}" if part == "1" else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------
def _load_file(src: Path) -> dict:
    obj, _ = read_checkpoint(src)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]  # upstream's training checkpoints: {"model": ..., "optimizer_state": ...}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]  # original SGM/LDM .ckpt files
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"src={str(src)!r} holds no state dict (expected tensors, a 'model' or a 'state_dict' entry).")
    nonfinite = nonfinite_keys(obj)
    if nonfinite:
        raise ValueError(f"src={str(src)!r} has tensors holding NaN or inf: {nonfinite}.")
    return obj


def _clip_config(state: dict, prefix: str, with_projection: bool, head_dim: int) -> CLIPTextConfig:
    """The CLIP text config implied by the tensor shapes (heads of `head_dim`; CLIP's vocab ends with start, end)."""
    if with_projection:
        vocab, width = state[prefix + "token_embedding.weight"].shape
        positions = state[prefix + "positional_embedding"].shape[0]
        layers = {k[len(prefix) :].split(".")[2] for k in state if k.startswith(prefix + "transformer.resblocks.")}
        inner = state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = state[prefix + "text_projection"].shape[1]
    else:
        embeddings = prefix + "text_model.embeddings."
        vocab, width = state[embeddings + "token_embedding.weight"].shape
        positions = state[embeddings + "position_embedding.weight"].shape[0]
        layers = {k[len(prefix) :].split(".")[3] for k in state if k.startswith(prefix + "text_model.encoder.layers.")}
        inner = state[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = width
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=len(layers),
        num_attention_heads=width // head_dim,
        max_position_embeddings=positions,
        hidden_act="gelu" if with_projection else "quick_gelu",  # OpenCLIP bigG / OpenAI CLIP-L
        projection_dim=projection,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=0 if with_projection else vocab - 1,
    )


def _load_text_encoder(model, converted: dict, name: str) -> None:
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    converted = {key: value for key, value in converted.items() if not key.endswith("position_ids")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{name} does not match {type(model).__name__}: missing {missing}, unexpected {unexpected}.")
    model.load_state_dict(converted, strict=True)


def _convert_text_encoders(state: dict, pixel: bool, head_dim: int, report: PixelSDXLConversionReport):
    te1_keys = [key for key in state if key.startswith(TE1_PREFIX)]
    te2_keys = [key for key in state if key.startswith(TE2_PREFIX)]
    if not te1_keys or not te2_keys:
        raise ValueError(
            f"The checkpoint lacks a text encoder: {len(te1_keys)} keys under {TE1_PREFIX!r}, {len(te2_keys)} under "
            f"{TE2_PREFIX!r} (an SDXL checkpoint has both)."
        )
    text_encoder = CLIPTextModel(_clip_config(state, TE1_PREFIX, False, head_dim))
    _load_text_encoder(text_encoder, convert_ldm_clip_checkpoint({k: state[k] for k in te1_keys}, TE1_PREFIX), "text encoder 1")
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(state, TE2_PREFIX, True, head_dim))
    converted = convert_open_clip_checkpoint(text_encoder_2, {k: state[k] for k in te2_keys}, prefix=TE2_PREFIX)
    if pixel:
        converted["text_projection.weight"] = converted["text_projection.weight"].T.contiguous()
        report.notes.append("text_projection kept as upstream pixel-SDXL loads it (untransposed; see module docstring).")
    _load_text_encoder(text_encoder_2, converted, "text encoder 2")
    for key in te1_keys + te2_keys:
        if key.endswith("position_ids"):
            report.dropped.setdefault("CLIP position ids (a constant buffer)", []).append(key)
        elif key == TE2_PREFIX + "logit_scale":
            report.dropped.setdefault("OpenCLIP logit_scale (only used for image-text similarity)", []).append(key)
        else:
            report.mapped[key] = "text_encoder." if key.startswith(TE1_PREFIX) else "text_encoder_2."
    return text_encoder.eval(), text_encoder_2.eval()


def _pixel_config_from_keys(unet_state: dict) -> dict:
    if "conv_encoder.stem_conv.weight" in unet_state:
        return {"patch_size": 32, "encoder_decoder_type": "conv"}
    weight = unet_state.get("patch_encoder.net.0.weight")
    if weight is None:
        raise ValueError("The pixel checkpoint has neither patch_encoder.net.0.weight nor conv_encoder.stem_conv.weight.")
    patch_size = int(round((weight.shape[1] / 3) ** 0.5))
    blocks = {int(k.split(".")[2]) for k in unet_state if re.match(r"^patch_encoder\.net\.\d+\.conv1\.", k)}
    return {"patch_size": patch_size, "patch_hidden_channels": weight.shape[0], "num_patch_res_blocks": len(blocks)}


def _fill_unet(model: PixelSDXLUNet2DConditionModel, converted: dict, sources: dict, report, allow_fresh: bool) -> None:
    """Load `converted` (diffusers names) strictly; SDXL parts outside the body are dropped with a reason."""
    expected = model.state_dict()
    first = model.first_level
    outside = ("conv_in.", "conv_norm_out.", "conv_out.", *[f"down_blocks.{i}." for i in range(first)])
    levels = len(model.config.block_out_channels)
    outside += tuple(f"up_blocks.{i}." for i in range(levels - first, levels))
    outside += (f"up_blocks.{levels - 1 - first}.upsamplers.",)
    unexpected = []
    for key, value in converted.items():
        if key in expected:
            report.mapped[sources[key]] = key
        elif key.startswith(outside):
            report.dropped.setdefault(f"SDXL U-Net part above the patch grid's level (patch {model.config.patch_size})", []).append(sources[key])
        else:
            unexpected.append(sources[key])
    missing = [key for key in expected if key not in converted]
    coders = ("patch_encoder.", "patch_decoder.", "conv_encoder.", "conv_decoder.")
    fresh = [key for key in missing if allow_fresh and key.startswith(coders)]
    missing = [key for key in missing if key not in fresh]
    if missing or unexpected:
        raise ValueError(
            f"The U-Net weights do not match PixelSDXLUNet2DConditionModel({report.config}). Missing keys (ours): "
            f"{missing}. Unexpected source keys: {sorted(unexpected)}."
        )
    mismatched = [
        f"{sources[key]}: {tuple(converted[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in converted and converted[key].shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError(f"U-Net tensors of the wrong shape (source vs model): {mismatched}.")
    kept = {key: value for key, value in converted.items() if key in expected}
    model.load_state_dict({**{key: expected[key] for key in fresh}, **kept}, strict=True)
    report.fresh = fresh


def _from_single_file(src: Path, overrides: dict, head_dim: int, seed: int):
    state = _load_file(src)
    unet_state = {key[len(UNET_PREFIX) :]: value for key, value in state.items() if key.startswith(UNET_PREFIX)}
    if not unet_state:
        raise ValueError(f"src={str(src)!r} has no '{UNET_PREFIX}*' keys; it is not an SGM-layout SDXL checkpoint.")
    pixel = "input_blocks.0.0.weight" not in unet_state
    if pixel:
        kind = "upstream pixel-SDXL checkpoint"
        config = {**_pixel_config_from_keys(unet_state), **overrides}
    else:
        kind = "latent SDXL single file"
        config = {**PIXEL_SDXL_PRESETS["patch16"], **overrides}
    report = PixelSDXLConversionReport(source=str(src), kind=kind, config={})
    torch.manual_seed(seed)
    unet = PixelSDXLUNet2DConditionModel(**config)
    report.config = {key: value for key, value in unet.config.items() if not key.startswith("_")}

    converted, sources, unknown = {}, {}, []
    for key, value in unet_state.items():
        ours = sgm_unet_key_to_diffusers(key, unet.config.layers_per_block)
        if ours is None:
            unknown.append(UNET_PREFIX + key)
            continue
        converted[ours], sources[ours] = value, UNET_PREFIX + key
    others = [key for key in state if not key.startswith((UNET_PREFIX, TE1_PREFIX, TE2_PREFIX))]
    for key in others:
        reason = next((r for p, r in _DROPPED_PREFIXES.items() if key.startswith(p)), None)
        if reason is None:
            unknown.append(key)
        else:
            report.dropped.setdefault(reason, []).append(key)
    if unknown:
        raise ValueError(f"src={str(src)!r} has keys that are neither pixel-SDXL nor SDXL tensors: {sorted(unknown)}.")
    _fill_unet(unet, converted, sources, report, allow_fresh=not pixel)
    if report.fresh:
        report.notes.append("the patch encoder/decoder start from a fresh initialisation (train them: stage 1/2).")
    text_encoder, text_encoder_2 = _convert_text_encoders(state, pixel, head_dim, report)
    return {"unet": unet.eval(), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, report


def _from_diffusers_folder(src: Path, overrides: dict, seed: int):
    from diffusers.models.model_loading_utils import load_state_dict
    from transformers import CLIPTokenizer

    config_path = src / "unet" / "config.json"
    if not config_path.is_file():
        raise ValueError(f"src={str(src)!r} is a folder without unet/config.json; expected a diffusers SDXL folder.")
    source_config = json.loads(config_path.read_text())
    if source_config.get("addition_embed_type") != "text_time":
        raise ValueError(f"{config_path} is not an SDXL U-Net (addition_embed_type must be 'text_time').")
    config = {ours: source_config[theirs] for theirs, ours in _CONFIG_FROM_DIFFUSERS.items() if theirs in source_config}
    for name in ("transformer_layers_per_block", "num_attention_heads"):
        if isinstance(config.get(name), int):
            config[name] = (config[name],) * len(config["block_out_channels"])
    config = {**PIXEL_SDXL_PRESETS["patch16"], **config, **overrides}
    weights = sorted((src / "unet").glob("diffusion_pytorch_model*.safetensors"))
    weights = [path for path in weights if len(path.name.split(".")) == 2 or "-of-" in path.name]
    if not weights:
        raise ValueError(f"No unet/diffusion_pytorch_model*.safetensors in {str(src)!r}.")
    state = {}
    for path in weights:
        state.update(load_state_dict(str(path)))

    report = PixelSDXLConversionReport(source=str(src), kind="diffusers SDXL folder", config={})
    torch.manual_seed(seed)
    unet = PixelSDXLUNet2DConditionModel(**config)
    report.config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    _fill_unet(unet, state, {key: "unet/" + key for key in state}, report, allow_fresh=True)
    if report.fresh:
        report.notes.append("the patch encoder/decoder start from a fresh initialisation (train them: stage 1/2).")
    components = {
        "unet": unet.eval(),
        "text_encoder": CLIPTextModel.from_pretrained(src / "text_encoder").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(src / "text_encoder_2").eval(),
    }
    for name in ("tokenizer", "tokenizer_2"):
        if (src / name).is_dir():
            components[name] = CLIPTokenizer.from_pretrained(src / name)
    return components, report


def convert_pixel_sdxl_checkpoint(
    src: str | Path, unet_config: dict | None = None, clip_head_dim: int = 64, seed: int = 0
) -> tuple[dict, PixelSDXLConversionReport]:
    """Convert SDXL or upstream pixel-SDXL weights (see the module docstring for the accepted sources).

    Args:
        src: an SGM-layout `.safetensors`/`.ckpt`/`.pt`/`.pth` file or a diffusers SDXL folder.
        unet_config: config fields of the pixel U-Net to use instead of the defaults, e.g. `{"patch_size": 32,
            "patch_hidden_channels": 768, "num_patch_res_blocks": 4}` (the "patch32" preset) when converting a latent
            SDXL. An upstream pixel checkpoint's patch size and coder sizes are read from its keys.
        clip_head_dim: attention head width of the CLIP encoders of a single file (64 for SDXL's).
        seed: seeds the fresh initialisation of the patch encoder/decoder.

    Returns:
        (components, report): `components` holds `unet`, `text_encoder`, `text_encoder_2` (and the tokenizers found
        in a diffusers folder), ready for `PixelSDXLPipeline(**components, scheduler=..., tokenizer=...,
        tokenizer_2=...)`.
    """
    src = Path(src)
    overrides = dict(unet_config or {})
    if src.is_dir():
        return _from_diffusers_folder(src, overrides, seed)
    if not src.is_file():
        raise ValueError(f"src={str(src)!r} is neither a checkpoint file nor a diffusers folder.")
    if src.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise ValueError(f"src={str(src)!r} must end in .safetensors, .ckpt, .pt or .pth.")
    return _from_single_file(src, overrides, clip_head_dim, seed)


# ---------------------------------------------------------------------------------------------------------------
# Command line: `pixel-diffusers convert pixel-sdxl SRC DST`
# ---------------------------------------------------------------------------------------------------------------
def _run(args) -> None:
    from transformers import CLIPTokenizer

    from ..pipelines.pixel_sdxl.pipeline_pixel_sdxl import PixelSDXLPipeline
    from ..schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler

    overrides = {} if args.preset is None else dict(PIXEL_SDXL_PRESETS[args.preset])
    components, report = convert_pixel_sdxl_checkpoint(args.src, unet_config=overrides, seed=args.seed)
    if args.tokenizer:
        components["tokenizer"] = CLIPTokenizer.from_pretrained(args.tokenizer)
    if args.tokenizer_2:
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(args.tokenizer_2)
        components["tokenizer_2"].pad_token = "!"  # open_clip pads with id 0
    if "tokenizer" in components and "tokenizer_2" in components:
        scheduler = PixelFlowMatchScheduler(solver="euler", prediction_type="sample", shift=3.0, sigma_max=1.0)
        save_converted(PixelSDXLPipeline(scheduler=scheduler, **components), report, args.dst)
        return
    print(report)
    dst = Path(args.dst)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        components[name].save_pretrained(dst / name)
    print(
        f"saved unet/, text_encoder/, text_encoder_2/ to {dst}; pass --tokenizer and --tokenizer-2 (CLIP ViT-L and "
        "OpenCLIP bigG tokenizers, e.g. a diffusers SDXL repo's tokenizer/ and tokenizer_2/) to save a full pipeline."
    )


def add_subparser(subparsers) -> None:
    """Registers `pixel-sdxl` under `pixel-diffusers convert`."""
    parser = add_convert_command(
        subparsers, "pixel-sdxl", "an SDXL single file, a diffusers SDXL folder or an upstream pixel-SDXL checkpoint",
        _run, "SGM-layout .safetensors/.ckpt/.pt/.pth file, or a diffusers SDXL folder", "the output folder",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(name for name in PIXEL_SDXL_PRESETS if name != "for_testing"),
        default=None,
        help="pixel U-Net configuration for a latent SDXL source (default patch16; pixel checkpoints are detected)",
    )
    parser.add_argument("--tokenizer", default=None, help="CLIP ViT-L tokenizer (folder or Hub id)")
    parser.add_argument("--tokenizer_2", "--tokenizer-2", dest="tokenizer_2", default=None, help="OpenCLIP bigG tokenizer (folder or Hub id)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh patch encoder/decoder")
