import torch
from PIL import Image

from pixel_diffusers import PixelHDMPipeline, PixelHDMTransformer2DModel
from pixel_diffusers.cli import main

from test_convert_pixelhdm import UPSTREAM_CONFIG, reference_model, to_upstream


def test_demo_saves_loads_and_generates(tmp_path):
    main(["demo", "--output-dir", str(tmp_path), "--steps", "2", "--height", "32", "--width", "32",
          "--prompt", "a red circle", "a blue square"])
    assert isinstance(PixelHDMPipeline.from_pretrained(tmp_path / "tiny-pixelhdm"), PixelHDMPipeline)
    grid = Image.open(tmp_path / "images" / "grid.png")
    assert grid.size == (64, 32)


def test_generate_from_a_saved_pipeline(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    main(["generate", "--model", str(tmp_path / "pipe"), "--output-dir", str(tmp_path / "out"), "--steps", "2",
          "--height", "32", "--width", "32", "--images-per-prompt", "2"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.png", "image_000.png", "image_001.png"]


def test_convert_writes_a_loadable_model(tmp_path):
    model = reference_model()
    torch.save({"model": to_upstream(model), "ema": {"shadow": to_upstream(model)}, "config": UPSTREAM_CONFIG},
               tmp_path / "upstream.pt")
    main(["convert", "pixelhdm", str(tmp_path / "upstream.pt"), str(tmp_path / "converted")])
    converted = PixelHDMTransformer2DModel.from_pretrained(tmp_path / "converted")
    for (name, a), b in zip(converted.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
