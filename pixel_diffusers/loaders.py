"""LoRA loading for the pipelines whose one adaptable component is `transformer` (PixelHDM, JiT, PixelDLM)."""

from __future__ import annotations

from diffusers.loaders import SanaLoraLoaderMixin

__all__ = ["TransformerLoraLoaderMixin"]


class TransformerLoraLoaderMixin(SanaLoraLoaderMixin):
    """diffusers' transformer-only LoRA contract (Sana's): `load_lora_weights`, `save_lora_weights(folder,
    transformer_lora_layers=..., transformer_lora_adapter_metadata=...)`, `set_adapters`, `fuse_lora`,
    `unload_lora_weights`. Saved adapter metadata (rank, alpha, targets) is restored on load."""
