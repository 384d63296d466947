"""PixelHDMTransformer2DModel: shapes, parameter counts, init, presets, masking, precision, training features."""

import pytest
import torch

from pixel_diffusers.models.transformers import transformer_pixelhdm
from pixel_diffusers.models.transformers.transformer_pixelhdm import (
    PixelHDMTransformer2DModel,
    PixelHDMTransformerOutput,
)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return PixelHDMTransformer2DModel.from_preset("for_testing", **overrides).eval()


def inputs(batch=2, height=32, width=48, text=5, dim=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 3, height, width, generator=g),
        torch.tensor([700.0, 250.0][:batch]),
        torch.randn(batch, text, dim, generator=g),
        torch.randn(batch, dim, generator=g),
    )


def test_parameter_counts_match_upstream():
    assert n_params(tiny()) == 3_942_651
    with torch.device("meta"):
        assert n_params(PixelHDMTransformer2DModel.from_preset("default")) == 356_364_355
        assert n_params(PixelHDMTransformer2DModel.from_preset("default", bottleneck_dim=256)) == 356_708_419
        small = PixelHDMTransformer2DModel.from_preset("small")
        large = PixelHDMTransformer2DModel.from_preset("large")
    # small/large carry a Qwen3-0.6B (1024-wide) text projection that upstream lacks.
    assert n_params(small.text_proj) == 1024 * 512 + 512
    assert n_params(small) - n_params(small.text_proj) == 44_207_219
    assert n_params(large.text_proj) == 1024 * 1152 + 1152
    assert n_params(large) - n_params(large.text_proj) == 676_355_619


def test_forward_shapes_and_aux():
    model = tiny()
    x, t, text, pooled = inputs()
    with torch.no_grad():
        out = model(x, t, text, None, pooled)
        aux = model(x, t, text, None, pooled, return_aux=True)
        tup = model(x, t, text, None, pooled, return_dict=False)
        tup_aux = model(x, t, text, None, pooled, return_dict=False, return_aux=True)
    assert isinstance(out, PixelHDMTransformerOutput)
    assert out.sample.shape == x.shape and out.repa_features is None and out.gamma_l2 is None
    assert aux.repa_features.shape == (2, (32 // 16) * (48 // 16), 256)
    assert aux.gamma_l2.ndim == 0 and aux.gamma_l2 > 0
    assert len(tup) == 1 and torch.equal(tup[0], out.sample)
    assert len(tup_aux) == 3 and torch.equal(tup_aux[0], out.sample)
    assert torch.isfinite(out.sample).all()


def test_scalar_timestep_and_no_text():
    model = tiny()
    x, _, text, _ = inputs()
    with torch.no_grad():
        a = model(x, 500.0, text).sample
        b = model(x, torch.tensor([500.0, 500.0]), text).sample
        c = model(x, torch.tensor(500.0)).sample  # image-only
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert c.shape == x.shape


def test_gamma_l2_matches_direct_computation():
    model = tiny()
    x, t, text, pooled = inputs(batch=1, height=16 * 17, width=16 * 16)  # 272 tokens: two pixel-path chunks
    block = model.pixel_blocks[0]
    seen = {}
    block.adaln.cond_expand.register_forward_hook(lambda m, i, o: seen.setdefault("c", []).append(o))
    with torch.no_grad():
        aux = model(x, t[:1], text, None, pooled, return_aux=True)
        c = torch.nn.functional.silu(torch.cat(seen["c"])).unflatten(-1, (256, 8))
        params = block.adaln.linear(c).chunk(6, dim=-1)
    expected = params[0].pow(2).mean() + params[3].pow(2).mean()
    torch.testing.assert_close(aux.gamma_l2, expected, rtol=1e-5, atol=1e-6)


def test_intended_initialisation():
    model = tiny()
    d, dim = 8, 256
    for block in model.patch_blocks:
        assert torch.count_nonzero(block.attn.to_gate.weight) == 0
        expected = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]).repeat_interleave(dim)
        torch.testing.assert_close(block.adaln.bias.detach(), expected)
        assert 0.015 < block.adaln.weight.std().item() < 0.025
    for block in model.pixel_blocks:
        assert torch.count_nonzero(block.compaction.attn.to_gate.weight) == 0
        expected = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).repeat_interleave(d)
        torch.testing.assert_close(block.adaln.linear.bias.detach(), expected)
        expand = block.compaction.expand.weight
        bound = 0.1 * (6.0 / sum(expand.shape)) ** 0.5  # xavier_uniform, gain 0.1
        assert expand.abs().max() <= bound and expand.abs().max() > 0.9 * bound
        compress = block.compaction.compress.weight
        assert compress.abs().max() > 0.9 * (6.0 / sum(compress.shape)) ** 0.5  # plain xavier (gain 1)
    for linear in (model.pixel_embed, model.proj_out, model.time_embed.linear_1, model.time_embed.linear_2):
        assert torch.count_nonzero(linear.bias) == 0


def test_presets_overrides_and_config_errors():
    model = tiny(bottleneck_dim=32)
    assert model.config.bottleneck_dim == 32 and model.patch_embed.proj_down.out_features == 32
    with pytest.raises(ValueError, match="for_testing"):
        PixelHDMTransformer2DModel.from_preset("tiny")
    bad = [
        ({"rope_axes_dim": (16, 24, 20)}, "rope_axes_dim"),
        ({"rope_axes_dim": (15, 25, 24)}, "rope_axes_dim"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 320}, "hidden_size"),
        ({"repa_align_layer": 3}, "repa_align_layer"),
        ({"patch_size": 0}, "patch_size"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ]
    for overrides, name in bad:
        with pytest.raises(ValueError, match=name):
            PixelHDMTransformer2DModel.from_preset("for_testing", **overrides)


def test_input_errors():
    model = tiny()
    x, t, text, pooled = inputs()
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(x[..., :40], t, text)
    with pytest.raises(ValueError, match="hidden_states"):
        model(x[:, :2], t, text)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, text[..., :100])
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(x, t, text, torch.ones(2, 4))
    with pytest.raises(ValueError, match="pooled_projections"):
        model(x, t, text, None, pooled[:, :10])
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.ones(3), text)


def test_padding_text_with_masked_keys_leaves_image_output_unchanged():
    model = tiny()
    x, t, text, pooled = inputs(text=7)
    lengths = [3, 5]
    with torch.no_grad():
        single = [
            model(x[i : i + 1], t[i : i + 1], text[i : i + 1, : lengths[i]], None, pooled[i : i + 1]).sample
            for i in range(2)
        ]
        # Pad to 7 and to 12 tokens with garbage behind a 0/1 mask (and a bool mask).
        for total in (7, 12):
            padded = torch.randn(2, total, 256) * 10
            mask = torch.zeros(2, total, dtype=torch.long)
            for i, n in enumerate(lengths):
                padded[i, :n] = text[i, :n]
                mask[i, :n] = 1
            out = model(x, t, padded, mask, pooled).sample
            out_bool = model(x, t, padded, mask.bool(), pooled).sample
            for i in range(2):
                torch.testing.assert_close(out[i : i + 1], single[i], rtol=0, atol=1e-5)
            torch.testing.assert_close(out, out_bool, rtol=0, atol=0)
        # An all-ones mask is the same as no mask (and takes the unmasked path).
        full = model(x, t, text, None, pooled).sample
        torch.testing.assert_close(model(x, t, text, torch.ones(2, 7), pooled).sample, full, rtol=0, atol=0)


def test_empty_prompt_mask_is_finite():
    model = tiny()
    x, t, text, pooled = inputs()
    with torch.no_grad():
        out = model(x, t, text, torch.zeros(2, 5), pooled).sample
    assert torch.isfinite(out).all()


def test_text_projection_for_other_text_widths():
    model = tiny(text_embed_dim=64)
    assert model.text_proj is not None and model.text_proj.in_features == 64
    assert tiny().text_proj is None
    x, t, text, pooled = inputs(dim=64)
    with torch.no_grad():
        out = model(x, t, text, None, pooled).sample
        other_pooled = model(x, t, text, None, pooled + 1.0).sample
    assert out.shape == x.shape
    assert (out - other_pooled).abs().max() > 1e-4  # the pooled embedding goes through text_proj into the condition
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, torch.randn(2, 5, 256))


def test_bf16_keeps_float32_rope_and_time_tables():
    fp32 = tiny()
    bf16 = tiny().to(torch.bfloat16)
    lengths = torch.tensor([3, 511])
    for a, b in zip(fp32._joint_rope(2, 511, lengths, 8, 8, "cpu"), bf16._joint_rope(2, 511, lengths, 8, 8, "cpu")):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    t = torch.tensor([0.123, 0.875])
    assert bf16.time_proj(t).dtype == torch.float32
    torch.testing.assert_close(fp32.time_proj(t), bf16.time_proj(t), rtol=0, atol=0)
    # Angle 511 * 1 is exact in float32 (bf16 would round it to 512).
    angle = transformer_pixelhdm._rope_angles(torch.tensor([[511.0, 0.0, 0.0]]), (16, 24, 24), 1e4)
    assert angle[0, 0].item() == 511.0
    x, t, text, pooled = inputs()
    with torch.no_grad():
        ref = fp32(x, t, text, None, pooled).sample
        out = bf16(x, t, text.bfloat16(), None, pooled.bfloat16()).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_gradient_checkpointing_gives_same_gradients():
    x, t, text, pooled = inputs()
    grads, losses = [], []
    for checkpointing in (False, True):
        model = tiny().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(x, t, text, None, pooled, return_aux=True)
        loss = out.sample.square().mean() + out.repa_features.square().mean() + out.gamma_l2
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_save_and_load_round_trip(tmp_path):
    model = tiny(seed=3, text_embed_dim=64)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = PixelHDMTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_axes_dim == model.config.rope_axes_dim or list(loaded.config.rope_axes_dim) == list(
        model.config.rope_axes_dim
    )
    x, t, text, pooled = inputs(dim=64)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, text, None, pooled).sample, model(x, t, text, None, pooled).sample, rtol=0, atol=0
        )


def test_lora_adapter_and_scale():
    from peft import LoraConfig

    model = tiny()
    x, t, text, pooled = inputs()
    with torch.no_grad():
        base = model(x, t, text, None, pooled).sample
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    lora_params = [name for name, _ in model.named_parameters() if "lora_B" in name]
    assert len(lora_params) == 4 * (2 + 1)  # 2 patch blocks + 1 compaction attention
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        with_lora = model(x, t, text, None, pooled).sample
        scaled_off = model(x, t, text, None, pooled, attention_kwargs={"scale": 0.0}).sample
        again = model(x, t, text, None, pooled).sample
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(scaled_off, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, with_lora, rtol=0, atol=0)


def test_attention_backends_and_repeated_kv(monkeypatch):
    model = tiny()
    x, t, text, pooled = inputs()
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    with torch.no_grad():
        ref = model(x, t, text, mask, pooled).sample
        monkeypatch.setattr(transformer_pixelhdm, "_backend_supports_gqa", lambda backend: False)
        repeated = model(x, t, text, mask, pooled).sample
        monkeypatch.undo()
        model.set_attention_backend("_native_math")
        math_backend = model(x, t, text, mask, pooled).sample
        model.reset_attention_backend()
    torch.testing.assert_close(repeated, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(math_backend, ref, rtol=0, atol=1e-4)


def test_pixel_path_chunking_does_not_change_the_output(monkeypatch):
    model = tiny()
    x, t, text, pooled = inputs()  # 2 x 6 tokens
    with torch.no_grad():
        ref = model(x, t, text, None, pooled, return_aux=True)
        monkeypatch.setattr(transformer_pixelhdm, "_PIXEL_CHUNK_TOKENS", 5)
        chunked = model(x, t, text, None, pooled, return_aux=True)
    torch.testing.assert_close(chunked.sample, ref.sample, rtol=0, atol=2e-5)
    torch.testing.assert_close(chunked.gamma_l2, ref.gamma_l2, rtol=1e-5, atol=0)


def test_layerwise_casting_goes_through_the_casting_hooks():
    model = tiny()
    x, t, text, pooled = inputs()
    with torch.no_grad():
        ref = model(x, t, text, None, pooled).sample
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        assert model.pixel_blocks[0].adaln.linear.weight.dtype == torch.bfloat16
        assert model.pixel_blocks[0].adaln.norm.weight.dtype == torch.float32  # skipped pattern "norm"
        out = model(x, t, text, None, pooled).sample
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
