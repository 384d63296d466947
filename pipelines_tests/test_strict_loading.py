"""Strict loading: damaged folders, edited configs, NaN weights, bad LoRA files and bad converter inputs raise."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixel_diffusers import JiTTransformer2DModel, PixelHDMPipeline, PixelHDMTransformer2DModel, TimeInputMLP
from pixel_diffusers.conversion import convert_jit_checkpoint, convert_pixel_sdxl_checkpoint, convert_pixelhdm_checkpoint
from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline

TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "pixelhdm"
    make_tiny_pixelhdm_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def edit_weights(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_intact_folder_loads(saved):
    pipe = PixelHDMPipeline.from_pretrained(saved)
    assert len(pipe.tokenizer) == 257


def test_missing_model_weight_lists_the_key(copy):
    key = "patch_blocks.0.attn.to_q.weight"
    edit_weights(copy / TRANSFORMER_FILE, lambda state: state.pop(key))
    with pytest.raises(ValueError, match="missing weights.*" + key.replace(".", r"\.")):
        PixelHDMTransformer2DModel.from_pretrained(copy / "transformer")
    with pytest.raises(ValueError, match="missing weights"):
        PixelHDMPipeline.from_pretrained(copy)


def test_config_edited_down_by_one_block_is_caught(copy):
    config_path = copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_patch_layers"] -= 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unexpected weights.*patch_blocks\\.1\\."):
        PixelHDMTransformer2DModel.from_pretrained(copy / "transformer")


def test_nan_weight_is_caught(copy):
    def poison(state):
        key = sorted(state)[0]
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")

    edit_weights(copy / TRANSFORMER_FILE, poison)
    with pytest.raises(ValueError, match="NaN or inf"):
        PixelHDMTransformer2DModel.from_pretrained(copy / "transformer")


def test_text_encoder_missing_weight_is_caught(copy):
    key = "layers.0.mlp.gate_proj.weight"
    edit_weights(copy / TEXT_ENCODER_FILE, lambda state: state.pop(key))
    with pytest.raises(ValueError, match="text_encoder.*missing weights.*" + key.replace(".", r"\.")):
        PixelHDMPipeline.from_pretrained(copy)


def test_text_encoder_nan_weight_is_caught(copy):
    def poison(state):
        state["norm.weight"] = torch.full_like(state["norm.weight"], float("inf"))

    edit_weights(copy / TEXT_ENCODER_FILE, poison)
    with pytest.raises(ValueError, match="text_encoder.*NaN or inf.*norm.weight"):
        PixelHDMPipeline.from_pretrained(copy)


def test_deleted_tokenizer_folder_is_caught(copy):
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(ValueError, match="tokenizer"):
        PixelHDMPipeline.from_pretrained(copy)


def test_incomplete_tokenizer_is_caught(copy):
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="empty tokenizer"):
        PixelHDMPipeline.from_pretrained(copy)


def test_other_models_are_strict_too(tmp_path):
    torch.manual_seed(0)
    for model in (TimeInputMLP(hidden_dims=(8, 8)), JiTTransformer2DModel(sample_size=16, patch_size=8, hidden_size=32,
                                                                          num_layers=2, num_attention_heads=2, in_context_start=1)):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        weights = next(folder.glob("*.safetensors"))
        edit_weights(weights, lambda state: state.pop(sorted(state)[-1]))
        with pytest.raises(ValueError, match="missing weights"):
            type(model).from_pretrained(folder)


def lora_pipe_and_weights(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_tiny_pixelhdm_pipeline(seed=0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]))
    weights = get_peft_model_state_dict(pipe.transformer)
    PixelHDMPipeline.save_lora_weights(tmp_path, transformer_lora_layers=weights)
    return load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))


def test_lora_with_unknown_layer_is_refused(tmp_path):
    state = lora_pipe_and_weights(tmp_path)
    key = next(k for k in state if "lora_A" in k)
    state[key.replace("patch_blocks.0", "patch_blocks.7")] = state[key]
    fresh = make_tiny_pixelhdm_pipeline(seed=0)
    with pytest.raises(ValueError, match="unexpected weights.*patch_blocks\\.7"):
        fresh.load_lora_weights(state)
    assert not getattr(fresh.transformer, "peft_config", None)


def test_lora_with_nan_is_refused(tmp_path):
    state = lora_pipe_and_weights(tmp_path)
    key = next(k for k in state if "lora_B" in k)
    state[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        make_tiny_pixelhdm_pipeline(seed=0).load_lora_weights(state)


def test_lora_matching_nothing_is_refused(tmp_path):
    state = lora_pipe_and_weights(tmp_path)
    state = {key.replace("transformer.", "unet.", 1): value for key, value in state.items()}
    with pytest.raises(ValueError, match="nothing was loaded"):
        make_tiny_pixelhdm_pipeline(seed=0).load_lora_weights(state)


@pytest.mark.parametrize("convert", [convert_pixelhdm_checkpoint, convert_jit_checkpoint, convert_pixel_sdxl_checkpoint])
def test_converters_name_the_file_of_a_bad_checkpoint(tmp_path, convert):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="model.safetensors.*not a readable safetensors file"):
        convert(bad)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt.*empty \(0 bytes\)"):
        convert(empty)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(4)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"truncated\.pt.*weights_only=True\) \(\w+: .+\)"):
        convert(truncated)
