"""Strict loading: a folder on disk either fills a model exactly, with finite weights, or the load raises.

diffusers' `ModelMixin.from_pretrained`, transformers' `PreTrainedModel.from_pretrained` and the LoRA loaders only
log missing, unexpected or (with `ignore_mismatched_sizes`) misshapen weights and go on with uninitialised or random
tensors; a tokenizer whose folder is gone loads as an empty vocabulary. Deliberate difference from upstream: here
each of those is a `ValueError` that lists the keys.

- [`StrictModelMixin`] (first base of every model of the package): `from_pretrained` and `load_lora_adapter`.
- [`StrictPipelineMixin`] (first base of every pipeline): `from_pretrained` checks every component, including the
  transformers text encoders and tokenizers, and `load_lora_weights` must load at least one adapter.
- [`check_state_dict`]: the same key, shape and finiteness check for code that loads a state dict itself.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch

__all__ = ["StrictModelMixin", "StrictPipelineMixin", "check_state_dict", "nonfinite_keys"]

_SHOWN = 20  # keys listed per kind of problem; the count says how many there are


def nonfinite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or +-inf (tensors on the meta device are skipped)."""
    return [
        key
        for key, value in state_dict.items()
        if torch.is_tensor(value)
        and value.is_floating_point()
        and value.device.type != "meta"
        and not bool(torch.isfinite(value).all())
    ]


def _listed(keys: Iterable) -> str:
    keys = sorted(str(k) for k in keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more}"


def raise_for_bad_load(
    what: str,
    source,
    missing: Iterable = (),
    unexpected: Iterable = (),
    mismatched: Iterable = (),
    nonfinite: Iterable = (),
) -> None:
    """Raises a ValueError naming `what` (a class / component), `source` (a path or repo id) and every bad key."""
    missing, unexpected, mismatched, nonfinite = (list(x or ()) for x in (missing, unexpected, mismatched, nonfinite))
    problems = []
    if missing:
        problems.append(f"missing weights (not in the checkpoint): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected weights (not in the model): {_listed(unexpected)}")
    if mismatched:
        shapes = [f"{key}: checkpoint {tuple(a)} vs model {tuple(b)}" for key, a, b in mismatched]
        problems.append(f"weights of the wrong shape: {_listed(shapes)}")
    if nonfinite:
        problems.append(f"weights holding NaN or inf: {_listed(nonfinite)}")
    if problems:
        raise ValueError(
            f"Loading {what} from {str(source)!r} failed strict loading: " + "; ".join(problems) + ". The checkpoint "
            "does not match the model's config (an edited config or a damaged / foreign checkpoint)."
        )


def check_state_dict(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, source
) -> None:
    """Raises unless `state_dict` has exactly the keys of `expected` (a model's state dict), the same shapes and only
    finite values."""
    mismatched = [
        (key, state_dict[key].shape, value.shape)
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    raise_for_bad_load(
        what,
        source,
        missing=set(expected) - set(state_dict),
        unexpected=set(state_dict) - set(expected),
        mismatched=mismatched,
        nonfinite=nonfinite_keys(state_dict),
    )


@contextlib.contextmanager
def _patched(module, name: str, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def _raise_on_unhandled_lora_keys(original):
    # diffusers' LoRA loader only *logs* the LoRA keys peft could not place (its `_maybe_warn_for_unhandled_keys`);
    # no argument turns that into an error, so the report function is swapped for one that raises.
    def check(incompatible_keys, adapter_name):
        unexpected = [k for k in getattr(incompatible_keys, "unexpected_keys", None) or [] if ".lora_" in k or "lokr_" in k]
        missing = [
            k
            for k in getattr(incompatible_keys, "missing_keys", None) or []
            if (".lora_" in k or "lokr_" in k) and adapter_name in k
        ]
        raise_for_bad_load(f"LoRA adapter {adapter_name!r}", "the given LoRA weights", missing, unexpected)

    return check


class StrictModelMixin:
    """Strict `from_pretrained` and `load_lora_adapter` for `ModelMixin` subclasses (put it first in the bases)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, raising a ValueError that lists missing, unexpected, misshapen or
        non-finite weights (diffusers logs them and computes on uninitialised memory)."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        raise_for_bad_load(
            cls.__name__,
            pretrained_model_name_or_path,
            info["missing_keys"],
            info["unexpected_keys"],
            info["mismatched_keys"],
            nonfinite_keys(model.state_dict()),
        )
        return (model, info) if output_loading_info else model

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        """diffusers' `load_lora_adapter`; LoRA keys that match no layer, layers left without their LoRA weights and
        non-finite LoRA weights raise a ValueError (the adapter is removed again) instead of a logged warning."""
        import diffusers.loaders.peft as peft_loader

        if not hasattr(super(), "load_lora_adapter"):
            raise TypeError(f"{type(self).__name__} does not support LoRA adapters.")
        before = set(getattr(self, "peft_config", None) or {})
        try:
            with _patched(peft_loader, "_maybe_warn_for_unhandled_keys", _raise_on_unhandled_lora_keys):
                result = super().load_lora_adapter(pretrained_model_name_or_path_or_dict, *args, **kwargs)
            added = sorted(set(getattr(self, "peft_config", None) or {}) - before)
            bad = [
                name
                for name, value in self.named_parameters()
                if ".lora_" in name and any(f".{a}." in name or name.endswith(f".{a}") for a in added)
                and not bool(torch.isfinite(value).all())
            ]
            raise_for_bad_load(f"LoRA adapter(s) {added} of {type(self).__name__}", "the given LoRA weights", nonfinite=bad)
        except ValueError:
            added = sorted(set(getattr(self, "peft_config", None) or {}) - before)
            if added:
                self.delete_adapters(added)
            raise
        return result


def _record_transformers_reports(original):
    # transformers' `from_pretrained` only logs its load report (missing / unexpected / mismatched keys) and
    # random-initialises what is missing; its report function is the one place that sees every model it loads.
    def record(model, pretrained_model_name_or_path, ignore_mismatched_sizes, loading_info, logger=None):
        _TRANSFORMERS_REPORTS.append((model, pretrained_model_name_or_path, loading_info))
        return original(model, pretrained_model_name_or_path, ignore_mismatched_sizes, loading_info, logger)

    return record


_TRANSFORMERS_REPORTS: list = []


def _snapshot_folder(pretrained_model_name_or_path, kwargs) -> str | None:
    """The local folder a pipeline was loaded from (after `from_pretrained` downloaded it)."""
    if os.path.isdir(pretrained_model_name_or_path):
        return str(pretrained_model_name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            pretrained_model_name_or_path,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            local_files_only=True,
        )
    except Exception:  # not a Hub cache entry (e.g. a custom download): the per-component checks still run
        return None


def check_tokenizer(tokenizer, name: str, source) -> None:
    """Raises when a tokenizer holds no vocabulary beyond its special tokens (transformers builds such an empty
    tokenizer when its files are missing, and every prompt then encodes to nothing)."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocabulary = set(tokenizer.get_vocab().values()) - specials
    if not vocabulary:
        raise ValueError(
            f"Component {name!r} loaded from {str(source)!r} is an empty tokenizer (no tokens besides {sorted(specials)}): "
            "its tokenizer files are missing or incomplete."
        )


class StrictPipelineMixin:
    """Strict `from_pretrained` and `load_lora_weights` for `DiffusionPipeline` subclasses (first in the bases)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, raising a ValueError when a component folder named in `model_index.json` is
        missing, a text encoder's weights are missing, unexpected, misshapen or non-finite, or a tokenizer is empty.
        Our own models check themselves ([`StrictModelMixin`])."""
        import transformers.modeling_utils as transformers_modeling

        start = len(_TRANSFORMERS_REPORTS)
        with _patched(transformers_modeling, "log_state_dict_report", _record_transformers_reports):
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        reports = _TRANSFORMERS_REPORTS[start:]
        del _TRANSFORMERS_REPORTS[start:]

        folder = _snapshot_folder(pretrained_model_name_or_path, kwargs)
        for name, component in pipe.components.items():
            declared = pipe.config.get(name)
            if component is None or not (isinstance(declared, (list, tuple)) and declared[0] is not None):
                continue
            if folder is not None and name not in kwargs and not os.path.isdir(os.path.join(folder, name)):
                raise ValueError(
                    f"Component {name!r} ({declared[1]}) is listed in model_index.json but {folder!r} has no {name}/ "
                    "folder: the pipeline folder is incomplete."
                )
            if name in kwargs:
                continue
            report = next(((source, info) for model, source, info in reports if model is component), None)
            if report is not None:
                source, info = report
                raise_for_bad_load(
                    f"{name} ({type(component).__name__})",
                    source,
                    info.missing_keys,
                    info.unexpected_keys,
                    info.mismatched_keys,
                    nonfinite_keys(component.state_dict()),
                )
            elif isinstance(component, torch.nn.Module) and not isinstance(component, StrictModelMixin):
                nonfinite = nonfinite_keys(component.state_dict())
                raise_for_bad_load(f"{name} ({type(component).__name__})", pretrained_model_name_or_path, nonfinite=nonfinite)
            if hasattr(component, "get_vocab") and hasattr(component, "all_special_ids"):
                check_tokenizer(component, name, pretrained_model_name_or_path)
        return pipe

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        """The pipeline's LoRA loader, raising when the weights load into no component at all (diffusers logs that
        "no LoRA keys" were found and goes on without the adapter)."""
        parent = super()
        if not hasattr(parent, "load_lora_weights"):
            raise TypeError(f"{type(self).__name__} does not support LoRA weights.")
        modules = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        before = [set(getattr(m, "peft_config", None) or {}) for m in modules]
        result = parent.load_lora_weights(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        after = [set(getattr(m, "peft_config", None) or {}) for m in modules]
        if all(a == b for a, b in zip(after, before)):
            source = "the given state dict" if isinstance(pretrained_model_name_or_path_or_dict, dict) else pretrained_model_name_or_path_or_dict
            raise ValueError(
                f"No LoRA weights in {str(source)!r} match a component of {type(self).__name__} "
                f"({[n for n, m in self.components.items() if isinstance(m, torch.nn.Module)]}): nothing was loaded."
            )
        return result
