"""smalldiffusion state dicts -> the small models: tiny checkpoints written in upstream's key layout, converted, and
compared with upstream's forward restated functionally on the upstream tensors (smalldiffusion itself is optional)."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixel_diffusers.cli import build_parser
from pixel_diffusers.conversion import convert_smalldiffusion_checkpoint
from pixel_diffusers.models.small import SmallDiT, SmallUNet


class Weights(dict):
    """An upstream state dict filled with random tensors, key by key."""

    def __init__(self, seed=0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def tensor(self, name, *shape):
        self[name] = torch.randn(shape, generator=self.generator) * 0.3

    def linear(self, name, out_features, in_features, bias=True):
        self.tensor(name + ".weight", out_features, in_features)
        if bias:
            self.tensor(name + ".bias", out_features)

    def conv(self, name, out_channels, in_channels, kernel):
        self.tensor(name + ".weight", out_channels, in_channels, kernel, kernel)
        self.tensor(name + ".bias", out_channels)

    def norm(self, name, channels):
        self.tensor(name + ".weight", channels)
        self[name + ".weight"] += 1
        self.tensor(name + ".bias", channels)

    def label_embedder(self, width, num_classes):
        self.tensor("cond_embed.embeddings.weight", num_classes + 1, width)
        self.linear("cond_embed.mlp.1", width, width)


def lin(sd, x, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def conv(sd, x, name, padding):
    return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], padding=padding)


def sigma_features(sigma, batch):
    s = 0.5 * torch.log(torch.as_tensor(sigma).reshape(-1).expand(batch))
    return torch.stack([torch.sin(s), torch.cos(s)], dim=1)


def conditioning(sd, x, sigma, cond, flow=False):
    if flow:  # TimestepEmbedder: [cos, sin] of 1000 t at 128 frequencies, then GELU-tanh MLP
        freqs = torch.exp(-np.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        angles = 1000 * torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])[:, None] * freqs
        y = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
        for index in (0, 2):
            y = F.gelu(lin(sd, y, f"sig_embed.mlp.{index}"), approximate="tanh")
        y = lin(sd, y, "sig_embed.mlp.4")
    else:
        y = lin(sd, F.silu(lin(sd, sigma_features(sigma, x.shape[0]), "sig_embed.mlp.0")), "sig_embed.mlp.2")
    if cond is not None:
        y = y + lin(sd, F.silu(sd["cond_embed.embeddings.weight"][cond]), "cond_embed.mlp.1")
    return y


# ------------------------------------------------------------------------------------------------------------ MLPs

def upstream_mlp(dim, hidden_dims, cond_dim=0, num_classes=None):
    sd = Weights()
    sizes = [dim + 2 + cond_dim, *hidden_dims, dim]
    for index, (size_in, size_out) in enumerate(zip(sizes, sizes[1:])):
        sd.linear(f"net.{2 * index}", size_out, size_in)
    if num_classes:
        sd.label_embedder(cond_dim, num_classes)
    return sd


def reference_mlp(sd, x, sigma, cond=None):
    h = [x, sigma_features(sigma, x.shape[0])]
    if cond is not None:
        h.append(lin(sd, F.silu(sd["cond_embed.embeddings.weight"][cond]), "cond_embed.mlp.1"))
    h = torch.cat(h, dim=1)
    layers = sorted(int(key.split(".")[1]) for key in sd if key.endswith(".weight") and key.startswith("net."))
    for index in layers[:-1]:
        h = F.gelu(lin(sd, h, f"net.{index}"))
    return lin(sd, h, f"net.{layers[-1]}")


@pytest.mark.parametrize("conditional", [False, True])
def test_mlps(tmp_path, conditional):
    sd = upstream_mlp(3, (8, 16, 8), cond_dim=4 if conditional else 0, num_classes=5 if conditional else None)
    torch.save(dict(sd), tmp_path / "checkpoint.pth")
    model, report = convert_smalldiffusion_checkpoint(tmp_path / "checkpoint.pth")
    assert type(model).__name__ == ("ConditionalMLP" if conditional else "TimeInputMLP")
    assert model.config.hidden_dims == (8, 16, 8) and "scaled=False" in str(report)
    x, cond = torch.randn(4, 3), (torch.tensor([0, 3, 5, 1]) if conditional else None)
    for sigma in (torch.tensor(0.3), torch.rand(4, 1) + 0.05):
        torch.testing.assert_close(model(x, sigma, cond), reference_mlp(sd, x, sigma, cond))


# ------------------------------------------------------------------------------------------------------------- DiT

def upstream_dit(in_dim=8, channels=2, patch=2, depth=2, width=16, mlp_hidden=64, num_classes=None, flow=False):
    sd = Weights()
    grid, quarter = in_dim // patch, width // 4
    omega = 1.0 / 10000 ** np.linspace(0, 1, quarter, endpoint=False)
    cols, rows = np.tile(np.arange(grid), grid), np.repeat(np.arange(grid), grid)
    table = [f(np.outer(axis, omega)) for axis in (cols, rows) for f in (np.sin, np.cos)]  # columns first
    sd["pos_embed"] = torch.tensor(np.concatenate(table, axis=1)).float()[None]
    sd.conv("x_embed.proj", width, channels, patch)
    if flow:
        sd.linear("sig_embed.mlp.0", 1024, 256)
        sd.linear("sig_embed.mlp.2", width, 1024)
        sd.linear("sig_embed.mlp.4", width, width)
    else:
        sd.linear("sig_embed.mlp.0", width, 2)
        sd.linear("sig_embed.mlp.2", width, width)
    if num_classes:
        sd.label_embedder(width, num_classes)
    for i in range(depth):
        sd.linear(f"blocks.{i}.norm1.modulation.proj.1", 2 * width, width)
        sd.linear(f"blocks.{i}.attn.qkv", 3 * width, width)
        sd.linear(f"blocks.{i}.attn.proj", width, width)
        sd.linear(f"blocks.{i}.norm2.modulation.proj.1", 2 * width, width)
        sd.linear(f"blocks.{i}.mlp.0", mlp_hidden, width)
        sd.linear(f"blocks.{i}.mlp.2", width, mlp_hidden)
        sd.linear(f"blocks.{i}.scale_modulation.proj.1", 2 * width, width)
    sd.linear("final_norm.modulation.proj.1", 2 * width, width)
    sd.linear("final_linear", patch * patch * channels, width)
    return sd


def reference_dit(sd, x, sigma, num_heads, cond=None, flow=False):
    b, c, size, _ = x.shape
    p = sd["x_embed.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embed.proj.weight"], sd["x_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    y = conditioning(sd, x, sigma, cond, flow)

    def modulated_norm(h, name):  # upstream's ModulatedLayerNorm: (scale, shift)
        scale, shift = lin(sd, F.silu(y), name + ".modulation.proj.1").chunk(2, dim=1)
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})
    for i in range(depth):
        gate_msa, gate_mlp = lin(sd, F.silu(y), f"blocks.{i}.scale_modulation.proj.1").chunk(2, dim=1)
        q, k, v = lin(sd, modulated_norm(h, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv").unflatten(
            -1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = h + gate_msa[:, None] * lin(sd, attention, f"blocks.{i}.attn.proj")
        mlp = F.gelu(lin(sd, modulated_norm(h, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.0"), approximate="tanh")
        h = h + gate_mlp[:, None] * lin(sd, mlp, f"blocks.{i}.mlp.2")
    out = lin(sd, modulated_norm(h, "final_norm"), "final_linear")
    g = size // p
    return out.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, size, size)


@pytest.mark.parametrize("kind", ["plain", "conditional", "flow"])
def test_dit_swaps_the_modulation_halves_and_matches(tmp_path, kind):
    sd = upstream_dit(num_classes=3 if kind == "conditional" else None, flow=kind == "flow")
    torch.save(dict(sd), tmp_path / "checkpoint.pth")
    model, report = convert_smalldiffusion_checkpoint(tmp_path / "checkpoint.pth", num_heads=2)
    assert isinstance(model, SmallDiT) and model.config.prediction_type == ("flow" if kind == "flow" else "epsilon")
    assert (model.config.in_dim, model.config.depth, model.config.head_dim, model.config.mlp_ratio) == (8, 2, 8, 4.0)
    assert "pos_embed" in str(report)
    x = torch.randn(3, 2, 8, 8)
    cond = torch.tensor([0, 2, 3]) if kind == "conditional" else None
    for sigma in (torch.tensor(0.4), torch.rand(3, 1, 1, 1) * 0.9 + 0.05):
        expected = reference_dit(sd, x, sigma, 2, cond, flow=kind == "flow")
        torch.testing.assert_close(model(x, sigma, cond), expected, atol=1e-5, rtol=1e-5)


def test_dit_needs_its_head_count_and_a_consistent_prediction_type(tmp_path):
    torch.save(dict(upstream_dit()), tmp_path / "dit.pth")
    with pytest.raises(ValueError, match="num_heads"):
        convert_smalldiffusion_checkpoint(tmp_path / "dit.pth")
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        convert_smalldiffusion_checkpoint(tmp_path / "dit.pth", num_heads=2, prediction_type="flow")
    with pytest.raises(ValueError, match="model_type='Unet'"):
        convert_smalldiffusion_checkpoint(tmp_path / "dit.pth", model_type="Unet", num_heads=2)
    table = dict(upstream_dit())
    table["pos_embed"] = table["pos_embed"] + 0.1
    torch.save(table, tmp_path / "table.pth")
    with pytest.raises(ValueError, match="pos_embed"):
        convert_smalldiffusion_checkpoint(tmp_path / "table.pth", num_heads=2)


# ------------------------------------------------------------------------------------------------------------ Unet

def upstream_unet(in_ch=1, out_ch=2, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_classes=None):
    """The keys and shapes of smalldiffusion's `Unet` (its down / middle / up bookkeeping restated)."""
    sd, temb = Weights(), 4 * ch

    def res(name, size_in, size_out):
        sd.norm(name + ".layer1.0", size_in)
        sd.conv(name + ".layer1.2", size_out, size_in, 3)
        sd.linear(name + ".temb_proj.1", size_out, temb)
        sd.norm(name + ".layer2.0", size_out)
        sd.conv(name + ".layer2.3", size_out, size_out, 3)
        if size_in != size_out:
            sd.conv(name + ".shortcut", size_out, size_in, 1)

    def attn(name, channels):
        sd.norm(name + ".norm", channels)
        sd.linear(name + ".attn.qkv", 3 * channels, channels, bias=False)
        sd.linear(name + ".attn.proj", channels, channels)
        sd.conv(name + ".proj_out", channels, channels, 1)

    sd.linear("sig_embed.mlp.0", temb, 2)
    sd.linear("sig_embed.mlp.2", temb, temb)
    if num_classes:
        sd.label_embedder(temb, num_classes)
    sd.conv("conv_in", ch, in_ch, 3)
    dims, levels = [ch * m for m in (1, *ch_mult)], len(ch_mult)
    for level, (size_in, size_out) in enumerate(zip(dims, dims[1:])):
        for block in range(num_res_blocks):
            res(f"downs.{level}.blocks.{block}.0", size_in if block == 0 else size_out, size_out)
            if level in attn_levels:
                attn(f"downs.{level}.blocks.{block}.1", size_out)
        if level < levels - 1:
            sd.conv(f"downs.{level}.downsample.1", size_out, size_out, 3)
    current = dims[-1]
    res("mid.0", current, current)
    attn("mid.1", current)
    res("mid.2", current, current)
    reverse = dims[::-1]
    for level, (size_out, next_skip) in enumerate(zip(reverse, reverse[1:])):
        for block in range(num_res_blocks + 1):
            res(f"ups.{level}.blocks.{block}.0", current + (next_skip if block == num_res_blocks else size_out), size_out)
            current = size_out
            if levels - 1 - level in attn_levels:
                attn(f"ups.{level}.blocks.{block}.1", size_out)
        if level < levels - 1:
            sd.conv(f"ups.{level}.upsample.1", size_out, size_out, 3)
    sd.norm("out_layer.0", current)
    sd.conv("out_layer.2", out_ch, current, 3)
    return sd


def reference_unet(sd, x, sigma, cond=None):
    temb = conditioning(sd, x, sigma, cond)

    def norm(h, name):
        return F.group_norm(h, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def res(h, name):
        out = conv(sd, F.silu(norm(h, name + ".layer1.0")), name + ".layer1.2", 1)
        out = out + lin(sd, F.silu(temb), name + ".temb_proj.1")[:, :, None, None]
        out = conv(sd, F.silu(norm(out, name + ".layer2.0")), name + ".layer2.3", 1)
        return (conv(sd, h, name + ".shortcut", 0) if name + ".shortcut.weight" in sd else h) + out

    def attn(h, name):
        b, c, height, width = h.shape
        q, k, v = lin(sd, norm(h, name + ".norm").flatten(2).transpose(1, 2), name + ".attn.qkv").chunk(3, dim=-1)
        out = lin(sd, F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0], name + ".attn.proj")
        return h + conv(sd, out.transpose(1, 2).reshape(b, c, height, width), name + ".proj_out", 0)

    def block(h, name):
        h = res(h, name + ".0")
        return attn(h, name + ".1") if name + ".1.norm.weight" in sd else h

    count = lambda prefix: len({key.split(".")[len(prefix.split("."))] for key in sd if key.startswith(prefix + ".")})
    hs = [conv(sd, x, "conv_in", 1)]
    for level in range(count("downs")):
        for index in range(count(f"downs.{level}.blocks")):
            hs.append(block(hs[-1], f"downs.{level}.blocks.{index}"))
        if f"downs.{level}.downsample.1.weight" in sd:
            weight, bias = sd[f"downs.{level}.downsample.1.weight"], sd[f"downs.{level}.downsample.1.bias"]
            hs.append(F.conv2d(F.pad(hs[-1], (0, 1, 0, 1)), weight, bias, stride=2))
    h = res(attn(res(hs[-1], "mid.0"), "mid.1"), "mid.2")
    for level in range(count("ups")):
        for index in range(count(f"ups.{level}.blocks")):
            h = block(torch.cat([h, hs.pop()], dim=1), f"ups.{level}.blocks.{index}")
        if f"ups.{level}.upsample.1.weight" in sd:
            h = conv(sd, F.interpolate(h, scale_factor=2.0, mode="nearest"), f"ups.{level}.upsample.1", 1)
    return conv(sd, F.silu(norm(h, "out_layer.0")), "out_layer.2", 1)


def test_unet_has_upstreams_inner_attention_projection_and_matches(tmp_path):
    sd = upstream_unet(ch_mult=(1, 2, 1), num_res_blocks=2, attn_levels=(0, 2), num_classes=4)
    torch.save(dict(sd), tmp_path / "checkpoint.pth")
    model, _ = convert_smalldiffusion_checkpoint(tmp_path / "checkpoint.pth", in_dim=8)
    assert isinstance(model, SmallUNet) and model.config.attn_resolutions == (8, 2)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in sd.values())
    x = torch.randn(2, 1, 8, 8)
    cond = torch.tensor([4, 1])
    for sigma in (torch.tensor(2.0), torch.rand(2, 1, 1, 1) + 0.1):
        torch.testing.assert_close(model(x, sigma, cond), reference_unet(sd, x, sigma, cond), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="in_dim"):
        convert_smalldiffusion_checkpoint(tmp_path / "checkpoint.pth")
    torch.save({**sd, "mid.1.attn.extra": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="Unexpected upstream keys: \\['mid.1.attn.extra'\\]"):
        convert_smalldiffusion_checkpoint(tmp_path / "extra.pth", in_dim=8)


def test_cli_converts_a_scaled_unet(tmp_path):
    torch.save(dict(upstream_unet()), tmp_path / "checkpoint.pth")
    args = build_parser().parse_args(["convert", "smalldiffusion", str(tmp_path / "checkpoint.pth"), str(tmp_path / "out"),
                                      "--in-dim", "8", "--scaled", "--prediction-type", "x0"])
    args.func(args)
    loaded = SmallUNet.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.scaled and loaded.config.prediction_type == "x0"
    x, sigma = torch.randn(1, 1, 8, 8), torch.tensor(3.0)
    # upstream's Scaled feeds the network x / sqrt(1 + sigma^2)
    torch.testing.assert_close(loaded(x, sigma), reference_unet(upstream_unet(), x / (1 + sigma**2).sqrt(), sigma),
                               atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------- against smalldiffusion, if installed

def smalldiffusion_models():
    """smalldiffusion's model modules, without its package __init__ (which also imports torchvision)."""
    spec = importlib.util.find_spec("smalldiffusion")
    if spec is None:
        pytest.skip("smalldiffusion is not installed")
    package = types.ModuleType("_smalldiffusion_models")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("_smalldiffusion_models", package)
    return tuple(importlib.import_module(f"_smalldiffusion_models.{name}") for name in ("model", "model_dit", "model_unet"))


def test_installed_smalldiffusion_models_convert_exactly(tmp_path):
    model, model_dit, model_unet = smalldiffusion_models()
    assert sum(p.numel() for p in model_unet.Unet(32, 3, 3).parameters()) == sum(p.numel() for p in SmallUNet().parameters())
    torch.manual_seed(0)
    cases = [
        (model.ConditionalMLP(dim=2, hidden_dims=(8, 16), cond_dim=4, num_classes=3), {}, (5, 2), torch.tensor([0, 1, 2, 3, 1])),
        (model_dit.DiT(8, 1, 2, depth=2, head_dim=8, num_heads=2, cond_embed=model.CondEmbedderLabel(16, 5)),
         {"num_heads": 2}, (3, 1, 8, 8), torch.tensor([0, 4, 5])),
        (model_unet.Unet(8, 1, 2, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), num_res_blocks=1), {"in_dim": 8}, (2, 1, 8, 8), None),
    ]
    for upstream, kwargs, shape, cond in cases:
        with torch.no_grad():
            for parameter in upstream.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        upstream.eval()
        torch.save(upstream.state_dict(), tmp_path / "checkpoint.pth")
        ours, _ = convert_smalldiffusion_checkpoint(tmp_path / "checkpoint.pth", **kwargs)
        x, sigma = torch.randn(shape), torch.tensor(0.7)
        with torch.no_grad():
            expected = upstream(x, sigma, cond) if cond is not None else upstream(x, sigma)
        torch.testing.assert_close(ours(x, sigma, cond), expected, atol=1e-6, rtol=1e-6)
