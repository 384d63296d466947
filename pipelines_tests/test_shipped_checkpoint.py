"""The PixelHDM shapes checkpoint the repository ships: what it is, that it loads and that it follows prompts."""

import re
from pathlib import Path

import numpy as np
import torch
import yaml

from pixel_diffusers import PixelHDMPipeline
from pixel_diffusers.pipelines.pixelhdm.pipeline_pixelhdm import DEFAULT_SCHEDULER_CONFIG
from pixel_diffusers.training_utils import shapes

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "shapes-pixelhdm"


def test_checkpoint_is_small_and_records_the_run_that_made_it():
    size = sum(f.stat().st_size for f in CHECKPOINT.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    recorded = yaml.safe_load((CHECKPOINT / "training_config.yaml").read_text())
    config = yaml.safe_load((ROOT / "training" / "configs" / "pixelhdm_shapes.yaml").read_text())
    differs = {k for k, v in config.items() if recorded.get(k) != v}
    assert differs <= {"output_dir", "validation_guidance_scale"}, differs


def test_checkpoint_loads_and_draws_the_prompted_colours():
    pipe = PixelHDMPipeline.from_pretrained(CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 5_891_171
    # It samples with the measured default (see PixelHDMPipeline's docstring), in the trained range.
    assert {key: pipe.scheduler.config[key] for key in DEFAULT_SCHEDULER_CONFIG} == DEFAULT_SCHEDULER_CONFIG
    combos = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "white", "green")]
    images = pipe([shapes.caption(*c) for c in combos], height=32, width=32, num_inference_steps=10,
                  guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    assert [shapes.classify_background(np.asarray(i)) for i in images] == [c[2] for c in combos]
    assert [shapes.classify_color(np.asarray(i)) for i in images] == [c[1] for c in combos]


def test_checkpoint_card_snippet_runs_as_written(monkeypatch, tmp_path):
    """The card's usage snippet, run from the repository root: it needs `import pixel_diffusers`, and the pipeline
    defaults to the 32x32 the model was trained at."""
    snippet = re.search(r"```python\n(.*?)```", (CHECKPOINT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(snippet.replace('"sample.png"', repr(str(tmp_path / "sample.png"))), "card", "exec"), namespace)
    assert namespace["image"].size == (32, 32) and (tmp_path / "sample.png").exists()
