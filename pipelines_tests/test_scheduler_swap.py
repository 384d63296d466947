"""Swapping schedulers the diffusers way, `Scheduler.from_config(pipe.scheduler.config)`, in every flow pipeline."""

import io

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pixel_diffusers import JiTPipeline, PixelFlowMatchScheduler
from pixel_diffusers.testing import (
    make_tiny_jit_pipeline,
    make_tiny_pixel_sdxl_pipeline,
    make_tiny_pixeldlm_pipeline,
    make_tiny_pixelhdm_pipeline,
)

PIPELINES = ["pixelhdm", "pixel_sdxl", "jit", "pixeldlm"]


@pytest.fixture(scope="module")
def pipelines():
    """Each flow pipeline with the scheduler it is saved with, and the call arguments of a tiny run."""
    return {
        "pixelhdm": (make_tiny_pixelhdm_pipeline(seed=0), dict(prompt="a red circle", height=32, width=32, guidance_scale=3.0)),
        "pixel_sdxl": (make_tiny_pixel_sdxl_pipeline(seed=0), dict(prompt="a red circle", height=32, width=32, guidance_scale=5.0)),
        "jit": (make_tiny_jit_pipeline(seed=0), dict(class_labels=[1], guidance_scale=2.0)),
        "pixeldlm": (make_tiny_pixeldlm_pipeline(seed=0), dict(prompt="hi")),
    }


def run(pipelines, name, scheduler, **kwargs):
    pipe, call = pipelines[name]
    pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **call, **kwargs).images


def config(pipelines, name):
    return pipelines[name][0].scheduler.config


@pytest.mark.parametrize("name", PIPELINES)
def test_flow_match_euler_from_config_gives_our_euler_images(pipelines, name):
    sigmas = [1.0, 0.5, 0.1]
    theirs = run(pipelines, name, FlowMatchEulerDiscreteScheduler.from_config(config(pipelines, name)), sigmas=sigmas)
    ours = run(pipelines, name, PixelFlowMatchScheduler.from_config(config(pipelines, name), solver="euler"), sigmas=sigmas)
    assert (theirs - ours).abs().max() <= 1e-4


@pytest.mark.parametrize("name", PIPELINES)
def test_flow_match_heun_from_config_gives_our_heun_images(pipelines, name):
    heun = FlowMatchHeunDiscreteScheduler.from_config(config(pipelines, name))
    theirs = run(pipelines, name, heun, num_inference_steps=2)
    grid = np.linspace(heun.sigma_max, heun.sigma_min, 2)  # FlowMatchHeun's own grid (it takes no `sigmas`)
    # The flow the pipeline hands over, as FlowMatchHeun gets it (pixel-SDXL floors sigma at 0.05 in it, as upstream).
    ours = PixelFlowMatchScheduler.from_config(config(pipelines, name), solver="heun", prediction_type="flow_prediction")
    ours = run(pipelines, name, ours, sigmas=grid)
    assert (theirs - ours).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler_class", [UniPCMultistepScheduler, DPMSolverMultistepScheduler], ids=["unipc", "dpmsolver"])
@pytest.mark.parametrize("name", PIPELINES)
def test_multistep_from_config_gives_the_images_of_a_fresh_one(pipelines, name, scheduler_class):
    """`from_config` carries our `prediction_type` over (flow_prediction, or sample for pixel-SDXL: the same meaning
    there); the images equal those of the scheduler built fresh, whatever prediction type the pipeline converts into."""
    shift = config(pipelines, name).shift  # UniPC and DPM-Solver call it flow_shift
    swapped = scheduler_class.from_config(config(pipelines, name), use_flow_sigmas=True, flow_shift=shift)
    assert swapped.config.prediction_type == ("flow_prediction" if name != "pixel_sdxl" else "sample")
    images = run(pipelines, name, swapped, num_inference_steps=3)
    kind = "sample" if name != "pixel_sdxl" else "flow_prediction"  # the pipeline converts into the other one
    fresh = scheduler_class(use_flow_sigmas=True, prediction_type=kind, flow_shift=shift)
    assert (run(pipelines, name, fresh, num_inference_steps=3) - images).abs().max() <= 1e-4


@pytest.mark.parametrize("name", PIPELINES)
def test_round_trip_back_to_ours(pipelines, name):
    ours = config(pipelines, name)
    back = PixelFlowMatchScheduler.from_config(FlowMatchEulerDiscreteScheduler.from_config(ours).config)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {k: v for k, v in ours.items() if not k.startswith("_")}


def test_schedulers_without_a_flow_meaning_are_refused(pipelines):
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        run(pipelines, "jit", DDIMScheduler.from_config(config(pipelines, "jit")), num_inference_steps=2)
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        run(pipelines, "jit", UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="v_prediction"), num_inference_steps=2)


@pytest.mark.parametrize("scheduler", [PixelFlowMatchScheduler(solver="heun"), FlowMatchHeunDiscreteScheduler()], ids=["ours", "diffusers"])
def test_heun_progress_bar_counts_the_steps_asked_for(pipelines, scheduler):
    pipe, call = pipelines["jit"]
    pipe = JiTPipeline(pipe.transformer, scheduler)
    output = io.StringIO()
    pipe.set_progress_bar_config(file=output, ascii=True)
    pipe(num_inference_steps=3, **call)
    assert "3/3" in output.getvalue() and "5/5" not in output.getvalue()
