import pytest
import torch
from PIL import Image

from pixel_diffusers import PixelHDMPipeline, PixelHDMTransformer2DModel
from pixel_diffusers.cli import error_message, main

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


def test_convert_writes_a_loadable_model(tmp_path, capsys):
    model = reference_model()
    torch.save({"model": to_upstream(model), "ema": {"shadow": to_upstream(model)}, "config": UPSTREAM_CONFIG},
               tmp_path / "upstream.pt")
    main(["convert", "pixelhdm", str(tmp_path / "upstream.pt"), str(tmp_path / "converted")])
    out = capsys.readouterr().out
    count = sum(p.numel() for p in model.parameters())
    assert out.startswith("PixelHDM conversion of")
    assert out.endswith(f"saved PixelHDMTransformer2DModel ({count:,} parameters) to {tmp_path / 'converted'}\n")
    converted = PixelHDMTransformer2DModel.from_pretrained(tmp_path / "converted")
    for (name, a), b in zip(converted.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_generate_defaults_to_the_training_resolution_with_underscore_flags(tiny_pipe, tmp_path):
    tiny_pipe.transformer.register_to_config(sample_size=16)
    try:
        tiny_pipe.save_pretrained(tmp_path / "pipe")
    finally:
        tiny_pipe.transformer.register_to_config(sample_size=None)
    main(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"),
          "--num_inference_steps", "2", "--guidance_scale", "1.0"])
    assert Image.open(tmp_path / "out" / "image_000.png").size == (16, 16)


def test_generate_takes_the_pipelines_own_step_count_by_default(tiny_pipe, tmp_path, monkeypatch):
    from pixel_diffusers.pipelines.pixelhdm import pipeline_pixelhdm

    asked = []
    retrieve = pipeline_pixelhdm.retrieve_flow_timesteps

    def recording(scheduler, steps, *args, **kwargs):
        asked.append(steps)
        return retrieve(scheduler, steps, *args, **kwargs)

    monkeypatch.setattr(pipeline_pixelhdm, "retrieve_flow_timesteps", recording)
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    main(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"), "--height", "16",
          "--width", "16", "--guidance_scale", "1.0"])
    assert asked == [pipeline_pixelhdm.DEFAULT_NUM_INFERENCE_STEPS] == [12]


def test_errors_are_one_actionable_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "pixel-org/not-in-the-cache", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("pixel-diffusers generate: error: Cannot load 'pixel-org/not-in-the-cache'")
    assert "could not be reached (OfflineModeIsEnabled" in line
    hint = error_message(AttributeError("module diffusers has no attribute PixelHDMPipeline"))
    assert "import pixel_diffusers" in hint and "PixelHDMPipeline" in hint


def test_push_to_hub_offline_says_so(tiny_pipe):
    with pytest.raises(OSError, match="could not be reached .*Nothing was uploaded"):
        tiny_pipe.push_to_hub("pixel-org/tiny")
