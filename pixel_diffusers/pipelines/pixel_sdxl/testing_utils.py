"""Tiny, deterministic pixel-SDXL components built entirely in code (nothing is downloaded)."""

from __future__ import annotations

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ...models.unets.unet_pixel_sdxl import PixelSDXLUNet2DConditionModel
from ...schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
from .pipeline_pixel_sdxl import PixelSDXLPipeline

TINY_CLIP_WIDTH = 32


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
