"""JiTTransformer2DModel (JiT and PixelDLM architectures) and the upstream checkpoint converters."""

import argparse
import json
import re

import numpy as np
import pytest
import torch

from pixel_diffusers.conversion.jit import add_subparser, convert_jit_checkpoint, convert_pixeldlm_checkpoint
from pixel_diffusers.models.transformers.transformer_jit import JIT_PRESETS, JiTTransformer2DModel, _apply_rope, _rope_angles

TINY_JIT = dict(sample_size=16, patch_size=4, hidden_size=32, num_layers=3, num_attention_heads=2, bottleneck_dim=8,
                num_classes=4, in_context_len=2, in_context_start=1)
TINY_DLM = dict(architecture="pixeldlm", sample_size=8, patch_size=2, hidden_size=32, num_layers=2,
                num_attention_heads=2)


def randomized(model, seed=0):
    """Non-zero weights everywhere (the zero-initialised modulation and output layers would hide most of the net)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "preset, parameters",
    [("JiT-B/16", 131_123_712), ("JiT-B/32", 133_190_400), ("JiT-L/16", 458_877_664), ("JiT-H/16", 952_514_368),
     ("PixelDLM-B/4", 127_681_584)],
)
def test_preset_parameter_counts(preset, parameters):
    with torch.device("meta"):
        model = JiTTransformer2DModel.from_preset(preset)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_jit_starts_at_zero_and_uses_time_and_class():
    torch.manual_seed(0)
    model = JiTTransformer2DModel(**TINY_JIT).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(model(x, 500.0, class_labels=[0, 1]).sample) == 0  # zero-initialised output layer
    model = randomized(model)
    out = model(x, torch.tensor([300.0, 300.0]), class_labels=torch.tensor([0, 0])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x, 700.0, class_labels=[0, 0]).sample)
    assert not torch.allclose(out, model(x, 300.0, class_labels=[0, 4]).sample)  # 4 = the null class


def test_sincos_table_matches_the_mae_formula():
    model = JiTTransformer2DModel(**TINY_JIT)
    dim, grid = 32, 4
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = lambda pos: np.concatenate([np.sin(np.outer(pos.ravel(), omega)), np.cos(np.outer(pos.ravel(), omega))], 1)
    expected = np.concatenate([emb(cols), emb(rows)], axis=1)  # first half: column (MAE's grid[0]), then row
    np.testing.assert_allclose(model.pos_embed[0].numpy(), expected, atol=1e-6)


def test_rope_scores_depend_on_relative_positions_only():
    head_dim, grid = 16, 4
    angles = _rope_angles(grid, head_dim, 10000.0, 0, "cpu")
    cos, sin = angles.cos(), angles.sin()
    q, k = torch.randn(1, 1, 1, head_dim).expand(1, 16, 1, head_dim), torch.randn(1, 1, 1, head_dim).expand(1, 16, 1, head_dim)
    qr, kr = _apply_rope(q, cos, sin)[0, :, 0], _apply_rope(k, cos, sin)[0, :, 0]
    scores = qr @ kr.T
    index = lambda r, c: r * grid + c
    torch.testing.assert_close(scores[index(0, 0), index(1, 2)], scores[index(2, 1), index(3, 3)])
    assert not torch.allclose(scores[index(0, 0), index(1, 2)], scores[index(0, 0), index(2, 1)])
    prefixed = _rope_angles(grid, head_dim, 10000.0, 3, "cpu")
    assert torch.count_nonzero(prefixed[:3]) == 0 and torch.equal(prefixed[3:], angles)


def test_pixeldlm_masks():
    torch.manual_seed(0)
    model = randomized(JiTTransformer2DModel(**TINY_DLM))
    x, cond = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    t = torch.tensor([999.0, 10.0])
    uncond = model(x, t).sample
    with_cond = model(x, t, condition=cond).sample
    assert not torch.allclose(uncond, with_cond)
    # A dropped condition (classifier-free guidance / condition dropout) is exactly the unconditional model.
    mixed = model(x, t, condition=cond, condition_mask=torch.tensor([True, False])).sample
    torch.testing.assert_close(mixed[0], with_cond[0])
    torch.testing.assert_close(mixed[1], uncond[1])
    # Invalid target patches are masked keys (their content is invisible) and their outputs are zero.
    pixel_mask = torch.zeros(2, 8, 8)
    pixel_mask[:, :4] = 1  # the top two patch rows
    out = model(x, t, condition=cond, pixel_mask=pixel_mask).sample
    assert torch.count_nonzero(out[:, :, 4:]) == 0
    x2 = x.clone()
    x2[:, :, 4:] = torch.rand(2, 3, 4, 8)
    torch.testing.assert_close(model(x2, t, condition=cond, pixel_mask=pixel_mask).sample, out)
    # No valid key at all: uniform attention instead of NaN (upstream's convention).
    assert torch.isfinite(model(x, t, pixel_mask=torch.zeros(2, 8, 8)).sample).all()


def test_pixel_decoder_output_range_and_validation():
    model = randomized(JiTTransformer2DModel(**TINY_DLM, use_pixel_decoder=True, pixel_decoder_depth=2))
    out = model(torch.rand(1, 3, 8, 8), 500.0).sample
    assert out.shape == (1, 3, 8, 8) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="pixel_decoder_depth"):
        JiTTransformer2DModel(**TINY_DLM, use_pixel_decoder=True, pixel_decoder_depth=3)


def test_pixel_decoder_range_rule_is_per_sample():
    """Upstream takes the [-1, 1] -> [0, 1] decision from the batch minimum; ours per sample (see its docstring)."""
    decoder = randomized(JiTTransformer2DModel(**TINY_DLM, use_pixel_decoder=True, pixel_decoder_depth=2)).pixel_decoder
    image, features = torch.rand(2, 3, 8, 8), torch.randn(2, 16, 32)
    image[1] -= 0.5  # a negative minimum in the second sample only
    alone = decoder(image[:1], features[:1])
    torch.testing.assert_close(decoder(image, features)[:1], alone, atol=1e-4, rtol=1e-4)  # batched-conv rounding
    assert not torch.allclose(decoder((image[:1] + 1) / 2, features[:1]), alone)  # the rule engages per sample


@pytest.mark.parametrize("depth, dropped", [(3, []), (6, [1, 2]), (8, [2, 3, 4, 5]), (12, [3, 4, 5, 6, 7, 8])])
def test_dropout_in_upstreams_middle_blocks(depth, dropped):
    model = JiTTransformer2DModel(**{**TINY_JIT, "num_layers": depth}, dropout=0.2, attention_dropout=0.1)
    projection = [i for i, block in enumerate(model.blocks)
                  if {m.p for m in block.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}]
    attention = [i for i, block in enumerate(model.blocks) if block.attn.dropout == 0.1]
    assert projection == attention == dropped
    h = JIT_PRESETS["JiT-H/16"]  # upstream's H recipe: --proj_dropout 0.2, attn_dropout left at 0
    assert h["dropout"] == 0.2 and h.get("attention_dropout", 0.0) == 0.0


@pytest.mark.parametrize(
    "overrides, match",
    [({"architecture": "dit"}, "architecture"), ({"sample_size": 18}, "sample_size"),
     ({"hidden_size": 24, "num_attention_heads": 4}, "RoPE"), ({"in_context_start": 3}, "in_context_start"),
     ({"dropout": 1.0}, "dropout"), ({"attention_dropout": -0.1}, "attention_dropout"), ({"use_pixel_decoder": True}, "use_pixel_decoder"), ({"noise_scale": 0}, "noise_scale")],
)
def test_config_errors_name_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        JiTTransformer2DModel(**{**TINY_JIT, **overrides})


def test_input_errors():
    jit, dlm = JiTTransformer2DModel(**TINY_JIT), JiTTransformer2DModel(**TINY_DLM)
    with pytest.raises(ValueError, match="hidden_states"):
        jit(torch.zeros(1, 3, 8, 8), 1.0, class_labels=[0])
    with pytest.raises(ValueError, match="class_labels"):
        jit(torch.zeros(1, 3, 16, 16), 1.0, class_labels=[5])
    with pytest.raises(ValueError, match="class_labels is a JiT input"):
        dlm(torch.zeros(1, 3, 8, 8), 1.0, class_labels=[0])
    with pytest.raises(ValueError, match="condition_mask"):
        dlm(torch.zeros(1, 3, 8, 8), 1.0, condition_mask=[True])


def test_save_and_load_round_trip(tmp_path):
    model = randomized(JiTTransformer2DModel(**TINY_JIT, id2label={0: "red circle", 1: "blue square"}))
    model.save_pretrained(tmp_path)
    loaded = JiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x, 250.0, class_labels=[1]).sample, model(x, 250.0, class_labels=[1]).sample)
    assert loaded.config.id2label == {"0": "red circle", "1": "blue square"}


# --------------------------------------------------------------------------------------------------- converters
# Upstream key names written out independently of the converter's rename tables.

def _fuse_attention(state):
    """Our diffusers-named attention tensors back in upstream's fused layout (`attn.qkv`, `attn.proj`)."""
    fused = {}
    for key, value in state.items():
        if ".attn.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{n}.")] for n in "qkv"]
            fused[key.replace(".to_q.", ".qkv.")] = torch.cat(parts)
        elif ".attn.to_out.0." in key:
            fused[key.replace(".to_out.0.", ".proj.")] = value
        elif ".attn.to_k." not in key and ".attn.to_v." not in key:
            fused[key] = value
    return fused


def _to_upstream_jit(state, model):
    rules = [("time_embed.linear_1.", "t_embedder.mlp.0."), ("time_embed.linear_2.", "t_embedder.mlp.2."),
             ("class_embed.", "y_embedder.embedding_table."), ("patch_embed.0.", "x_embedder.proj1."),
             ("patch_embed.1.", "x_embedder.proj2."), ("in_context_pos_embed", "in_context_posemb"),
             (".attn.norm_q.", ".attn.q_norm."), (".attn.norm_k.", ".attn.k_norm."), (".adaln.", ".adaLN_modulation.1."),
             ("norm_out.", "final_layer.norm_final."), ("proj_out.", "final_layer.linear."),
             ("adaln_out.", "final_layer.adaLN_modulation.1.")]
    upstream = {}
    for key, value in _fuse_attention(state).items():
        for ours, theirs in rules:
            key = key.replace(ours, theirs) if not (ours == ".adaln." and key.startswith("adaln_out")) else key
        upstream["net." + key] = value
    upstream["net.pos_embed"] = model.pos_embed.clone()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for name, prefix in (("feat_rope", 0), ("feat_rope_incontext", model.config.in_context_len)):
        angles = _rope_angles(model.grid, head_dim, 10000.0, prefix, "cpu").repeat_interleave(2, -1)
        upstream[f"net.{name}.freqs_cos"], upstream[f"net.{name}.freqs_sin"] = angles.cos(), angles.sin()
    return upstream


def test_jit_converter_round_trip_ema_choice_and_strictness(tmp_path):
    model = randomized(JiTTransformer2DModel(**TINY_JIT))
    upstream = _to_upstream_jit(model.state_dict(), model)
    ema = {k: v + 1.0 for k, v in upstream.items() if "rope" not in k and not k.endswith("pos_embed")}
    path = tmp_path / "checkpoint-last.pth"
    args = argparse.Namespace(model="not-a-preset", img_size=16)
    torch.save({"model": upstream, "model_ema1": ema, "model_ema2": ema, "args": args, "epoch": 1}, path)
    converted, report = convert_jit_checkpoint(path, weights="model", in_context_start=1)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(converted(x, 400.0, class_labels=[1, 4]).sample, model(x, 400.0, class_labels=[1, 4]).sample)
    assert "pos_embed" in str(report) and "net." in str(report)
    from_ema, _ = convert_jit_checkpoint(path, in_context_start=1)
    torch.testing.assert_close(from_ema.proj_out.bias, model.proj_out.bias + 1.0)

    torch.save({**upstream, "net.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="Unexpected upstream keys: \\['extra.weight'\\]"):
        convert_jit_checkpoint(tmp_path / "extra.pth", in_context_start=1)
    missing = {k: v for k, v in upstream.items() if k != "net.final_layer.linear.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Missing keys \\(ours\\): \\['proj_out.bias'\\]"):
        convert_jit_checkpoint(tmp_path / "missing.pth", in_context_start=1)
    wrong_table = dict(upstream, **{"net.pos_embed": upstream["net.pos_embed"] + 1})
    torch.save(wrong_table, tmp_path / "table.pth")
    with pytest.raises(ValueError, match="pos_embed"):
        convert_jit_checkpoint(tmp_path / "table.pth", in_context_start=1)
    with pytest.raises(ValueError, match="in_context_start"):
        convert_jit_checkpoint(tmp_path / "missing.pth")


def test_jit_converter_carries_the_training_args_and_any_depth(tmp_path, capsys):
    model = randomized(JiTTransformer2DModel(**TINY_JIT))
    upstream = _to_upstream_jit(model.state_dict(), model)
    # A model name that is not a preset (a fork's): the architecture comes from the shapes, the rest from the args.
    args = argparse.Namespace(model="JiT-T/4", img_size=16, class_num=4, noise_scale=1.0, attn_dropout=0.1,
                              proj_dropout=0.2)
    torch.save({"model": upstream, "args": args}, tmp_path / "checkpoint-last.pth")
    converted, report = convert_jit_checkpoint(tmp_path / "checkpoint-last.pth", weights="model", in_context_start=1)
    config = converted.config
    assert (config.noise_scale, config.dropout, config.attention_dropout, config.num_classes) == (1.0, 0.2, 0.1, 4)
    assert converted.noise_scale == 1.0 and "noise_scale=1.0" in str(report)
    # Depth 3 is no upstream size: the CLI takes in_context_start for a plain state dict.
    torch.save(upstream, tmp_path / "plain.pth")
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="system", required=True))
    args = parser.parse_args(["jit", str(tmp_path / "plain.pth"), str(tmp_path / "out"), "--in-context-start", "1"])
    capsys.readouterr()
    args.func(args)
    count = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.endswith(f"saved JiTTransformer2DModel ({count:,} parameters) to {tmp_path / 'out'}\n")
    loaded = JiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x, 700.0, class_labels=[2]).sample, model(x, 700.0, class_labels=[2]).sample)


def _to_upstream_pixeldlm(state):
    upstream = {}
    for key, value in _fuse_attention(state).items():
        key = re.sub(r"^pos_embed_(row|col)$", lambda m: "pos_embed_" + {"row": "h", "col": "w"}[m.group(1)], key)
        key = re.sub(r"^condition_pos_embed_(row|col)$", lambda m: "cond_pos_embed_" + {"row": "h", "col": "w"}[m.group(1)], key)
        key = key.replace("proj_out.", "output_proj.").replace(".mlp.w12.", ".mlp.0.").replace(".mlp.w3.", ".mlp.3.")
        key = key.replace(".adaln.norm_weight", ".adaLN.norm.weight").replace(".adaln.scale.", ".adaLN.scale_mlp.1.")
        key = key.replace(".adaln.shift.", ".adaLN.shift_mlp.1.")
        key = key.replace("pixel_decoder.out.", "pixel_decoder.unet.decoder.1.").replace("pixel_decoder.up.", "pixel_decoder.unet.decoder_up.")
        key = re.sub(r"^pixel_decoder\.(encoder|decoder)\.", r"pixel_decoder.unet.\1.", key)
        key = key.replace("pixel_decoder.cond_proj.", "pixel_decoder.unet.cond_proj.0.")
        upstream["module." + key] = value
    half = 16
    upstream["module.time_embed.emb"] = torch.exp(torch.arange(half).float() * -(np.log(10000) / (half - 1)))
    return upstream


@pytest.mark.parametrize("decoder", [False, True])
def test_pixeldlm_converter_round_trip(tmp_path, decoder):
    model = randomized(JiTTransformer2DModel(**TINY_DLM, use_pixel_decoder=decoder, pixel_decoder_depth=2))
    path = tmp_path / "best_model.pth"
    torch.save({"epoch": 3, "model_state_dict": _to_upstream_pixeldlm(model.state_dict()), "loss": 0.1}, path)
    converted, report = convert_pixeldlm_checkpoint(path, num_attention_heads=2)
    assert converted.config.use_pixel_decoder == decoder and converted.config.mlp_ratio == 4.0
    assert "freq_loss_fn" not in str(report)
    x, cond = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(converted(x, 123.0, condition=cond).sample, model(x, 123.0, condition=cond).sample)
    with pytest.raises(ValueError, match="head count"):
        convert_pixeldlm_checkpoint(path)
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="system", required=True))
    args = parser.parse_args(["pixeldlm", str(path), str(tmp_path / "out"), "--num-attention-heads", "2"])
    args.func(args)
    loaded = JiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(loaded(x, 123.0, condition=cond).sample, model(x, 123.0, condition=cond).sample)


def test_pixeldlm_converter_drops_the_frequency_loss_buffer(tmp_path):
    """`train.py --use_freq_loss` (on in upstream's fine-tuning script) saves the loss module's JPEG weight table."""
    model = randomized(JiTTransformer2DModel(**TINY_DLM))
    upstream = _to_upstream_pixeldlm(model.state_dict())
    upstream["module.freq_loss_fn.freq_weights"] = torch.rand(8, 8)
    torch.save({"epoch": 1, "model_state_dict": upstream}, tmp_path / "checkpoint_epoch_1.pth")
    converted, report = convert_pixeldlm_checkpoint(tmp_path / "checkpoint_epoch_1.pth", num_attention_heads=2)
    assert "freq_loss_fn.freq_weights" in str(report) and "training loss" in str(report)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(converted(x, 10.0).sample, model(x, 10.0).sample)


def test_cli_hook(tmp_path):
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="system", required=True))
    model = randomized(JiTTransformer2DModel(**TINY_DLM))
    torch.save(_to_upstream_pixeldlm(model.state_dict()), tmp_path / "ckpt.pth")
    args = parser.parse_args(["pixeldlm", str(tmp_path / "ckpt.pth"), str(tmp_path / "out"), "--num-attention-heads", "2"])
    args.func(args)
    loaded = JiTTransformer2DModel.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(loaded.proj_out.weight, model.proj_out.weight)


# ------------------------------------------------------------------------------- saved and community layouts

def _save_layout(folder, config, state):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "JiTTransformer2DModel", **config}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("config", [TINY_JIT, TINY_DLM])
def test_folders_saved_with_the_fused_attention_names_still_load(tmp_path, config):
    model = randomized(JiTTransformer2DModel(**config))
    model.save_pretrained(tmp_path / "new")
    _save_layout(tmp_path / "old", json.loads((tmp_path / "new" / "config.json").read_text()), _fuse_attention(model.state_dict()))
    loaded = JiTTransformer2DModel.from_pretrained(tmp_path / "old")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert "blocks.0.attn.to_out.0.weight" in loaded.state_dict()


def _pr13098_layout(upstream):
    """diffusers PR #13098's keys, written from upstream's independently of the converter's tables."""
    state = {}
    for key, value in upstream.items():
        key = key.removeprefix("net.")
        if "rope" in key:
            continue  # non-persistent buffers there
        if ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3)):
                state[key.replace(".qkv.", f".to_{name}.")] = part
            continue
        key = key.replace(".attn.proj.", ".attn.to_out.0.").replace(".q_norm.", ".norm_q.").replace(".k_norm.", ".norm_k.")
        key = re.sub(r"^(blocks\.\d+)\.adaLN_modulation\.1\.", r"\1.adaLN_modulation.", key)
        key = key.replace("final_layer.norm_final.", "norm_final.").replace("final_layer.linear.", "linear_final.")
        state[key.replace("final_layer.adaLN_modulation.1.", "adaLN_modulation_final.")] = value
    return state


def test_community_jit_layouts_load_with_the_outputs_of_the_upstream_checkpoint(tmp_path, monkeypatch):
    from pixel_diffusers.models.transformers.transformer_jit import JIT_PRESETS

    model = randomized(JiTTransformer2DModel(**TINY_JIT))
    upstream = _to_upstream_jit(model.state_dict(), model)
    torch.save({"model": upstream, "model_ema1": upstream, "args": argparse.Namespace(model="tiny", img_size=16)},
               tmp_path / "checkpoint.pth")
    reference, _ = convert_jit_checkpoint(tmp_path / "checkpoint.pth", weights="model", in_context_start=1)

    pr_config = {k: v for k, v in TINY_JIT.items()} | {"in_channels": 3, "mlp_ratio": 4.0, "attention_dropout": 0.0,
                                                        "dropout": 0.0, "norm_eps": 1e-6}
    _save_layout(tmp_path / "pr13098", pr_config, _pr13098_layout(upstream))
    # BiliSakura's config names an upstream preset; a tiny one stands in for JiT-B/16 here.
    monkeypatch.setitem(JIT_PRESETS, "JiT-tiny/4", {k: v for k, v in TINY_JIT.items() if k != "num_classes"})
    bili_config = {"model_type": "JiT-tiny/4", "sample_size": 16, "num_class_embeds": 4, "attention_dropout": 0.0,
                   "dropout": 0.0, "model_name": None, "image_size": None, "num_classes": None}
    bili_state = {"transformer." + k.removeprefix("net."): v for k, v in upstream.items() if "rope" not in k}
    _save_layout(tmp_path / "bilisakura", bili_config, bili_state)

    x = torch.randn(2, 3, 16, 16)
    expected = reference(x, 300.0, class_labels=[0, 3]).sample
    for layout in ("pr13098", "bilisakura"):
        loaded = JiTTransformer2DModel.from_pretrained(tmp_path / layout)
        assert loaded.config.architecture == "jit" and loaded.config.in_context_start == 1
        torch.testing.assert_close(loaded(x, 300.0, class_labels=[0, 3]).sample, expected, rtol=0, atol=0)

    with pytest.raises(ValueError, match="model_type"):
        _save_layout(tmp_path / "bad", {**bili_config, "model_type": "JiT-X/1"}, bili_state)
        JiTTransformer2DModel.from_pretrained(tmp_path / "bad")


def test_a_pipeline_folder_in_the_layout_of_diffusers_pr_13098_loads_into_jit_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pixel_diffusers import JiTPipeline

    model = randomized(JiTTransformer2DModel(**TINY_JIT))
    config = dict(TINY_JIT, in_channels=3, mlp_ratio=4.0, attention_dropout=0.0, dropout=0.0, norm_eps=1e-6)
    _save_layout(tmp_path / "transformer", config, _pr13098_layout(_to_upstream_jit(model.state_dict(), model)))
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "JiTPipeline", "_diffusers_version": "0.37.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "transformer": ["diffusers", "JiTTransformer2DModel"],
    }))
    loaded = JiTPipeline.from_pretrained(tmp_path)
    reference = JiTPipeline(model, FlowMatchEulerDiscreteScheduler())
    for pipe in (loaded, reference):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[2], num_inference_steps=3, output_type="pt")
    # The same weights; loaded ones sit at other memory alignments, where the CPU matmul kernels may round differently.
    torch.testing.assert_close(loaded(generator=torch.Generator().manual_seed(0), **kwargs).images,
                               reference(generator=torch.Generator().manual_seed(0), **kwargs).images, rtol=0, atol=1e-5)


def test_from_single_file_uses_the_converters_strictly(tmp_path):
    model = randomized(JiTTransformer2DModel(**TINY_JIT))
    upstream = _to_upstream_jit(model.state_dict(), model)
    torch.save({"model": upstream, "model_ema1": upstream, "args": argparse.Namespace(model="tiny", img_size=16)},
               tmp_path / "checkpoint-last.pth")
    loaded = JiTTransformer2DModel.from_single_file(tmp_path / "checkpoint-last.pth", weights="model",
                                                    in_context_start=1, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key].float(), value, rtol=0, atol=1e-2)
    dlm = randomized(JiTTransformer2DModel(**TINY_DLM))
    torch.save({"model_state_dict": _to_upstream_pixeldlm(dlm.state_dict())}, tmp_path / "best_model.pth")
    loaded = JiTTransformer2DModel.from_single_file(tmp_path / "best_model.pth", architecture="pixeldlm", num_attention_heads=2)
    assert loaded.config.architecture == "pixeldlm"
    torch.save({**upstream, "net.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="Unexpected upstream keys"):
        JiTTransformer2DModel.from_single_file(tmp_path / "extra.pth", in_context_start=1)
    with pytest.raises(ValueError, match="architecture"):
        JiTTransformer2DModel.from_single_file(tmp_path / "best_model.pth", architecture="dit")
    with pytest.raises(ValueError, match="neither a file"):
        JiTTransformer2DModel.from_single_file(tmp_path / "missing.pth")
