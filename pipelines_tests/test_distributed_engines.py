"""Every training script under DDP, FSDP2, ZeRO-2 and ZeRO-3 with two CPU processes on gloo.

accelerate engages FSDP and DeepSpeed only on GPUs, so the runs go through `pixel_diffusers.testing_distributed`,
which makes the real accelerate / torch / DeepSpeed code paths run on CPU processes; each run reports how much of
its parameters a process holds, and the tests check that FSDP2 and ZeRO-3 really shard them. One launch per engine
trains the tiny configs of all five scripts and a PixelHDM LoRA (sharing the process start-up), a second resumes
them all from their first checkpoint, and a third is killed with SIGKILL mid-run and resumed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs" / "accelerate"
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
STEPS = 3
TINY_JIT = {"sample_size": 16, "patch_size": 4, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 2,
            "bottleneck_dim": 8, "in_context_len": 2, "in_context_start": 1}
TINY_SDXL = {"layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1]}  # few modules: fewer collectives
TINY_DLM = {"sample_size": 8, "patch_size": 2, "hidden_size": 32, "num_layers": 1, "num_attention_heads": 2}
COMMON = ["--max_train_steps", str(STEPS), "--checkpointing_steps", "1", "--report_to", "none", "--seed", "0"]
SCRIPTS = {
    "pixelhdm": (
        "train_pixelhdm.py", "pipeline/transformer/diffusion_pytorch_model.safetensors",
        ["--preset", "for_testing", "--transformer_config", '{"patch_size": 8}', "--tiny_text_encoder",
         "--max_sequence_length", "32", "--shapes_dataset_size", "32", "--min_resolution", "32", "--max_resolution",
         "32", "--bucket_multiple", "8", "--train_batch_size", "2", "--learning_rate", "1e-3", "--use_ema",
         "--ema_decay", "0.9", "--validation_prompts", "a red circle", "--validation_num_inference_steps", "1",
         "--validation_steps", "2"],
    ),
    "pixelhdm_lora": (
        "train_pixelhdm.py", "lora/pytorch_lora_weights.safetensors",
        ["--preset", "for_testing", "--transformer_config", '{"patch_size": 8}', "--tiny_text_encoder",
         "--max_sequence_length", "32", "--shapes_dataset_size", "32", "--min_resolution", "32", "--max_resolution",
         "32", "--bucket_multiple", "8", "--train_batch_size", "2", "--learning_rate", "1e-2", "--lora_rank", "4",
         "--use_ema", "--validation_prompts", "a red circle", "--validation_num_inference_steps", "1"],
    ),
    "pixel_sdxl": (
        "train_pixel_sdxl.py", "pipeline/unet/diffusion_pytorch_model.safetensors",
        ["--preset", "for_testing", "--unet_config", json.dumps(TINY_SDXL), "--tiny_text_encoders",
         "--shapes_dataset_size", "16", "--min_resolution", "32", "--max_resolution", "32", "--train_batch_size", "2",
         "--learning_rate", "1e-3", "--use_ema",
         "--validation_prompts", "a red circle", "--validation_num_inference_steps", "1"],
    ),
    "jit": (
        "train_jit.py", "pipeline/transformer/diffusion_pytorch_model.safetensors",
        ["--shapes_dataset_size", "16", "--min_resolution", "16", "--max_resolution", "16", "--transformer_config",
         json.dumps(TINY_JIT), "--train_batch_size", "2", "--use_ema", "--validation_num_inference_steps", "1"],
    ),
    "pixeldlm": (
        "train_pixeldlm.py", "pipeline/transformer/diffusion_pytorch_model.safetensors",
        ["--synthetic_addition", "--tiny_tokenizer", "--transformer_config", json.dumps(TINY_DLM),
         "--train_batch_size", "2", "--learning_rate", "1e-3", "--use_ema", "--num_validation_items", "2",
         "--validation_num_inference_steps", "1"],
    ),
    "small": (
        "train_small.py", "pipeline/model/diffusion_pytorch_model.safetensors",
        ["--data", "swissroll", "--batch_size", "25", "--num_inference_steps", "2"],
    ),
}
SHARDING = {"ddp": "full", "zero2": "full", "fsdp2": "dtensor", "zero3": "zero3_partition"}

pytest.importorskip("deepspeed")


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", **extra}


def _launch(engine: str, runs: list[list[str]], port: int, processes: int = 2, report: Path | None = None,
            background: bool = False):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{engine}.yaml"),
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--main_process_port", str(port), "-m", "pixel_diffusers.testing_distributed"]
    for index, run in enumerate(runs):
        command += (["::"] if index else []) + run
    env = _env(**({"PIXEL_DIFFUSERS_ENGINE_REPORT": str(report)} if report else {}))
    if background:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _run(name: str, out: Path, *extra) -> list[str]:
    script, _, args = SCRIPTS[name]
    return [str(REPO / "training" / script), *args, *COMMON, "--output_dir", str(out), *extra]


_REFERENCES = {}


def reference(engine: str, tmp_path_factory) -> Path:
    """Every run of SCRIPTS trained for STEPS steps under `engine` (one launch, cached for the module)."""
    if engine not in _REFERENCES:
        root = tmp_path_factory.mktemp(f"reference-{engine}")
        (root / "report").mkdir()
        result = _launch(engine, [_run(name, root / name) for name in SCRIPTS], 29700 + ENGINES.index(engine),
                         report=root / "report")
        (root / "log.txt").write_text(result.stderr)
        _REFERENCES[engine] = root
    return _REFERENCES[engine]


def _weights(folder: Path, name: str) -> dict:
    return load_file(folder / name / SCRIPTS[name][1])


@pytest.mark.parametrize("engine", ENGINES)
def test_every_script_trains_sharded_as_asked_and_its_pipeline_loads(engine, tmp_path_factory):
    from diffusers import DiffusionPipeline

    import pixel_diffusers  # noqa: F401  (registers the pipelines with diffusers)

    root = reference(engine, tmp_path_factory)
    log = (root / "log.txt").read_text()
    expected = {"ddp": "engine=ddp", "fsdp2": "engine=fsdp2", "zero2": "engine=zero2", "zero3": "engine=zero3"}
    assert log.count(f"{expected[engine]} world_size=2 per_process_batch=") >= len(SCRIPTS)
    for index, name in enumerate(SCRIPTS):
        for rank in (0, 1):
            report = json.loads((root / "report" / f"{index}-rank{rank}.json").read_text())
            assert report["kinds"] == [SHARDING[engine]], (name, report)
            if engine in ("fsdp2", "zero3"):
                assert report["held"] < 0.75 * report["full"], (name, report)  # each process holds about half
            else:
                assert report["held"] == report["full"]
        weights = _weights(root, name)
        assert all(t.numel() > 0 and torch.isfinite(t).all() for t in weights.values()), name
        assert json.loads((root / name / f"checkpoint-{STEPS}" / "run.json").read_text())["engine"] == engine
        if "lora" in name:
            assert weights and all("lora_" in key for key in weights)
            assert any(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)  # trained away from zero
            _assert_adapter_loads(root / name / "lora", weights)
            continue
        pipe = DiffusionPipeline.from_pretrained(root / name / "pipeline")
        assert sum(p.numel() for p in pipe.components[SCRIPTS[name][1].split("/")[1]].parameters()) == sum(
            t.numel() for t in weights.values()
        )


def _assert_adapter_loads(folder: Path, weights: dict) -> None:
    """`load_lora_weights` puts the saved adapter, with its rank and alpha, into a pipeline of the run's shape."""
    from peft.utils import get_peft_model_state_dict

    from pixel_diffusers import PixelHDMPipeline, PixelHDMTransformer2DModel
    from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline

    transformer = PixelHDMTransformer2DModel.from_preset("for_testing", patch_size=8)
    pipe = PixelHDMPipeline(**{**make_tiny_pixelhdm_pipeline().components, "transformer": transformer})
    pipe.load_lora_weights(folder)
    adapter = pipe.get_active_adapters()[0]
    assert (transformer.peft_config[adapter].r, transformer.peft_config[adapter].lora_alpha) == (4, 4)
    loaded = get_peft_model_state_dict(transformer, adapter_name=adapter)
    assert len(loaded) == len(weights) and all(torch.equal(v, weights[f"transformer.{k}"]) for k, v in loaded.items())


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_final_pipelines_match_ddp(engine, tmp_path_factory):
    ddp, sharded = reference("ddp", tmp_path_factory), reference(engine, tmp_path_factory)
    for name in SCRIPTS:
        expected, actual = _weights(ddp, name), _weights(sharded, name)
        assert expected.keys() == actual.keys(), name
        # Adam's first steps move each weight by about +-lr whatever its gradient's size, so a weight whose gradient
        # is ~0 can move the other way under another reduction order; on these runs that stays below 0.15 lr. A sampling
        # forward whose weights leaked into training (FSDP2's root group, ZeRO-3's whole copies) moved them ~1 lr.
        lr = float(SCRIPTS[name][2][SCRIPTS[name][2].index("--learning_rate") + 1]) if "--learning_rate" in SCRIPTS[name][2] else 1e-4
        differences = torch.cat([(actual[k] - expected[k]).abs().flatten() for k in expected])
        assert differences.max() <= 0.5 * lr and differences.mean() <= 1e-6, (name, differences.max(), differences.mean())


@pytest.mark.parametrize("engine", ENGINES)
def test_every_script_resumes_bitwise_from_a_mid_run_checkpoint(engine, tmp_path_factory):
    root = reference(engine, tmp_path_factory)
    resumed = tmp_path_factory.mktemp(f"resumed-{engine}")
    for name in SCRIPTS:
        shutil.copytree(root / name / "checkpoint-1", resumed / name / "checkpoint-1")
    _launch(engine, [_run(name, resumed / name, "--resume_from_checkpoint", "latest") for name in SCRIPTS],
            29710 + ENGINES.index(engine))
    for name in SCRIPTS:
        expected, actual = _weights(root, name), _weights(resumed, name)
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
        ema = [load_file(r / name / f"checkpoint-{STEPS}" / "ema.safetensors") for r in (root, resumed)]
        assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0]), name


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_killed_with_sigkill_resumes_bitwise(engine, tmp_path_factory):
    root = reference(engine, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"killed-{engine}") / "pixelhdm"
    process = _launch(engine, [_run("pixelhdm", out)], 29720 + ENGINES.index(engine), background=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-1").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and every worker at once, as a crashed node
    subprocess.run(["pkill", "-9", "-f", str(out)], check=False)  # the workers, which run in sessions of their own
    process.wait()
    time.sleep(1)
    assert not (out / "pipeline").exists(), "the run finished before it could be killed"
    _launch(engine, [_run("pixelhdm", out, "--resume_from_checkpoint", "latest")], 29730 + ENGINES.index(engine))
    expected, actual = _weights(root, "pixelhdm"), _weights(out.parent, "pixelhdm")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not list(out.glob(".checkpoint-*.partial"))


def test_fsdp2_checkpoint_of_two_processes_resumes_on_one(tmp_path_factory):
    root = reference("fsdp2", tmp_path_factory)
    out = tmp_path_factory.mktemp("resharded") / "pixelhdm"
    shutil.copytree(root / "pixelhdm" / "checkpoint-1", out / "checkpoint-1")
    result = _launch("fsdp2", [_run("pixelhdm", out, "--resume_from_checkpoint", "latest")], 29740, processes=1)
    assert "Resuming on 1 processes a run saved on 2" in result.stderr
    resumed = load_file(out / "checkpoint-2" / "ema.safetensors")
    before = load_file(root / "pixelhdm" / "checkpoint-1" / "ema.safetensors")
    assert resumed.keys() == before.keys() and any(not torch.equal(resumed[k], before[k]) for k in before)
    assert json.loads((out / f"checkpoint-{STEPS}" / "run.json").read_text())["world_size"] == 1


def test_an_engine_that_cannot_engage_is_an_error(tmp_path):
    """Without the CPU launcher, FSDP on a CPU-only machine stops instead of training DDP."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP engages")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp2.yaml"),
               "--num_processes", "2", "--main_process_port", "29750",
               *_run("small", tmp_path / "out")]
    result = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "asked for fsdp2 but accelerate prepared" in result.stderr and "GPUs" in result.stderr
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_accelerate_launch_cpu_with_several_processes_is_an_error(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               *_run("small", tmp_path / "out")]
    result = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "starts only ONE process" in result.stderr
