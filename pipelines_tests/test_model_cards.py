"""Every pipeline's model card tells the truth: a working install line, the model's real figures, a usage snippet
that runs as written (executed here against a saved folder)."""

import re

import pytest

from pixel_diffusers.testing import (
    make_tiny_jit_pipeline,
    make_tiny_pixel_sdxl_pipeline,
    make_tiny_pixeldlm_pipeline,
    make_tiny_pixelhdm_pipeline,
)

CASES = {
    "pixelhdm": (make_tiny_pixelhdm_pipeline, dict(height=32, width=32, num_inference_steps=2), "patch_size"),
    "pixel_sdxl": (make_tiny_pixel_sdxl_pipeline, dict(height=32, width=32, num_inference_steps=1), "patch_size"),
    "jit": (make_tiny_jit_pipeline, dict(num_inference_steps=2), "patch_size"),
    "pixeldlm": (make_tiny_pixeldlm_pipeline, dict(prompt="hi"), "sample_size"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_card_is_true_and_its_snippet_runs(name, tmp_path, monkeypatch):
    make, fields, figure = CASES[name]
    pipe = make(seed=0)
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    model = pipe.components.get("transformer") or pipe.components.get("unet")
    text = pipe.model_card(str(folder), **fields).text

    assert "pip install pixel-diffusers\n" not in text and "pip install" in text
    size = model.config[figure]
    assert f"{size}×{size}" in text  # the model's own figure, not a hard-coded one
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "import pixel_diffusers" in snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, f"{name}_model_card", "exec"), {})


@pytest.mark.parametrize("name, steps", [("pixelhdm", 12), ("pixel_sdxl", 30)])
def test_model_card_snippet_samples_with_the_pipelines_default_step_count(name, steps):
    assert f"num_inference_steps={steps}," in CASES[name][0](seed=0).model_card("user/model").text
