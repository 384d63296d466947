"""Upstream PixelHDM checkpoint conversion: layouts, EMA selection, aliases, leftovers, errors."""

import re

import pytest
import torch
from safetensors.torch import save_file

from pixel_diffusers.conversion import convert_pixelhdm_checkpoint
from pixel_diffusers.models.transformers.transformer_pixelhdm import PixelHDMTransformer2DModel

# Our key -> upstream key (upstream module names as in src/models of yetrtyog-creator/PixelHDM).
TO_UPSTREAM = [
    (r"^pixel_embed\.", "pixel_embed.proj."),
    (r"^time_embed\.linear_1\.", "time_embed.mlp.0."),
    (r"^time_embed\.linear_2\.", "time_embed.mlp.2."),
    (r"^norm_out\.", "output_norm."),
    (r"^proj_out\.", "output_proj.proj."),
    (r"^(patch_blocks\.\d+\.adaln)\.", r"\1.proj.1."),
    (r"^(pixel_blocks\.\d+\.adaln)\.linear\.", r"\1.param_gen.1."),
    (r"\.compaction\.norm_in\.", ".compaction.norm."),
    (r"\.compaction\.norm_out\.", ".compaction.post_norm."),
    (r"\.ff\.", ".mlp."),
    (r"\.attn\.to_([qkv])\.", r".attention.qkv_proj.\1_proj."),
    (r"\.attn\.to_out\.0\.", ".attention.out_proj_layer.out_proj."),
    (r"\.attn\.to_gate\.", ".attention.gate.proj."),
    (r"\.attn\.norm_([qk])\.", r".attention.\1_norm."),
]

UPSTREAM_CONFIG = {  # what upstream's PixelHDMConfig.for_testing().to_dict() holds (the relevant part)
    "hidden_dim": 256,
    "pixel_dim": 8,
    "patch_size": 16,
    "patch_layers": 2,
    "pixel_layers": 1,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
    "mlp_ratio": 2.0,
    "mlp_type": "swiglu",
    "bottleneck_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "repa_enabled": False,
    "repa_local_path": None,
    "repa_align_layer": 1,
    "text_encoder_name": "Qwen/Qwen3-0.6B",
    "text_hidden_size": 256,
    "norm_eps": 1e-6,
    "mrope_text_dim": 16,
    "mrope_img_h_dim": 24,
    "mrope_img_w_dim": 24,
    "mrope_theta": 10000.0,
    "gate_type": "headwise",
    "token_compaction_expand_gain": 0.1,
}


def to_upstream(model, with_aliases=True, leftovers=True):
    state = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in TO_UPSTREAM:
            key = re.sub(pattern, replacement, key)
        state[key] = value.clone()
        if with_aliases:  # upstream re-registers these modules, so its state dict repeats them
            for canonical, alias in [
                (".attention.qkv_proj.q_proj.", ".attention.q_proj."),
                (".attention.qkv_proj.k_proj.", ".attention.k_proj."),
                (".attention.qkv_proj.v_proj.", ".attention.v_proj."),
                (".attention.out_proj_layer.out_proj.", ".attention.out_proj."),
                (".attention.gate.proj.", ".attention.gate_proj."),
            ]:
                if canonical in key:
                    state[key.replace(canonical, alias)] = value.clone()
    if leftovers:
        state["_dino_projector.0.weight"] = torch.randn(4, 4)
        state["_dino_projector.2.bias"] = torch.randn(4)
        state["_text_encoder.model.embed_tokens.weight"] = torch.randn(3, 4)
    return state


def reference_model(seed=0):
    torch.manual_seed(seed)
    model = PixelHDMTransformer2DModel.from_preset("for_testing").eval()
    with torch.no_grad():  # make every tensor informative (gates and biases are zero at init)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def outputs(model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, 48, generator=g)
    text = torch.randn(2, 6, 256, generator=g)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    pooled = torch.randn(2, 256, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([900.0, 100.0]), text, mask, pooled).sample


def test_training_checkpoint_with_ema_model_and_config(tmp_path):
    ema_model, train_model = reference_model(0), reference_model(1)
    shadow = {k: v for k, v in to_upstream(ema_model, with_aliases=False, leftovers=False).items()}
    path = tmp_path / "checkpoint_step100.pt"
    torch.save(
        {
            "checkpoint_format_version": 2,
            "model": to_upstream(train_model),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "state": {"step": 100, "epoch": 1},
            "config": UPSTREAM_CONFIG,
            "ema": {"shadow": shadow, "decay": 0.999, "num_updates": 100},
        },
        path,
    )
    model, report = convert_pixelhdm_checkpoint(path)
    assert report.weights.startswith("EMA") and report.config_source == "upstream checkpoint config"
    torch.testing.assert_close(outputs(model), outputs(ema_model), rtol=0, atol=0)
    assert dict(model.config)["repa_align_layer"] == 1

    model, report = convert_pixelhdm_checkpoint(path, use_ema=False)
    torch.testing.assert_close(outputs(model), outputs(train_model), rtol=0, atol=0)
    text = str(report)
    assert "duplicate alias" in text and "dropped 15" in text  # 3 attentions x 5 aliases
    assert "_dino_projector" in text and "_text_encoder" in text
    assert len(report.dropped["upstream T2I wrapper's unused DINO feature projector"]) == 2
    assert report.mapped["patch_blocks.0.attention.qkv_proj.q_proj.weight"] == "patch_blocks.0.attn.to_q.weight"


def test_ema_fallback_and_missing_ema_parameters(tmp_path):
    train_model = reference_model(1)
    path = tmp_path / "no_ema.pt"
    torch.save({"model": to_upstream(train_model), "config": UPSTREAM_CONFIG}, path)
    model, report = convert_pixelhdm_checkpoint(path, use_ema=True)
    assert any("no EMA weights" in note for note in report.notes)
    torch.testing.assert_close(outputs(model), outputs(train_model), rtol=0, atol=0)

    # An EMA shadow that lacks a parameter takes it from 'model', and says so.
    ema_model = reference_model(0)
    shadow = to_upstream(ema_model, with_aliases=False, leftovers=False)
    del shadow["output_proj.proj.bias"]
    torch.save({"model": to_upstream(train_model), "ema": {"shadow": shadow}, "config": UPSTREAM_CONFIG}, path)
    model, report = convert_pixelhdm_checkpoint(path)
    assert any("proj_out.bias" in note for note in report.notes)
    torch.testing.assert_close(model.proj_out.bias, train_model.proj_out.bias, rtol=0, atol=0)
    torch.testing.assert_close(model.proj_out.weight, ema_model.proj_out.weight, rtol=0, atol=0)


def test_safetensors_and_plain_state_dicts(tmp_path):
    reference = reference_model(2)
    state = to_upstream(reference, leftovers=False)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model, report = convert_pixelhdm_checkpoint(tmp_path / "model.safetensors", preset="for_testing")
    assert report.config_source == "preset 'for_testing'"
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)
    single = PixelHDMTransformer2DModel.from_single_file(tmp_path / "model.safetensors", preset="for_testing")
    torch.testing.assert_close(outputs(single), outputs(reference), rtol=0, atol=0)

    # No config and no preset: inferred from the shapes; a torch.compile prefix is stripped.
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "plain.pt")
    model, report = convert_pixelhdm_checkpoint(tmp_path / "plain.pt")
    assert report.config_source == "inferred from tensor shapes"
    assert any("_orig_mod." in note for note in report.notes)
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)

    # The converted model saves and reloads like any diffusers model (what the CLI does).
    model.save_pretrained(tmp_path / "converted")
    reloaded = PixelHDMTransformer2DModel.from_pretrained(tmp_path / "converted").eval()
    torch.testing.assert_close(outputs(reloaded), outputs(reference), rtol=0, atol=0)


def test_unknown_missing_and_inconsistent_keys_raise(tmp_path):
    state = to_upstream(reference_model(0))
    path = tmp_path / "bad.pt"

    torch.save({"model": {**state, "patch_blocks.0.extra.weight": torch.zeros(2)}, "config": UPSTREAM_CONFIG}, path)
    with pytest.raises(ValueError, match=r"patch_blocks\.0\.extra\.weight"):
        convert_pixelhdm_checkpoint(path)

    incomplete = dict(state)
    del incomplete["pixel_blocks.0.compaction.expand.weight"]
    torch.save({"model": incomplete, "config": UPSTREAM_CONFIG}, path)
    with pytest.raises(ValueError, match=r"pixel_blocks\.0\.compaction\.expand\.weight"):
        convert_pixelhdm_checkpoint(path)

    inconsistent = dict(state)
    inconsistent["patch_blocks.1.attention.gate_proj.weight"] = torch.randn_like(
        inconsistent["patch_blocks.1.attention.gate_proj.weight"]
    )
    torch.save({"model": inconsistent, "config": UPSTREAM_CONFIG}, path)
    with pytest.raises(ValueError, match="gate_proj"):
        convert_pixelhdm_checkpoint(path)

    torch.save({"model": state, "config": {**UPSTREAM_CONFIG, "hidden_dim": 512, "num_heads": 8}}, path)
    with pytest.raises(ValueError, match="wrong shape"):
        convert_pixelhdm_checkpoint(path)

    torch.save({"model": state, "config": {**UPSTREAM_CONFIG, "gate_type": "elementwise"}}, path)
    with pytest.raises(ValueError, match="gate_type"):
        convert_pixelhdm_checkpoint(path)

    torch.save({"weights": state, "step": 3}, path)
    with pytest.raises(ValueError, match="neither 'model' nor 'ema.shadow'"):
        convert_pixelhdm_checkpoint(path)

    with pytest.raises(ValueError, match="preset"):
        convert_pixelhdm_checkpoint(path, preset="huge")
    with pytest.raises(ValueError, match="not a file"):
        convert_pixelhdm_checkpoint(tmp_path / "missing.pt")


class NotATensor:
    pass


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"model": {}, "object": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        convert_pixelhdm_checkpoint(path)
