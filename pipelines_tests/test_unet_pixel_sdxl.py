"""PixelSDXLUNet2DConditionModel: the body is SDXL's own sub-graph (same weights, same activations), presets have the
upstream sizes, the patch coders round-trip the image layout, and the model saves, loads and checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from pixel_diffusers.models.unets.unet_pixel_sdxl import PIXEL_SDXL_PRESETS, PixelSDXLUNet2DConditionModel

TINY = PIXEL_SDXL_PRESETS["for_testing"]


def sdxl_unet(**overrides) -> UNet2DConditionModel:
    """diffusers' SDXL U-Net config (the tiny widths unless overridden)."""
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=TINY["block_out_channels"],
        layers_per_block=2,
        transformer_layers_per_block=TINY["transformer_layers_per_block"],
        attention_head_dim=TINY["num_attention_heads"],  # diffusers' SDXL config stores head counts here
        cross_attention_dim=TINY["cross_attention_dim"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=TINY["projection_class_embeddings_input_dim"],
        norm_num_groups=TINY["norm_num_groups"],
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def conditioning(batch=2, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, TINY["cross_attention_dim"], generator=g)
    pooled = torch.randn(batch, TINY["projection_class_embeddings_input_dim"] - 6 * TINY["addition_time_embed_dim"], generator=g)
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0]]).repeat(batch, 1)
    return context, {"text_embeds": pooled, "time_ids": time_ids}


def load_body_from(model: PixelSDXLUNet2DConditionModel, sdxl: UNet2DConditionModel) -> None:
    source = sdxl.state_dict()
    state = model.state_dict()
    body = set(model.body_parameter_names())
    state.update({key: source[key] for key in body})
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("patch_size", [16, 32])
def test_body_reproduces_sdxl_activations(patch_size):
    torch.manual_seed(0)
    sdxl = sdxl_unet().eval()
    model = PixelSDXLUNet2DConditionModel.from_preset("for_testing", patch_size=patch_size).eval()
    load_body_from(model, sdxl)
    first = model.first_level
    context, added = conditioning()
    timestep = torch.tensor([700.0, 30.0])

    captured = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            captured[name] = (args, kwargs, output)

        return hook

    handles = [sdxl.down_blocks[first].register_forward_hook(keep("entry"), with_kwargs=True)]
    for level in range(first, 3):
        handles.append(sdxl.down_blocks[level].register_forward_hook(keep(f"down{level}"), with_kwargs=True))
    handles.append(sdxl.mid_block.register_forward_hook(keep("mid"), with_kwargs=True))
    for index in range(3 - first):
        handles.append(sdxl.up_blocks[index].register_forward_hook(keep(f"up{index}"), with_kwargs=True))
    last_up = sdxl.up_blocks[2 - first]
    handles.append(last_up.upsamplers[0].register_forward_hook(keep("before_upsample"), with_kwargs=True))
    with torch.no_grad():
        # SDXL is fed the native timestep sigma * 999, which PixelSDXL derives from diffusers' sigma * 1000.
        sdxl(torch.randn(2, 4, 16, 16), timestep * 0.999, context, added_cond_kwargs=added)
    for handle in handles:
        handle.remove()

    entry_args, entry_kwargs, _ = captured["entry"]
    features = entry_kwargs.get("hidden_states", entry_args[0] if entry_args else None)
    sdxl_temb = entry_kwargs["temb"]
    ours = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: ours.__setitem__(name, o))
        for name, module in [
            *[(f"down{level}", model.down_blocks[str(level)]) for level in range(first, 3)],
            ("mid", model.mid_block),
            *[(f"up{index}", model.up_blocks[index]) for index in range(3 - first)],
        ]
    ]
    with torch.no_grad():
        temb = model.get_embedding(timestep, added["text_embeds"], added["time_ids"])
        body_out = model.forward_body(features, temb, context)
    for handle in handles:
        handle.remove()

    torch.testing.assert_close(temb, sdxl_temb, rtol=0, atol=0)
    for level in range(first, 3):
        torch.testing.assert_close(ours[f"down{level}"][0], captured[f"down{level}"][2][0], rtol=0, atol=0)
        for mine, theirs in zip(ours[f"down{level}"][1], captured[f"down{level}"][2][1]):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours["mid"], captured["mid"][2], rtol=0, atol=0)
    for index in range(2 - first):
        torch.testing.assert_close(ours[f"up{index}"], captured[f"up{index}"][2], rtol=0, atol=0)
    # The last kept up block is SDXL's without its upsampler: compare with the upsampler's input.
    args, kwargs, _ = captured["before_upsample"]
    torch.testing.assert_close(body_out, kwargs.get("hidden_states", args[0] if args else None), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("preset", "total", "encoder", "decoder"),
    [
        ("patch16", 2_576_760_896, 14_723_904, 14_888_192),
        ("patch32", 2_460_812_672, 45_339_520, 45_833_472),
        ("patch32_conv", 2_444_639_363, 36_207_328, 38_792_355),
    ],
)
def test_real_size_parameter_counts_and_sdxl_subgraph(preset, total, encoder, decoder):
    with torch.device("meta"):
        model = PixelSDXLUNet2DConditionModel.from_preset(preset)
        sdxl = sdxl_unet(
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        )
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == total
    assert sum(p.numel() for k, p in params.items() if "_encoder." in k) == encoder
    assert sum(p.numel() for k, p in params.items() if "_decoder." in k) == decoder
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684
    sdxl_params = dict(sdxl.named_parameters())
    body = model.body_parameter_names()
    assert len(body) + len([k for k in params if "_encoder." in k or "_decoder." in k]) == len(params)
    assert all(sdxl_params[key].shape == params[key].shape for key in body)
    # What is left of SDXL is exactly the first level(s), conv_in/out and the last kept upsampler.
    first = model.first_level
    dropped = {k for k in sdxl_params if k not in set(body)}
    allowed = ("conv_in.", "conv_norm_out.", "conv_out.", *[f"down_blocks.{i}." for i in range(first)],
               *[f"up_blocks.{i}." for i in range(3 - first, 3)], f"up_blocks.{2 - first}.upsamplers.")
    assert all(key.startswith(allowed) for key in dropped)


def test_patch_layout_is_pixel_unshuffle():
    """Upstream's patchify: channel index c * P^2 + row * P + column within the patch."""
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    patches = F.pixel_unshuffle(x, 16)
    c, row, col, gy, gx = 2, 5, 11, 1, 0
    assert patches[1, c * 256 + row * 16 + col, gy, gx] == x[1, c, gy * 16 + row, gx * 16 + col]


@pytest.mark.parametrize(("overrides", "size"), [({}, 48), ({"patch_size": 32}, 64), ({"patch_size": 32, "encoder_decoder_type": "conv"}, 64)])
def test_forward_shapes_and_gradient_checkpointing(overrides, size):
    torch.manual_seed(0)
    model = PixelSDXLUNet2DConditionModel.from_preset("for_testing", **overrides)
    context, added = conditioning(batch=1)
    sample = torch.randn(1, 3, size, size)
    out = model(sample, torch.tensor([500.0]), context, added).sample
    assert out.shape == sample.shape  # 48 = a 3x3 patch grid: odd grids round-trip the body's downsampler
    out.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(sample, torch.tensor([500.0]), context, added).sample.square().mean().backward()
    for key, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PixelSDXLUNet2DConditionModel.from_preset("for_testing").eval()
    model.save_pretrained(tmp_path)
    loaded = PixelSDXLUNet2DConditionModel.from_pretrained(tmp_path).eval()
    context, added = conditioning(batch=1)
    sample = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 300.0, context, added).sample, model(sample, 300.0, context, added).sample)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patch_size": 8}, "patch_size"),
        ({"encoder_decoder_type": "vae"}, "encoder_decoder_type"),
        ({"encoder_decoder_type": "conv"}, "patch_size=32"),
        ({"num_attention_heads": (1, 2)}, "num_attention_heads"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        PixelSDXLUNet2DConditionModel.from_preset("for_testing", **overrides)


def test_bad_inputs_raise():
    model = PixelSDXLUNet2DConditionModel.from_preset("for_testing")
    context, added = conditioning(batch=1)
    with pytest.raises(ValueError, match="multiples of patch_size=16"):
        model(torch.randn(1, 3, 40, 32), 1.0, context, added)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        model(torch.randn(1, 3, 32, 32), 1.0, context, {"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match="Unknown pixel-SDXL preset"):
        PixelSDXLUNet2DConditionModel.from_preset("patch64")
