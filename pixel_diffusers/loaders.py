"""Loading mixins: LoRA for the pipelines whose one adaptable component is `transformer` (PixelHDM, JiT, PixelDLM), and
`from_single_file` for models with an upstream checkpoint format."""

from __future__ import annotations

import os

import torch
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.loaders.single_file_utils import _extract_repo_id_and_weights_name, is_valid_url
from huggingface_hub import hf_hub_download

__all__ = ["FromUpstreamSingleFileMixin", "TransformerLoraLoaderMixin"]


class TransformerLoraLoaderMixin(SanaLoraLoaderMixin):
    """diffusers' transformer-only LoRA contract (Sana's): `load_lora_weights`, `save_lora_weights(folder,
    transformer_lora_layers=..., transformer_lora_adapter_metadata=...)`, `set_adapters`, `fuse_lora`,
    `unload_lora_weights`. Saved adapter metadata (rank, alpha, targets) is restored on load."""


class FromUpstreamSingleFileMixin:
    """`from_single_file`, diffusers' way to load an original-format checkpoint, for our models: the file goes through
    the model's upstream converter (`pixel_diffusers.conversion`), which loads strictly (missing, unexpected or
    misshapen tensors raise with the keys listed) and reads `.pt`/`.pth` files with `torch.load(weights_only=True)`.

    Subclasses implement `_convert_single_file(path, **converter_kwargs) -> model`."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        **converter_kwargs,
    ):
        """Loads an upstream checkpoint: a local file, or a Hub file URL
        (`https://huggingface.co/<org>/<repo>/blob/main/<file>`, downloaded into the Hugging Face cache).
        `converter_kwargs` go to the converter (see the model's `_convert_single_file`)."""
        path = str(pretrained_model_link_or_path)
        if is_valid_url(path):
            repo_id, filename = _extract_repo_id_and_weights_name(path)
            if filename is None:
                raise ValueError(f"pretrained_model_link_or_path={path!r} is a URL but names no file of a Hub repo.")
            path = hf_hub_download(repo_id, filename, cache_dir=cache_dir, token=token, revision=revision,
                                   local_files_only=bool(local_files_only))
        elif not os.path.isfile(path):
            raise ValueError(f"pretrained_model_link_or_path={path!r} is neither a file nor a Hub file URL.")
        model = cls._convert_single_file(path, **converter_kwargs)
        return (model.to(torch_dtype) if torch_dtype is not None else model).eval()

    @classmethod
    def _convert_single_file(cls, path: str, **converter_kwargs):
        raise NotImplementedError
