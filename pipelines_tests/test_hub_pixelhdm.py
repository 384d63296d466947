"""Hub round trips, offline: uploads are intercepted at the huggingface_hub boundary and pulled back from a cache."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, RepoUrl

from pixel_diffusers import PixelHDMPipeline
from pixel_diffusers.testing import seed_hub_cache

REPO_ID = "pixel-org/tiny-pixelhdm"


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red circle", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="pt"
    ).images


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replaces the Hub's create_repo/upload_folder with copies of the uploaded folders into `uploads[repo_id]`."""
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        target = tmp_path / "uploads" / repo_id
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder_path, target)
        uploads[repo_id] = target
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def read_card(folder: Path):
    text = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(text.split("---")[1])
    return text, front_matter


def test_push_to_hub_then_pull_from_cache_gives_identical_images(tiny_pipe, fake_hub, tmp_path):
    tiny_pipe.push_to_hub(REPO_ID, model_card_kwargs={"height": 32, "width": 32, "num_inference_steps": 2})
    uploaded = fake_hub[REPO_ID]
    assert (uploaded / "model_index.json").exists()
    assert (uploaded / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    text, meta = read_card(uploaded)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert "pixel_diffusers" in meta["tags"] and "PixelHDMPipeline" in meta["tags"]
    assert "PixelHDMTransformer2DModel" in text and "3,942,651" in text

    expected = generate(tiny_pipe)
    for tree_listing in (False, True):
        cache = tmp_path / f"cache-{tree_listing}"
        seed_hub_cache(uploaded, REPO_ID, cache, tree_listing=tree_listing)
        assert (cache / f"models--{REPO_ID.replace('/', '--')}" / "trees").exists() == tree_listing
        for loader in (PixelHDMPipeline, DiffusionPipeline):
            pulled = loader.from_pretrained(REPO_ID, cache_dir=cache)
            assert type(pulled) is PixelHDMPipeline
            torch.testing.assert_close(generate(pulled), expected, atol=0, rtol=0)


def test_model_card_usage_snippet_runs(tiny_pipe, fake_hub, tmp_path, monkeypatch):
    tiny_pipe.push_to_hub(REPO_ID, model_card_kwargs={"height": 32, "width": 32, "num_inference_steps": 2})
    text, _ = read_card(fake_hub[REPO_ID])
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'from_pretrained("{REPO_ID}")' in snippet
    cache = tmp_path / "cache"
    seed_hub_cache(fake_hub[REPO_ID], REPO_ID, cache)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    namespace = {}
    exec(compile(snippet, "model_card_snippet", "exec"), namespace)
    assert namespace["image"].size == (32, 32) and (tmp_path / "sample.png").exists()


def test_save_pretrained_with_push_to_hub(tiny_pipe, fake_hub, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id=REPO_ID)
    uploaded = fake_hub[REPO_ID]
    assert (tmp_path / "local" / "README.md").exists()
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    _, meta = read_card(uploaded)
    assert meta["pipeline_tag"] == "text-to-image"


def test_components_load_from_repo_subfolders(tiny_pipe, fake_hub, tmp_path):
    from pixel_diffusers import PixelFlowMatchScheduler, PixelHDMTransformer2DModel

    tiny_pipe.push_to_hub(REPO_ID)
    cache = tmp_path / "cache"
    seed_hub_cache(fake_hub[REPO_ID], REPO_ID, cache)
    transformer = PixelHDMTransformer2DModel.from_pretrained(REPO_ID, subfolder="transformer", cache_dir=cache)
    scheduler = PixelFlowMatchScheduler.from_pretrained(REPO_ID, subfolder="scheduler", cache_dir=cache)
    assert scheduler.config.solver == tiny_pipe.scheduler.config.solver
    for (name, a), b in zip(transformer.state_dict().items(), tiny_pipe.transformer.state_dict().values()):
        assert torch.equal(a, b), name
