"""The JiT and PixelDLM training scripts: a few steps at tiny size, checkpoints and exact resumption."""

import json

import pytest
import torch

from repo_scripts import load_script


TINY_DLM = {"sample_size": 8, "patch_size": 2, "hidden_size": 32, "num_layers": 1, "num_attention_heads": 2}
TINY_JIT = {"sample_size": 16, "patch_size": 4, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 2,
            "bottleneck_dim": 8, "in_context_len": 2, "in_context_start": 1}


def test_pixeldlm_training_resumes_exactly(tmp_path):
    script = load_script("train_pixeldlm")
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.json").write_text(json.dumps([{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(6)]))
    (data / "plain.txt").write_text("hello\nworld\n")
    (data / "broken.json").write_text("{not json")
    common = ["--data", str(data), "--tiny_tokenizer", "--transformer_config", json.dumps(TINY_DLM),
              "--train_batch_size", "4", "--checkpointing_steps", "2", "--report_to", "none",
              "--num_validation_items", "2", "--validation_num_inference_steps", "2", "--learning_rate", "1e-3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script.main(common + ["--output_dir", str(straight), "--max_train_steps", "4"])
    script.main(common + ["--output_dir", str(resumed), "--max_train_steps", "2"])
    script.main(common + ["--output_dir", str(resumed), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoint-4" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    result = json.loads((straight / "exact_match.json").read_text())
    assert result["step"] == 4 and 0.0 <= result["exact_match"] <= 1.0
    assert (straight / "pipeline" / "model_index.json").exists()


def test_jit_training_runs_and_saves_a_pipeline(tmp_path):
    script = load_script("train_jit")
    script.main(["--shapes_dataset_size", "16", "--min_resolution", "16", "--max_resolution", "16",
                 "--transformer_config", json.dumps(TINY_JIT), "--output_dir", str(tmp_path), "--train_batch_size", "4",
                 "--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "none", "--use_ema",
                 "--validation_num_inference_steps", "2"])
    from pixel_diffusers.pipelines.jit.pipeline_jit import JiTPipeline

    pipe = JiTPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.transformer.config.num_classes >= 2 and pipe.transformer.config.id2label
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "pipeline" / "samples.png").exists()


def test_jit_trains_on_a_folder_of_class_subfolders(tmp_path):
    from PIL import Image

    for i in range(8):
        folder = tmp_path / "data" / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200 * (i % 2), 50, 100)).save(folder / f"{i}.png")
    script = load_script("train_jit")
    common = ["--transformer_config", json.dumps(TINY_JIT), "--resolution", "16", "--train_batch_size", "4",
              "--report_to", "none", "--validation_num_inference_steps", "2", "--disable_progress_bar"]
    with pytest.raises(ValueError, match="--class_column"):
        script.main(["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "none"), *common])
    state = script.main(["--train_data_dir", str(tmp_path / "data"), "--class_column", "label", "--num_classes", "2",
                         "--num_train_epochs", "2", "--output_dir", str(tmp_path / "out"), *common])
    assert state.step == 4  # 8 images / batch 4 = 2 steps per epoch, 2 epochs
    assert (tmp_path / "out" / "pipeline" / "model_index.json").exists()


def _assert_lora_reloads_at_the_trained_scale(pipe, folder):
    """The saved adapter metadata restores alpha: 8 / rank 4 scales the LoRA by 2 (without it, alpha = rank)."""
    pipe.load_lora_weights(folder, adapter_name="trained")
    assert pipe.transformer.peft_config["trained"].lora_alpha == 8
    layer = pipe.transformer.blocks[0].attn.to_out[0]
    assert layer.scaling["trained"] == 2.0
    assert layer.lora_B["trained"].weight.abs().max() > 0  # trained


def test_jit_and_pixeldlm_train_a_lora_with_its_alpha(tmp_path):
    from pixel_diffusers.pipelines.jit.pipeline_jit import JiTPipeline
    from pixel_diffusers.pipelines.pixeldlm.pipeline_pixeldlm import PixelDLMPipeline
    from pixel_diffusers.schedulers.scheduling_pixel_flow import PixelFlowMatchScheduler
    from pixel_diffusers.models.transformers.transformer_jit import JiTTransformer2DModel
    from pixel_diffusers.testing import make_tiny_tokenizer
    from pixel_diffusers.training_utils import shapes

    lora = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--report_to", "none",
            "--max_train_steps", "2", "--checkpointing_steps", "2", "--train_batch_size", "4"]
    base = tmp_path / "jit-base"
    transformer = JiTTransformer2DModel(**TINY_JIT, num_classes=len(shapes.class_names()))
    with torch.no_grad():  # a "pretrained" base: JiT's zero-initialised gates would keep every attention LoRA at zero
        for parameter in transformer.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    JiTPipeline(transformer, PixelFlowMatchScheduler(solver="heun")).save_pretrained(base)
    load_script("train_jit").main(lora + ["--shapes_dataset_size", "16", "--min_resolution", "16", "--max_resolution", "16",
                                          "--pretrained_model_name_or_path", str(base), "--output_dir", str(tmp_path / "jit"),
                                          "--validation_num_inference_steps", "1"])
    _assert_lora_reloads_at_the_trained_scale(JiTPipeline.from_pretrained(base), tmp_path / "jit" / "lora")

    base = tmp_path / "dlm-base"
    transformer = JiTTransformer2DModel(architecture="pixeldlm", **TINY_DLM)
    PixelDLMPipeline(transformer, PixelFlowMatchScheduler(solver="euler", prediction_type="flow_prediction"),
                     make_tiny_tokenizer()).save_pretrained(base)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(4)]))
    load_script("train_pixeldlm").main(lora + ["--data", str(data), "--pretrained_model_name_or_path", str(base),
                                               "--output_dir", str(tmp_path / "dlm"), "--num_validation_items", "1",
                                               "--validation_num_inference_steps", "1"])
    _assert_lora_reloads_at_the_trained_scale(PixelDLMPipeline.from_pretrained(base), tmp_path / "dlm" / "lora")
