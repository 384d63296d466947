"""Property test of the six pipelines' arguments: every call with tiny components either returns finite output, or
raises a ValueError / TypeError that names an argument in backticks; never another exception type. Calls holding a
value marked invalid must raise (no invalid value is accepted), and calls of valid values only must not raise
anything but the named non-finite sampling error."""

import re

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixel_diffusers import (
    AnalyticDiffusionPipeline,
    ConditionalMLP,
    GradientEstimationScheduler,
    WienerDenoiser,
)
from pixel_diffusers.pipelines.analytic.pipeline_analytic import studio_scheduler
from pixel_diffusers.pipelines.small import SmallDiffusionPipeline
from pixel_diffusers.testing import (
    make_tiny_jit_pipeline,
    make_tiny_pixel_sdxl_pipeline,
    make_tiny_pixeldlm_pipeline,
    make_tiny_pixelhdm_pipeline,
)

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
INF, NAN = float("inf"), float("nan")
V, X = True, False  # valid, invalid


def callback_ok(pipe, i, t, kwargs):
    return {}


def callback_none(pipe, i, t, kwargs):
    return None


# Each argument: (value, valid). Latents are tokens turned into tensors once the batch size is known.
COMMON = {
    "num_inference_steps": [(1, V), (2, V), (0, X), (-3, X), (True, X), (2.0, X), ("3", X)],
    "generator": [(None, V), ("gen", V), (42, X), ("seed", X), ([None], X), ([], X)],
    "latents": [("none", V), ("good", V), ("float64", V), ("ndarray", X), ("meta", X), ("nan", X), ("shape", X)],
    "output_type": [("pt", V), ("np", V), ("jpeg", X), (None, X)],
}
GUIDED = {
    "guidance_scale": [(1.0, V), (3.0, V), (0.0, V), (1e30, V), (INF, X), (NAN, X), (-1.0, X), (True, X), ("2", X)],
    "num_images_per_prompt": [(1, V), (2, V), (0, X), (True, X), (1.5, X)],
    "sigmas": [(None, V), ([1.0, 0.5], V), ("abc", X), ([0.5, 1.0], X), ([NAN], X), ([], X), ([2.0], X)],
    "callback_on_step_end": [(None, V), (callback_ok, V), (callback_none, X)],
}


def sizes(side, patch):
    return [(side, V), (0, X), (float(side), X), (-side, X), (side + 1, X), (side + patch, V)]


def arguments(spec):
    """A strategy of (kwargs, invalid names): valid values for every argument but at most one, drawn invalid."""
    names = sorted(spec)

    def draw(bad):
        choices = [[c for c in spec[name] if c[1] == (name != bad)] or spec[name] for name in names]
        return st.tuples(*[st.sampled_from(c) for c in choices]).map(
            lambda picks: (
                {name: value for name, (value, _) in zip(names, picks)},
                {name for name, (_, valid) in zip(names, picks) if not valid},
            )
        )

    return st.sampled_from([None] * max(1, len(names) // 3) + names).flatmap(draw)


def resolve(kwargs, shape):
    """Turns the latents / generator tokens into objects; `shape` of one batch of latents."""
    kwargs = dict(kwargs)
    if kwargs.get("generator") == "gen":
        kwargs["generator"] = torch.Generator().manual_seed(0)
    token = kwargs.pop("latents", "none")
    good = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kwargs["latents"] = {
        "none": None,
        "good": good,
        "float64": good.double(),
        "ndarray": good.numpy(),
        "meta": torch.empty(shape, device="meta"),
        "nan": torch.full(shape, NAN),
        "shape": good[..., :-1],
    }[token]
    return kwargs


def finite(output) -> bool:
    if isinstance(output, torch.Tensor):
        return bool(torch.isfinite(output).all())
    if isinstance(output, np.ndarray):
        return bool(np.isfinite(output).all())
    if isinstance(output, (list, tuple)):
        return all(finite(item) for item in output)
    return isinstance(output, (PIL.Image.Image, str, int))


def check(pipe, kwargs, invalid, images):
    """Calls `pipe`; asserts the property (see the module docstring)."""
    try:
        output = pipe(**kwargs)
    except (ValueError, TypeError) as error:
        named = set(re.findall(r"`(\w+)`", str(error)))
        assert named, f"{type(error).__name__} names no argument: {error}"
        if invalid:
            assert named & invalid, f"invalid {sorted(invalid)} but the error names {sorted(named)}: {error}"
        else:
            assert "turned non-finite" in str(error), f"valid call {kwargs} raised: {error}"
        return
    assert not invalid, f"invalid values of {sorted(invalid)} were accepted: { {k: kwargs[k] for k in invalid} }"
    assert finite(images(output)), f"non-finite output for {kwargs}"


def batch_of(kwargs, prompts=1):
    n = kwargs.get("num_images_per_prompt", 1)
    return prompts * (n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1)


@pytest.fixture(scope="module")
def pixelhdm():
    pipe = make_tiny_pixelhdm_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


HDM_SPEC = {
    **COMMON,
    **GUIDED,
    "height": sizes(16, 16),
    "width": sizes(16, 16),
    "prompt": [("a red circle", V), (["a", "b"], V), (3, X), ([], X), ("embeds", V), ("embeds_nan", X),
               ("embeds_empty", X), ("embeds_long", X)],
    "guidance_rescale": [(0.0, V), (0.5, V), (NAN, X), (2.0, X)],
    "max_sequence_length": [(511, V), (64, V), (0, X), (True, X), (600, X)],
}


@SETTINGS
@given(arguments(HDM_SPEC))
def test_pixelhdm_arguments(pixelhdm, drawn):
    kwargs, invalid = drawn
    prompt = kwargs.pop("prompt")
    if isinstance(prompt, str) and prompt.startswith("embeds"):
        tokens = {"embeds": 4, "embeds_nan": 4, "embeds_empty": 0, "embeds_long": 600}[prompt]
        embeds = torch.randn(1, tokens, 256)
        if prompt == "embeds_nan":
            embeds[0, 0, 0] = NAN
        kwargs["prompt_embeds"] = embeds
        invalid = {"prompt_embeds" if name == "prompt" else name for name in invalid}
        if tokens > kwargs["max_sequence_length"] and prompt == "embeds":
            invalid = invalid | {"prompt_embeds"}
    else:
        kwargs["prompt"] = prompt
    prompts = 2 if isinstance(prompt, list) and prompt else 1
    h, w = (v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 16 for v in (kwargs["height"], kwargs["width"]))
    check(pixelhdm, resolve(kwargs, (batch_of(kwargs, prompts), 3, h, w)), invalid, lambda out: out.images)


@pytest.fixture(scope="module")
def pixel_sdxl():
    pipe = make_tiny_pixel_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_SPEC = {
    **COMMON,
    **GUIDED,
    "height": sizes(32, 16),
    "width": sizes(32, 16),
    "prompt": [("a red circle", V), ("embeds", V), ("embeds_short", V), ("embeds_nan", X), ("pooled_bad", X)],
    "original_size": [(None, V), ((32, 32), V), ((NAN, 32), X), ((-1, 32), X), ((INF, 32), X), ((32,), X)],
    "crops_coords_top_left": [((0, 0), V), ((4, 8), V), ((NAN, 0), X), ((-1, 0), X)],
    "target_size": [(None, V), ((64, 64), V), ((32, INF), X), ((0, 32), X)],
}


@SETTINGS
@given(arguments(SDXL_SPEC))
def test_pixel_sdxl_arguments(pixel_sdxl, drawn):
    kwargs, invalid = drawn
    prompt = kwargs.pop("prompt")
    if prompt.startswith(("embeds", "pooled")):
        tokens = 10 if prompt == "embeds_short" else 77
        kwargs["prompt_embeds"] = torch.randn(1, tokens, 64)
        kwargs["pooled_prompt_embeds"] = torch.randn(1, 31 if prompt == "pooled_bad" else 32)
        if prompt == "embeds_nan":
            kwargs["prompt_embeds"][0, 1, 2] = INF
        renamed = "pooled_prompt_embeds" if prompt == "pooled_bad" else "prompt_embeds"
        invalid = {renamed if name == "prompt" else name for name in invalid}
        guidance = kwargs["guidance_scale"]
        if prompt == "embeds_short" and not isinstance(guidance, (bool, str)) and guidance > 1:
            invalid = invalid | {"prompt_embeds"}  # beside the pipeline's 77-token negative branch
    else:
        kwargs["prompt"] = prompt
    h, w = (v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 32 for v in (kwargs["height"], kwargs["width"]))
    check(pixel_sdxl, resolve(kwargs, (batch_of(kwargs), 3, h, w)), invalid, lambda out: out.images)


@pytest.fixture(scope="module")
def jit():
    pipe = make_tiny_jit_pipeline(seed=0, id2label={0: "red", 1: "blue", 2: "green"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


JIT_SPEC = {
    **COMMON,
    **GUIDED,
    "height": [(16, V), (None, V), (16.0, X), (0, X), (32, X)],
    "class_labels": [(0, V), ([1, 2], V), ("red", V), (3, X), (-1, X), (0.7, X), (True, X), ([], X), ("purple", X)],
    "guidance_interval": [((0.1, 1.0), V), (None, V), ((0.9, 0.1), X), ((NAN, 1.0), X)],
}


@SETTINGS
@given(arguments(JIT_SPEC))
def test_jit_arguments(jit, drawn):
    kwargs, invalid = drawn
    labels = kwargs["class_labels"]
    prompts = len(labels) if isinstance(labels, list) and labels else 1
    check(jit, resolve(kwargs, (batch_of(kwargs, prompts), 3, 16, 16)), invalid, lambda out: out.images)


@pytest.fixture(scope="module")
def pixeldlm():
    pipe = make_tiny_pixeldlm_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


DLM_SPEC = {
    **COMMON,
    **{key: value for key, value in GUIDED.items() if key != "guidance_scale"},
    "guidance_scale": [(1.0, V), (2.0, V), (1e30, V), (NAN, X), (INF, X), (-2.0, X), (True, X)],
    "prompt": [("1+1=", V), (["a", "b"], V), (None, V), (3, X), ([], X)],
    "snap": [(False, V), (True, V), ("no", X), (1, X)],
}


@SETTINGS
@given(arguments(DLM_SPEC))
def test_pixeldlm_arguments(pixeldlm, drawn):
    kwargs, invalid = drawn
    prompt = kwargs["prompt"]
    if prompt is None and kwargs["guidance_scale"] != 1.0 and "guidance_scale" not in invalid:
        invalid = invalid | {"guidance_scale"}  # unconditional: nothing to guide towards
    prompts = 2 if isinstance(prompt, list) and prompt else 1
    check(pixeldlm, resolve(kwargs, (batch_of(kwargs, prompts), 3, 8, 8)), invalid,
          lambda out: [out.images, out.texts, out.token_ids])


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    pipe = SmallDiffusionPipeline(ConditionalMLP(num_classes=4).eval(), GradientEstimationScheduler(schedule="log_linear"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


SMALL_SPEC = {
    key: value for key, value in COMMON.items() if key != "output_type"
} | {
    "output_type": [("pt", V), ("np", V), ("pil", X), ("jpeg", X)],
    "batch_size": [(2, V), (0, X), (True, X), (2.0, X)],
    "class_labels": [([0, 3], V), (torch.tensor([1, 2]), V), ([0, 4], X), ([-1, 0], X), ([10**6, 0], X),
                     ([0.7, 1], X), (torch.tensor([0.0, 1.0]), X), ([0], X), (None, X)],
    "guidance_scale": [(0.0, V), (2.0, V), (NAN, X), (-1.0, X), ("1", X)],
}


@SETTINGS
@given(arguments(SMALL_SPEC))
def test_small_arguments(small, drawn):
    kwargs, invalid = drawn
    batch = kwargs["batch_size"] if type(kwargs["batch_size"]) is int and kwargs["batch_size"] > 0 else 2
    check(small, resolve(kwargs, (batch, 2)), invalid, lambda out: out.images)


@pytest.fixture(scope="module")
def analytic():
    images = torch.rand(24, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe = AnalyticDiffusionPipeline(denoiser=WienerDenoiser(sample_size=4).fit(images), scheduler=studio_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


ANALYTIC_SPEC = {
    **COMMON,
    "batch_size": [(2, V), (0, X), (True, X), (2.0, X)],
    "callback_on_step_end": GUIDED["callback_on_step_end"],
}


@SETTINGS
@given(arguments(ANALYTIC_SPEC))
def test_analytic_arguments(analytic, drawn):
    kwargs, invalid = drawn
    batch = kwargs["batch_size"] if type(kwargs["batch_size"]) is int and kwargs["batch_size"] > 0 else 2
    check(analytic, resolve(kwargs, (batch, 3, 4, 4)), invalid, lambda out: out.images)


def test_overflow_while_sampling_names_the_step(jit):
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) at step 0.*`guidance_scale`"):
        jit(class_labels=0, latents=torch.full((1, 3, 16, 16), 3e38), num_inference_steps=2, output_type="pt")


def test_sigmas_win_over_a_different_step_count(jit):
    latents = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = jit(class_labels=0, sigmas=[1.0, 0.5, 0.25], num_inference_steps=7, latents=latents, output_type="pt").images
    assert torch.equal(ours, jit(class_labels=0, sigmas=[1.0, 0.5, 0.25], latents=latents, output_type="pt").images)
