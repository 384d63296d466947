"""The properties diffusers' own pipeline and model tester mixins check, for all six pipelines and their models.

One parametrised test per property instead of a copy per pipeline. Properties of latent pipelines do not apply here
(no VAE: `enable_vae_slicing` / `enable_vae_tiling`, the latent scaling factor, VAE dtype upcasting); see
`test_vae_properties_do_not_apply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from diffusers.loaders.lora_base import LoraBaseMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from pixel_diffusers import testing


@dataclass
class Case:
    make: Callable[[], DiffusionPipeline]
    call: dict  # a fast call
    denoiser: str  # the component that denoises
    batch: tuple[str, list] | None  # (argument, two values) for batched calls; None: a batch_size pipeline
    text: tuple[str, ...] = ()  # the components encode_prompt needs
    no_text: str = "takes no prompt (class labels or unconditional): nothing to encode"
    images: Callable = field(default=lambda output: output.images)


CASES = {
    "pixelhdm": Case(testing.make_tiny_pixelhdm_pipeline,
                     dict(prompt="a red circle", height=32, width=32, num_inference_steps=2), "transformer",
                     ("prompt", ["a red circle", "a blue square"]), ("text_encoder", "tokenizer")),
    "pixel_sdxl": Case(testing.make_tiny_pixel_sdxl_pipeline,
                       dict(prompt="a red circle", height=32, width=32, num_inference_steps=2), "unet",
                       ("prompt", ["a red circle", "a blue square"]),
                       ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")),
    "jit": Case(testing.make_tiny_jit_pipeline, dict(class_labels=[1], num_inference_steps=2), "transformer",
                ("class_labels", [1, 2])),
    "pixeldlm": Case(testing.make_tiny_pixeldlm_pipeline, dict(prompt="1+1", num_inference_steps=2, guidance_scale=2.0),
                     "transformer", ("prompt", ["1+1", "2+3"]),
                     no_text="has no text encoder: a prompt is drawn as an image of the transformer's size"),
    "analytic": Case(testing.make_tiny_analytic_pipeline, dict(batch_size=1, num_inference_steps=2), "denoiser", None),
    "small": Case(testing.make_tiny_small_pipeline, dict(batch_size=1, num_inference_steps=2), "model", None,
                  images=lambda output: output[0]),
}
names = pytest.mark.parametrize("name", sorted(CASES))


def make(name):
    pipe = CASES[name].make()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(name, pipe, seed=0, **kwargs):
    case = CASES[name]
    kwargs = {**case.call, "output_type": "pt", "generator": torch.Generator().manual_seed(seed), **kwargs}
    return case.images(pipe(**kwargs))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each pipeline saved once (module scope: the dtype tests load it several times)."""
    folders = {}

    def get(name):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name)
            make(name).save_pretrained(folders[name])
        return folders[name]

    return get


@names
def test_save_load_round_trip(name, tmp_path):
    pipe = make(name)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(name, loaded), run(name, pipe), rtol=1e-5, atol=1e-5)


@names
def test_save_load_optional_components(name):
    pipe = make(name)
    assert not pipe._optional_components
    pytest.skip(f"{type(pipe).__name__} declares no optional components: every component takes part in sampling.")


@names
def test_dict_and_tuple_outputs_agree(name):
    pipe = make(name)
    as_tuple = pipe(**CASES[name].call, output_type="pt", generator=torch.Generator().manual_seed(0), return_dict=False)
    images = as_tuple[-1] if name == "pixeldlm" else as_tuple[0]  # PixelDLM: (texts, token_ids, images)
    torch.testing.assert_close(images, run(name, pipe), rtol=0, atol=0)


@names
def test_batched_and_single_calls_agree(name):
    case, pipe = CASES[name], make(name)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    if case.batch is None:  # unconditional: batch_size images
        batched = case.images(pipe(**{**case.call, "batch_size": 2}, output_type="pt", generator=generators))
    else:
        argument, values = case.batch
        batched = case.images(pipe(**{**case.call, argument: values}, output_type="pt", generator=generators))
    single = run(name, pipe, seed=0, **({} if case.batch is None else {case.batch[0]: case.batch[1][:1]}))
    assert batched.shape[0] == 2
    torch.testing.assert_close(batched[:1], single, rtol=1e-4, atol=1e-4)


@names
def test_num_images_per_prompt(name):
    case, pipe = CASES[name], make(name)
    if case.batch is None:
        pytest.skip(f"{type(pipe).__name__} is unconditional: `batch_size` is its image count, there is no prompt.")
    argument, values = case.batch
    images = case.images(pipe(**{**case.call, argument: values}, num_images_per_prompt=3, output_type="pt"))
    assert images.shape[0] == 6


def _assert_runs_in(pipe, name, dtypes: dict):
    for component, dtype in dtypes.items():
        assert getattr(pipe, component).dtype == dtype, component
    images = run(name, pipe)
    assert torch.isfinite(images).all()


@names
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_dtype_and_to_dtype(name, dtype, saved):
    cls, folder, denoiser = type(make(name)), saved(name), CASES[name].denoiser
    modules = [n for n, c in make(name).components.items() if isinstance(c, torch.nn.Module)]
    _assert_runs_in(cls.from_pretrained(folder, torch_dtype=dtype), name, {n: dtype for n in modules})
    per_component = cls.from_pretrained(folder, torch_dtype={denoiser: dtype, "default": torch.float32})
    _assert_runs_in(per_component, name, {n: dtype if n == denoiser else torch.float32 for n in modules})
    _assert_runs_in(make(name).to(dtype), name, {n: dtype for n in modules})


@names
def test_every_callback_tensor_input_and_num_timesteps(name):
    pipe = make(name)
    seen = []

    def callback(pipe, i, t, tensors):
        assert sorted(tensors) == sorted(pipe._callback_tensor_inputs)
        assert all(torch.is_tensor(v) for v in tensors.values())
        seen.append(i)
        if i == 0:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    images = run(name, pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    assert seen == list(range(pipe.num_timesteps)) and pipe.num_timesteps >= 2
    assert not torch.equal(images, run(name, pipe))  # the callback's latents were used
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(name, pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["not_a_tensor"])


@names
def test_encode_prompt_needs_only_the_text_components(name):
    case, pipe = CASES[name], make(name)
    if not case.text:
        pytest.skip(f"{type(pipe).__name__} {case.no_text}.")
    text_only = type(pipe)(**{n: c if n in case.text else None for n, c in pipe.components.items()})
    prompt = case.batch[1]
    full, alone = pipe.encode_prompt(prompt), text_only.encode_prompt(prompt)
    for a, b in zip(full if isinstance(full, tuple) else [full], alone if isinstance(alone, tuple) else [alone]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# Known gaps: accelerate's model-offload hook needs a parameter (the analytic denoisers hold buffers only); under
# sequential offload JiT/PixelDLM and the small models read weights outside a module call (the weight's dtype or
# device), where the hook has left them on the meta device.
OFFLOAD_GAPS = {("enable_model_cpu_offload", "analytic"), ("enable_sequential_cpu_offload", "jit"),
                ("enable_sequential_cpu_offload", "pixeldlm"), ("enable_sequential_cpu_offload", "small")}


@names
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_cpu_offload_gives_the_same_images(name, offload, request):
    if (offload, name) in OFFLOAD_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known offload gap, see OFFLOAD_GAPS"))
    reference = run(name, make(name))
    pipe = make(name)
    getattr(pipe, offload)(device="cpu")
    for _ in range(2):  # the hooks must survive a call
        torch.testing.assert_close(run(name, pipe), reference, rtol=0, atol=1e-6)


def test_vae_properties_do_not_apply():
    """Pixel-space pipelines have no VAE: diffusers' VAE slicing/tiling and latent-scaling tests do not apply."""
    for name in CASES:
        pipe = make(name)
        assert "vae" not in pipe.components and not hasattr(pipe, "enable_vae_slicing"), name


# ------------------------------------------------------------------------------------------------------- models

def _denoiser_call(name):
    """The denoiser of a tiny pipeline and the (args, kwargs) of its first call inside the pipeline."""
    pipe = make(name)
    model = getattr(pipe, CASES[name].denoiser)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    run(name, pipe)
    handle.remove()
    return model, calls[0]


def _forward(model, call):
    args, kwargs = call
    out = model(*args, **kwargs)
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


@names
@pytest.mark.parametrize("variant, shard", [(None, None), ("fp16", None), (None, "4KB")])
def test_model_save_load_variant_and_sharding(name, variant, shard, tmp_path):
    model, call = _denoiser_call(name)
    model.save_pretrained(tmp_path, variant=variant, **({"max_shard_size": shard} if shard else {}))
    files = sorted(p.name for p in tmp_path.iterdir())
    if variant:
        assert any(".fp16." in f for f in files), files
    if shard:
        assert any(f.endswith(".index.json") for f in files), files
    loaded = type(model).from_pretrained(tmp_path, variant=variant).eval()
    with torch.no_grad():
        torch.testing.assert_close(_forward(loaded, call), _forward(model, call), rtol=1e-5, atol=1e-5)


@names
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model, call = _denoiser_call(name)
    if not model._supports_gradient_checkpointing:
        with pytest.raises(ValueError, match="does not support gradient checkpointing"):
            model.enable_gradient_checkpointing()
        pytest.skip(f"{type(model).__name__} has no gradient checkpointing (small or closed-form model).")
    model.train()
    for module in model.modules():  # dropout off: the same forward twice
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    def gradients():
        model.zero_grad()
        _forward(model, call).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------- LoRA

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _with_lora(pipe, component, seed=0):
    from peft import LoraConfig

    model = getattr(pipe, component)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS), "a")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@names
def test_lora_scale_adapters_and_round_trip(name, tmp_path):
    from peft.utils import get_peft_model_state_dict

    case, pipe = CASES[name], make(name)
    if not isinstance(pipe, LoraBaseMixin):  # diffusers' base of every LoRA loader mixin
        pytest.skip(f"{type(pipe).__name__}'s denoiser has no attention projections to adapt (no LoRA).")
    base = run(name, pipe)
    model = _with_lora(pipe, case.denoiser)
    scale_key = "cross_attention_kwargs" if case.denoiser == "unet" else "attention_kwargs"
    adapted = run(name, pipe)
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(run(name, pipe, **{scale_key: {"scale": 0.0}}), base, rtol=0, atol=1e-5)
    pipe.set_adapters(["a"], [0.5])
    half = run(name, pipe)
    pipe.set_adapters(["a"], [1.0])
    torch.testing.assert_close(run(name, pipe, **{scale_key: {"scale": 0.5}}), half, rtol=1e-4, atol=1e-5)

    layers = {f"{case.denoiser}_lora_layers": get_peft_model_state_dict(model, adapter_name="a")}
    metadata = {f"{case.denoiser}_lora_adapter_metadata": model.peft_config["a"].to_dict()}
    type(pipe).save_lora_weights(tmp_path, **layers, **metadata)
    fresh = make(name)
    fresh.load_lora_weights(tmp_path, adapter_name="b")
    assert getattr(fresh, case.denoiser).peft_config["b"].lora_alpha == 8
    torch.testing.assert_close(run(name, fresh), adapted, rtol=1e-5, atol=1e-5)


def test_pixel_sdxl_text_encoder_lora_scale_is_honoured():
    """A text-encoder LoRA follows `cross_attention_kwargs["scale"]` and `set_adapters` like the U-Net's: scale 0 is
    the base model, and an adapter weight equals the same attention-kwargs scale."""
    from peft import LoraConfig

    name, pipe = "pixel_sdxl", make("pixel_sdxl")
    base = run(name, pipe)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), adapter_name="a")
        with torch.no_grad():
            for n, p in encoder.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.5)
    adapted = run(name, pipe)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(run(name, pipe, cross_attention_kwargs={"scale": 0.0}), base, rtol=0, atol=1e-6)
    pipe.set_adapters(["a"], [0.5])
    half = run(name, pipe)
    pipe.set_adapters(["a"], [1.0])
    torch.testing.assert_close(run(name, pipe, cross_attention_kwargs={"scale": 0.5}), half, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(name, pipe), adapted, rtol=0, atol=0)  # the scale is restored after the call


def test_text_encoder_lora_loads_with_the_installed_transformers_and_peft(tmp_path):
    """The breakage CI must catch: transformers' PEFT integration refusing the installed peft."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make("pixel_sdxl")
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    type(pipe).save_lora_weights(tmp_path, text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                                 unet_lora_layers=None)
    fresh = make("pixel_sdxl")
    fresh.load_lora_weights(tmp_path)
    assert any("lora_A" in n for n, _ in fresh.text_encoder.named_parameters())
