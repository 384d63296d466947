"""benchmarks/bench_samplers.py: its oracle errors and its pipeline table (text and class-conditional) on tiny inputs."""

import math

import pytest
import torch

from pixel_diffusers.models.transformers.transformer_jit import JiTTransformer2DModel
from pixel_diffusers.pipelines.jit.pipeline_jit import JiTPipeline
from pixel_diffusers.schedulers import PixelFlowMatchScheduler
from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline
from pixel_diffusers.training_utils import shapes

from repo_scripts import ROOT, load_script


def test_oracle_table_counts_samples_that_change_component():
    bench = load_script("bench_samplers", "benchmarks")
    oracles = bench.make_oracles(32)
    configs = {"euler": lambda n, e: bench.ours("euler", n, sigma_max=1.0, sigma_min=1e-3),
               "unipc": lambda n, e: bench.ours("unipc", n, sigma_max=1.0, sigma_min=0.02, time_grid="karras", rho=3.0)}
    results = bench.oracle_table(oracles, configs, (2, 24))
    for name, rows in results.items():
        for label, row in rows.items():
            assert all(math.isfinite(entry["error"]) for entry in row.values())
            if name.startswith("gaussian"):  # one component: nothing can change it
                assert row[2]["wrong_component"] == row[24]["wrong_component"] == 0.0
    mixture = results["mixture8_2d"]
    assert mixture["euler"][2]["wrong_component"] > mixture["unipc"][24]["wrong_component"]
    assert mixture["unipc"][24]["error"] < 0.1 * mixture["euler"][2]["error"]


def test_pipeline_table_measures_text_and_class_conditional_pipelines(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # bench_samplers imports eval_shapes as a sibling
    bench = load_script("bench_samplers", "benchmarks")
    torch.manual_seed(0)
    jit = JiTTransformer2DModel(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=2,
                                bottleneck_dim=8, num_classes=len(shapes.class_names()), in_context_len=2,
                                in_context_start=1)
    JiTPipeline(jit, PixelFlowMatchScheduler(solver="heun")).save_pretrained(tmp_path / "jit")
    make_tiny_pixelhdm_pipeline(seed=0).save_pretrained(tmp_path / "hdm")
    for name, extra in (("jit", ["--sigma_max", "1", "--sigma_min", "0.02", "--reference_grid", "linear"]),
                        ("hdm", ["--calibrate", "dpmpp_2m log_snr", "--calibration_images", "1",
                                 "--calibration_trials", "25"])):
        table = bench.main(["--skip_oracles", "--pipeline", str(tmp_path / name), "--num_images", "2",
                            "--resolution", "16", "--pipeline_nfes", "2", *extra])["pipeline"]
        rows = {label: row for label, row in table.items() if isinstance(row, dict)}
        assert "heun linear (40 NFE)" in rows and ("dpmpp_2m log_snr" in rows) == (name == "hdm")
        assert all(math.isfinite(entry["distance"]) and 0.0 <= entry["class_accuracy"] <= 1.0
                   for row in rows.values() for entry in row.values())
    assert "dpmpp_2m log_snr calibrated@8" in rows
    with pytest.raises(ValueError, match="--calibrate must name one of"):  # JiT starts at 1: it has no log-SNR grid
        bench.main(["--skip_oracles", "--pipeline", str(tmp_path / "jit"), "--num_images", "1", "--resolution", "16",
                    "--sigma_max", "1", "--calibrate", "dpmpp_2m log_snr"])
