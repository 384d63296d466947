"""Tiny, deterministic components built entirely in code, for tests, demos and examples (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
)

from .models.analytic import WienerDenoiser
from .models.small import SmallUNet
from .models.transformers.transformer_jit import JiTTransformer2DModel
from .models.transformers.transformer_pixelhdm import PixelHDMTransformer2DModel
from .models.unets.unet_pixel_sdxl import PixelSDXLUNet2DConditionModel
from .pipelines.analytic.pipeline_analytic import AnalyticDiffusionPipeline, studio_scheduler
from .pipelines.jit.pipeline_jit import JiTPipeline
from .pipelines.pixel_sdxl.pipeline_pixel_sdxl import PixelSDXLPipeline
from .pipelines.pixeldlm.pipeline_pixeldlm import PixelDLMPipeline
from .pipelines.pixelhdm.pipeline_pixelhdm import PixelHDMPipeline
from .pipelines.small.pipeline_small import SmallDiffusionPipeline
from .schedulers.scheduling_gradient_estimation import GradientEstimationScheduler
from .schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler

END_OF_TEXT = "<|endoftext|>"
TINY_CLIP_WIDTH = 32


def make_tiny_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer of the Qwen family: one token per UTF-8 byte, plus Qwen's end-of-text pad token."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocab[END_OF_TEXT] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def make_tiny_qwen3_text_encoder(hidden_size: int = 256, seed: int = 0) -> Qwen3Model:
    """A two-layer Qwen3 encoder sized for `make_tiny_tokenizer`, randomly initialised from `seed`."""
    config = Qwen3Config(
        vocab_size=257,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        pad_token_id=256,
        eos_token_id=256,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def make_tiny_pixelhdm_pipeline(seed: int = 0, solver: str = "heun") -> PixelHDMPipeline:
    """A complete `PixelHDMPipeline` with the `for_testing` transformer (3.9M parameters) and a tiny Qwen3 encoder.

    The same `seed` always gives the same weights, so outputs are reproducible across processes and machines.
    """
    torch.manual_seed(seed)
    transformer = PixelHDMTransformer2DModel.from_preset("for_testing")
    text_encoder = make_tiny_qwen3_text_encoder(transformer.config.text_embed_dim, seed=seed + 1)
    return PixelHDMPipeline(
        transformer=transformer.eval(),
        scheduler=PixelFlowMatchScheduler(solver=solver),
        text_encoder=text_encoder,
        tokenizer=make_tiny_tokenizer(),
    )


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds N(0, 0.1^2) noise to every parameter, so that zero-initialised output layers do not hide the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def make_tiny_jit_pipeline(seed: int = 0, **transformer_overrides) -> JiTPipeline:
    """A `JiTPipeline` with a 16² JiT of 3 classes (two blocks of width 32), random weights from `seed`;
    `transformer_overrides` are config fields that shape no weight (e.g. `id2label`)."""
    torch.manual_seed(seed)
    transformer = JiTTransformer2DModel(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=2,
                                        bottleneck_dim=8, num_classes=3, in_context_len=2, in_context_start=1,
                                        **transformer_overrides)
    return JiTPipeline(_perturbed(transformer, seed + 1), PixelFlowMatchScheduler(solver="heun"))


def make_tiny_pixeldlm_pipeline(seed: int = 0) -> PixelDLMPipeline:
    """A `PixelDLMPipeline` with an 8×8 PixelDLM transformer and `make_tiny_tokenizer`, random weights from `seed`."""
    torch.manual_seed(seed)
    transformer = JiTTransformer2DModel(architecture="pixeldlm", sample_size=8, patch_size=2, hidden_size=32,
                                        num_layers=2, num_attention_heads=2)
    return PixelDLMPipeline(_perturbed(transformer, seed + 1), PixelFlowMatchScheduler(), make_tiny_tokenizer())


def make_tiny_clip_tokenizer(pad_with_zero: bool = False) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte (and its end-of-word form) and CLIP's start/end tokens, 77 long.

    `pad_with_zero` pads with id 0 as SDXL's second (open_clip) tokenizer does.
    """
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    if pad_with_zero:
        tokenizer.pad_token = alphabet[0]
    return tokenizer


def make_tiny_clip_config(projection: bool, width: int = TINY_CLIP_WIDTH) -> CLIPTextConfig:
    """Two-layer CLIP text config for `make_tiny_clip_tokenizer` (quick_gelu like CLIP-L, gelu like OpenCLIP-bigG)."""
    vocab_size = 2 * len(ByteLevel.alphabet()) + 2
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=width,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=0 if projection else vocab_size - 1,
    )


def make_tiny_pixel_sdxl_pipeline(seed: int = 0, **unet_overrides) -> PixelSDXLPipeline:
    """A complete `PixelSDXLPipeline` with the `for_testing` U-Net and two tiny CLIP text encoders (width 32 each, so
    the context is the preset's 64 wide and the pooled embedding 32). The same `seed` always gives the same weights."""
    torch.manual_seed(seed)
    unet = PixelSDXLUNet2DConditionModel.from_preset("for_testing", **unet_overrides)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(make_tiny_clip_config(projection=False))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(make_tiny_clip_config(projection=True))
    return PixelSDXLPipeline(
        unet=unet.eval(),
        scheduler=PixelFlowMatchScheduler(solver="euler", prediction_type="sample", shift=3.0, sigma_max=1.0),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=make_tiny_clip_tokenizer(),
        tokenizer_2=make_tiny_clip_tokenizer(pad_with_zero=True),
    )


def make_tiny_analytic_pipeline(seed: int = 0) -> AnalyticDiffusionPipeline:
    """An `AnalyticDiffusionPipeline` with a Wiener denoiser fitted to 24 random 4 x 4 images."""
    images = torch.rand(24, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return AnalyticDiffusionPipeline(WienerDenoiser(sample_size=4).fit(images), studio_scheduler())


def make_tiny_small_pipeline(seed: int = 0) -> SmallDiffusionPipeline:
    """A `SmallDiffusionPipeline` with an 8 x 8 one-channel `SmallUNet` (one level of attention)."""
    torch.manual_seed(seed)
    model = SmallUNet(8, 1, 1, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), num_res_blocks=1)
    return SmallDiffusionPipeline(_perturbed(model, seed), GradientEstimationScheduler(schedule="log_linear"))


def seed_hub_cache(folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike, tree_listing: bool = True) -> str:
    """Writes `folder` into a Hugging Face cache as the `main` revision of the model repo `repo_id`, offline.

    The layout is the one huggingface_hub creates on download (blobs named by git or LFS hash, a snapshot of
    symlinks, `refs/main`); with `tree_listing` it also writes the `trees/<commit>.json` listing that newer
    huggingface_hub versions cache. Returns the commit hash.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(str(p.relative_to(folder)) for p in files).encode()).hexdigest()
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    entries = {}
    for path in files:
        data = path.read_bytes()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry = {"size": len(data), "blob_id": blob_id}
        if path.suffix in (".safetensors", ".bin", ".pt"):
            entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
        etag = entry.get("lfs_sha256", blob_id)
        relative = path.relative_to(folder).as_posix()
        entries[relative] = entry
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    if tree_listing:
        (storage / "trees").mkdir(exist_ok=True)
        listing = {"format_version": 1, "files": entries}
        (storage / "trees" / f"{commit}.json").write_text(json.dumps(listing, indent=1))
    return commit
