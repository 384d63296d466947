"""training/train_pixelhdm.py at tiny size: outputs, exact resume after SIGKILL, two processes, LoRA, REPA, Hub push."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixel_diffusers import PixelHDMPipeline
from pixel_diffusers.pipelines.pixelhdm.pipeline_pixelhdm import DEFAULT_SCHEDULER_CONFIG
from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline

from repo_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_pixelhdm.py"
TINY_RUN = [
    "--preset", "for_testing", "--transformer_config", '{"patch_size": 8}', "--tiny_text_encoder",
    "--max_sequence_length", "64", "--shapes_dataset_size", "64", "--min_resolution", "32", "--max_resolution", "32",
    "--bucket_multiple", "8", "--train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
    "--validation_prompts", "a red circle on a blue background", "a green square on a white background",
    "--validation_num_inference_steps", "2",
]


@pytest.fixture
def train(monkeypatch):
    """Runs the script's `main` in this process with a fresh accelerate state."""
    from accelerate.state import AcceleratorState

    module = load_script("train_pixelhdm")

    def run(*argv):
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            return module.main([str(a) for a in argv])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    return run


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def test_training_writes_pipeline_samples_tensorboard_and_pushes(train, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    uploads = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kwargs):
        uploads[(repo_id, path_in_repo)] = sorted(p.name for p in Path(folder_path).iterdir())
        if path_in_repo is None:
            uploads["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    state = train(
        *TINY_RUN, "--output_dir", out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--use_ema",
        "--ema_decay", 0.5, "--validation_steps", 2, "--report_to", "tensorboard", "--push_to_hub",
        "--hub_model_id", "user/shapes", "--push_checkpoints_to_hub",
    )
    assert state.step == 4 and state.images_seen == 16
    pipe = PixelHDMPipeline.from_pretrained(out / "pipeline")
    assert {key: pipe.scheduler.config[key] for key in DEFAULT_SCHEDULER_CONFIG} == DEFAULT_SCHEDULER_CONFIG
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    for name in ("step-2.png", "step-4.png", "final.png"):
        assert (out / "samples" / name).exists()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "training_config.yaml").exists()
    # The pipeline holds the EMA weights, not the raw ones of the last checkpoint.
    raw = load_file(out / "checkpoint-4" / "model.safetensors")
    saved = pipe.transformer.state_dict()
    assert any(not torch.equal(raw[k], saved[k]) for k in raw)
    assert "model_index.json" in uploads[("user/shapes", None)] and "samples.png" in uploads[("user/shapes", None)]
    assert ("user/shapes", "checkpoints/checkpoint-4") in uploads
    assert "max_train_steps: 4" in uploads["card"] and "![samples](samples.png)" in uploads["card"]


def _run(out, steps, *extra, background=False):
    command = [sys.executable, str(SCRIPT), *TINY_RUN, "--output_dir", str(out), "--max_train_steps", str(steps),
               "--checkpointing_steps", "4", "--use_ema", "--ema_decay", "0.9", *map(str, extra)]
    if background:
        return subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(command, env=_env(), check=True, capture_output=True)


def test_a_run_killed_with_sigkill_resumes_bitwise_exactly(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    _run(reference, 16)
    process = _run(interrupted, 16, background=True)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-4").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "pipeline").exists(), "the run finished before it could be killed"
    _run(interrupted, 16, "--resume_from_checkpoint", "latest")
    for name in ("pipeline/transformer/diffusion_pytorch_model.safetensors", "checkpoint-16/model.safetensors"):
        expected, resumed = load_file(reference / name), load_file(interrupted / name)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name
    ema_expected = load_file(reference / "checkpoint-16" / "ema.safetensors")
    ema_resumed = load_file(interrupted / "checkpoint-16" / "ema.safetensors")
    assert ema_expected.keys() == ema_resumed.keys()
    assert all(torch.equal(ema_expected[k], ema_resumed[k]) for k in ema_expected)


def test_two_cpu_processes_with_torchrun(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(SCRIPT), *TINY_RUN, "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine=ddp world_size=2" in result.stderr
    assert (out / "pipeline" / "model_index.json").exists()
    assert (out / "checkpoint-2" / "random_states_1.pkl").exists()


def test_lora_training_on_a_folder_with_corrupt_files(train, tmp_path):
    from PIL import Image

    from pixel_diffusers.training_utils import shapes

    base = tmp_path / "base"
    make_tiny_pixelhdm_pipeline(seed=0).save_pretrained(base)
    data = tmp_path / "data"
    data.mkdir()
    for i, (shape, color, background) in enumerate(shapes.training_combinations()[:8]):
        shapes.render_shape(shape, color, background, 32, np.random.default_rng(i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(shapes.caption(shape, color, background))
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (32, 32)).save(data / "cut.png")
    (data / "cut.png").write_bytes((data / "cut.png").read_bytes()[:50])
    out = tmp_path / "lora"
    args = [a for a in TINY_RUN if a not in ("--tiny_text_encoder",)]
    preset = args.index("--preset")
    del args[preset : preset + 4]  # train the pretrained pipeline's transformer, not a fresh one
    shapes_size = args.index("--shapes_dataset_size")
    del args[shapes_size : shapes_size + 2]
    state = train(
        *args, "--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", out,
        "--max_train_steps", 2, "--lora_rank", 4, "--checkpointing_steps", 2, "--bucket_multiple", 16,
    )
    assert state.skipped_files == 2 and state.step == 2
    pipe = PixelHDMPipeline.from_pretrained(base)
    before = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out / "lora")
    after = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4


def test_repa_trains_and_saves_its_projector_until_early_stop(train, tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    dino = tmp_path / "dino"
    DINOv3ViTModel(
        DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                        num_register_tokens=4, image_size=32)
    ).save_pretrained(dino)
    out = tmp_path / "repa"
    train(*TINY_RUN, "--output_dir", out, "--max_train_steps", 3, "--checkpointing_steps", 1,
          "--repa_encoder_name_or_path", dino, "--repa_early_stop", 2)
    projector = [load_file(out / f"checkpoint-{s}" / "model_1.safetensors") for s in (1, 2, 3)]
    assert not torch.equal(projector[0]["projector.weight"], projector[1]["projector.weight"])
    assert torch.equal(projector[1]["projector.weight"], projector[2]["projector.weight"])  # stopped at step 2
    saved = load_file(out / "repa_projector.safetensors")
    assert saved["weight"].shape == (32, 256, 3, 3) and torch.equal(saved["weight"], projector[2]["projector.weight"])


def test_bad_config_keys_are_rejected(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("output_dir: x\nlearning_rat: 0.1\n")
    module = load_script("train_pixelhdm")
    with pytest.raises(ValueError, match="learning_rat"):
        module.main(["--config", str(config)])
