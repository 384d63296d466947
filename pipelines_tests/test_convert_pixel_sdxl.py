"""pixel-SDXL conversion from tiny checkpoints written in code: an SGM-layout SDXL single file, an upstream pixel-SDXL
training checkpoint (default and conv coders) and a diffusers SDXL folder."""

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pixel_diffusers.conversion.pixel_sdxl import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, convert_pixel_sdxl_checkpoint
from pixel_diffusers.models.unets.unet_pixel_sdxl import PIXEL_SDXL_PRESETS, PixelSDXLUNet2DConditionModel
from pixel_diffusers.testing import make_tiny_clip_config, make_tiny_clip_tokenizer

TINY = PIXEL_SDXL_PRESETS["for_testing"]
RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
          ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))


def tiny_sdxl_unet(seed=0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=TINY["block_out_channels"],
        transformer_layers_per_block=TINY["transformer_layers_per_block"],
        attention_head_dim=TINY["num_attention_heads"],
        cross_attention_dim=TINY["cross_attention_dim"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=TINY["projection_class_embeddings_input_dim"],
        norm_num_groups=TINY["norm_num_groups"],
    ).eval()


def resnet_to_sgm(rest):
    for new, old in RESNET:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def diffusers_to_sgm(key):
    """diffusers SDXL U-Net name -> SGM name (an independent writer; checked against diffusers' own converter)."""
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for new, old in fixed.items():
        if key.startswith(new):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
        return f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.0.{resnet_to_sgm(m[3])}"
    if m := re.match(r"down_blocks\.(\d)\.attentions\.(\d)\.(.*)", key):
        return f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{3 + 3 * int(m[1])}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet_to_sgm(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.{resnet_to_sgm(m[3])}"
    if m := re.match(r"up_blocks\.(\d)\.attentions\.(\d)\.(.*)", key):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.(.*)", key):
        part = 2 if int(m[1]) < 2 else 1  # SDXL's last up level has no attention
        return f"output_blocks.{3 * int(m[1]) + 2}.{part}.{m[2]}"
    if m := re.match(r"conv_encoder\.(.*)", key):
        rest = m[1]
        for pattern, repl in [(r"conv_in\.", "stem_conv."), (r"norm_in\.0\.", "stem_norm."), (r"conv_out\.", "final_conv.")]:
            if re.match(pattern, rest):
                return "conv_encoder." + re.sub(pattern, repl, rest)
        if d := re.match(r"downsamplers\.(\d)\.([01])\.(.*)", rest):
            return f"conv_encoder.downsample_{int(d[1]) + 1}{'' if d[2] == '0' else '_norm'}.{d[3]}"
        b = re.match(r"blocks\.(\d)\.(\d)\.(.*)", rest)
        stage, j = int(b[1]), int(b[2])
        return f"conv_encoder.resblock_{stage + 1}.{b[3]}" if stage < 3 else f"conv_encoder.resblock_{stage + 1}_{j + 1}.{resnet_to_sgm(b[3])}"
    if m := re.match(r"conv_decoder\.(.*)", key):
        rest = m[1]
        for pattern, repl in [(r"fuse_convs\.0\.0\.", "initial_conv."), (r"fuse_convs\.0\.1\.", "initial_norm."),
                              (r"conv_norm_out\.0\.", "final_conv_1."), (r"conv_norm_out\.1\.", "final_norm."), (r"conv_out\.", "final_conv_2.")]:
            if re.match(pattern, rest):
                return "conv_decoder." + re.sub(pattern, repl, rest)
        if d := re.match(r"fuse_convs\.(\d)\.([01])\.(.*)", rest):
            return f"conv_decoder.upsample_{d[1]}_{'conv' if d[2] == '0' else 'norm'}.{d[3]}"
        b = re.match(r"blocks\.(\d)\.(\d)\.(.*)", rest)
        stage, j = int(b[1]), int(b[2])
        return f"conv_decoder.resblock_{stage}_{j + 1}.{resnet_to_sgm(b[3])}" if stage < 2 else f"conv_decoder.resblock_{stage}.{b[3]}"
    return key  # patch_encoder.net.* / patch_decoder.net.*: upstream's own names


def tiny_encoders(seed=0):
    torch.manual_seed(seed)
    return CLIPTextModel(make_tiny_clip_config(False)).eval(), CLIPTextModelWithProjection(make_tiny_clip_config(True)).eval()


def encoders_to_sgm(te1, te2, transpose_projection=True):
    state = {TE1_PREFIX + "text_model." + k: v for k, v in te1.state_dict().items()}
    state[TE1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd = te2.state_dict()
    out = {"positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"], "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T if transpose_projection else sd["text_projection.weight"],
           "logit_scale": torch.tensor(4.6)}
    for i in range(te2.config.num_hidden_layers):
        h = f"text_model.encoder.layers.{i}."
        r = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[r + f"attn.in_proj_{kind}"] = torch.cat([sd[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[r + f"attn.out_proj.{kind}"] = sd[h + f"self_attn.out_proj.{kind}"]
            out[r + f"ln_1.{kind}"] = sd[h + f"layer_norm1.{kind}"]
            out[r + f"ln_2.{kind}"] = sd[h + f"layer_norm2.{kind}"]
            out[r + f"mlp.c_fc.{kind}"] = sd[h + f"mlp.fc1.{kind}"]
            out[r + f"mlp.c_proj.{kind}"] = sd[h + f"mlp.fc2.{kind}"]
    state.update({TE2_PREFIX + k: v for k, v in out.items()})
    return state


def check_encoders(converted, te1, te2):
    ids = make_tiny_clip_tokenizer()(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for theirs, ours in ((te1, converted["text_encoder"]), (te2, converted["text_encoder_2"])):
            a, b = theirs(ids, output_hidden_states=True), ours(ids, output_hidden_states=True)
            torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], rtol=0, atol=0)
        torch.testing.assert_close(te2(ids).text_embeds, converted["text_encoder_2"](ids).text_embeds, rtol=0, atol=0)


def test_sgm_writer_matches_diffusers_converter():
    """The test's SGM writer is the inverse of diffusers' own single-file U-Net converter."""
    unet = tiny_sdxl_unet()
    sgm = {UNET_PREFIX + diffusers_to_sgm(k): v for k, v in unet.state_dict().items()}
    back = convert_ldm_unet_checkpoint(sgm, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("patch_size", [16, 32])
def test_latent_sdxl_single_file(tmp_path, patch_size):
    from safetensors.torch import save_file

    unet = tiny_sdxl_unet()
    te1, te2 = tiny_encoders()
    state = {UNET_PREFIX + diffusers_to_sgm(k): v for k, v in unet.state_dict().items()}
    state.update(encoders_to_sgm(te1, te2))
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    converted, report = convert_pixel_sdxl_checkpoint(path, unet_config={**TINY, "patch_size": patch_size}, clip_head_dim=16)
    model = converted["unet"]
    source = unet.state_dict()
    for key in model.body_parameter_names():
        assert torch.equal(model.state_dict()[key], source[key]), key
    assert report.kind == "latent SDXL single file"
    assert {k.split(".")[0] for k in report.fresh} == {"patch_encoder", "patch_decoder"}
    dropped = {reason: keys for reason, keys in report.dropped.items()}
    assert any("VAE" in reason for reason in dropped)
    above = next(keys for reason, keys in dropped.items() if "above the patch grid" in reason)
    assert UNET_PREFIX + "input_blocks.0.0.weight" in above and UNET_PREFIX + "out.2.weight" in above
    assert (UNET_PREFIX + "input_blocks.4.0.in_layers.0.weight" in above) == (patch_size == 32)
    # Every source tensor is accounted for: mapped or dropped with a reason.
    accounted = set(report.mapped) | {k for keys in report.dropped.values() for k in keys}
    assert accounted == set(state)
    check_encoders(converted, te1, te2)
    assert "initialised fresh" in str(report)


def test_upstream_pixel_checkpoint_round_trip(tmp_path):
    for overrides in ({}, {"patch_size": 32, "encoder_decoder_type": "conv"}):
        torch.manual_seed(1)
        model = PixelSDXLUNet2DConditionModel.from_preset("for_testing", **overrides).eval()
        te1, te2 = tiny_encoders(seed=3)
        state = {UNET_PREFIX + diffusers_to_sgm(k): v for k, v in model.state_dict().items()}
        state.update(encoders_to_sgm(te1, te2, transpose_projection=False))  # upstream saves the Linear weight as is
        path = tmp_path / "pixel.pt"
        torch.save({"model": state, "optimizer_state": {}}, path)
        unet_config = {k: v for k, v in TINY.items() if k not in ("patch_hidden_channels", "num_patch_res_blocks")}
        converted, report = convert_pixel_sdxl_checkpoint(path, unet_config=unet_config, clip_head_dim=16)
        assert report.kind == "upstream pixel-SDXL checkpoint" and not report.fresh
        assert converted["unet"].config.patch_size == model.config.patch_size
        single = PixelSDXLUNet2DConditionModel.from_single_file(path, unet_config=unet_config, clip_head_dim=16)
        for key, value in model.state_dict().items():
            assert torch.equal(converted["unet"].state_dict()[key], value), key
            assert torch.equal(single.state_dict()[key], value), key
        check_encoders(converted, te1, te2)


def test_diffusers_folder(tmp_path):
    unet = tiny_sdxl_unet()
    te1, te2 = tiny_encoders()
    unet.save_pretrained(tmp_path / "unet")
    te1.save_pretrained(tmp_path / "text_encoder")
    te2.save_pretrained(tmp_path / "text_encoder_2")
    make_tiny_clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    make_tiny_clip_tokenizer(pad_with_zero=True).save_pretrained(tmp_path / "tokenizer_2")
    converted, report = convert_pixel_sdxl_checkpoint(tmp_path, unet_config={"patch_hidden_channels": 64, "num_patch_res_blocks": 1})
    assert tuple(converted["unet"].config.block_out_channels) == TINY["block_out_channels"]
    for key in converted["unet"].body_parameter_names():
        assert torch.equal(converted["unet"].state_dict()[key], unet.state_dict()[key])
    assert converted["tokenizer_2"].pad_token_id == 0
    check_encoders(converted, te1, te2)


def test_strict_errors(tmp_path):
    from safetensors.torch import save_file

    unet = tiny_sdxl_unet()
    te1, te2 = tiny_encoders()
    state = {UNET_PREFIX + diffusers_to_sgm(k): v for k, v in unet.state_dict().items()}
    state.update(encoders_to_sgm(te1, te2))
    broken = dict(state, **{"model.diffusion_model.mystery.weight": torch.zeros(1)})
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="mystery"):
        convert_pixel_sdxl_checkpoint(tmp_path / "a.safetensors", unet_config=TINY, clip_head_dim=16)
    missing = {k: v for k, v in state.items() if "input_blocks.7.1" not in k}
    save_file({k: v.contiguous() for k, v in missing.items()}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="down_blocks.2.attentions.0"):
        convert_pixel_sdxl_checkpoint(tmp_path / "b.safetensors", unet_config=TINY, clip_head_dim=16)
    with pytest.raises(ValueError, match="must end in"):
        (tmp_path / "c.bin").write_bytes(b"")
        convert_pixel_sdxl_checkpoint(tmp_path / "c.bin")


def test_cli_saves_a_loadable_pipeline(tmp_path, capsys):
    import argparse

    from pixel_diffusers.conversion.pixel_sdxl import add_subparser
    from pixel_diffusers.pipelines.pixel_sdxl.pipeline_pixel_sdxl import PixelSDXLPipeline

    src = tmp_path / "sdxl"
    tiny_sdxl_unet().save_pretrained(src / "unet")
    te1, te2 = tiny_encoders()
    te1.save_pretrained(src / "text_encoder")
    te2.save_pretrained(src / "text_encoder_2")
    make_tiny_clip_tokenizer().save_pretrained(src / "tokenizer")
    make_tiny_clip_tokenizer(pad_with_zero=True).save_pretrained(src / "tokenizer_2")
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="system", required=True))
    args = parser.parse_args(["pixel-sdxl", str(src), str(tmp_path / "out")])
    capsys.readouterr()
    args.func(args)
    pipe = PixelSDXLPipeline.from_pretrained(tmp_path / "out")
    count = sum(p.numel() for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    out = capsys.readouterr().out
    assert out.startswith("pixel-SDXL conversion of")
    assert out.endswith(f"saved PixelSDXLPipeline ({count:,} parameters) to {tmp_path / 'out'}\n")
    assert pipe.unet.config.patch_size == 16 and pipe.scheduler.config.shift == 3.0


def test_post_hoc_ema(tmp_path):
    import argparse

    from safetensors.torch import load_file, save_file

    from pixel_diffusers.conversion.post_hoc_ema import add_subparser as add_ema, post_hoc_ema, post_hoc_ema_weights

    assert post_hoc_ema_weights(3, 0.5) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    values = [torch.full((2, 2), float(v)) for v in (1.0, 2.0, 10.0)]
    paths = []
    for i, value in enumerate(values):
        paths.append(tmp_path / f"step{i}.pt")
        torch.save({"model": {"w": value, "count": torch.tensor([i])}, "optimizer_state": {}}, paths[-1])
    parser = argparse.ArgumentParser()
    add_ema(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["post-hoc-ema", *map(str, paths), "--output", str(tmp_path / "ema.safetensors"), "--mu", "0.5"])
    args.func(args)
    averaged = load_file(str(tmp_path / "ema.safetensors"))
    torch.testing.assert_close(averaged["w"], torch.full((2, 2), (1 + 2 * 2 + 4 * 10) / 7))
    assert averaged["count"].tolist() == [0]
    # save_pretrained folders: every safetensors file averaged under the same relative path.
    for i, value in enumerate(values[:2]):
        (tmp_path / f"run{i}" / "unet").mkdir(parents=True)
        save_file({"w": value}, str(tmp_path / f"run{i}" / "unet" / "diffusion_pytorch_model.safetensors"))
    post_hoc_ema([tmp_path / "run0", tmp_path / "run1"], tmp_path / "avg", mu=1.0, dtype="bfloat16")
    folder = load_file(str(tmp_path / "avg" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert folder["w"].dtype == torch.bfloat16 and folder["w"][0, 0].item() == 1.5
    torch.save({"other": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="same keys"):
        post_hoc_ema([paths[0], tmp_path / "other.pt"], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        post_hoc_ema(paths, tmp_path / "x.pt")


def test_post_hoc_ema_of_pipeline_folders_loads_with_from_pretrained(tmp_path):
    from pixel_diffusers import PixelSDXLPipeline
    from pixel_diffusers.conversion.post_hoc_ema import post_hoc_ema
    from pixel_diffusers.testing import make_tiny_pixel_sdxl_pipeline

    for seed in (0, 1):
        make_tiny_pixel_sdxl_pipeline(seed=seed).save_pretrained(tmp_path / f"snapshot{seed}")
    post_hoc_ema([tmp_path / "snapshot0", tmp_path / "snapshot1"], tmp_path / "ema", mu=1.0)
    pipe = PixelSDXLPipeline.from_pretrained(tmp_path / "ema")
    first, second = (PixelSDXLPipeline.from_pretrained(tmp_path / f"snapshot{s}").unet.state_dict() for s in (0, 1))
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, (first[key] + second[key]) / 2)
