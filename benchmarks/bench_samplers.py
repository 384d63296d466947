"""Few-step sampling: error against model calls (NFE) for every solver and time grid, ours and diffusers'.

    python benchmarks/bench_samplers.py                        # exact-denoiser oracles only (about 4 minutes)
    OMP_NUM_THREADS=1 python benchmarks/bench_samplers.py --skip_oracles --pipeline checkpoints/shapes-pixelhdm --num_images 16
    python benchmarks/bench_samplers.py --skip_oracles --pipeline shapes-jit-annealed/pipeline --num_images 16 \
        --sigma_max 1 --sigma_min 0.02 --reference_grid linear

Oracles (the denoiser is exact, only the solver errs): a 64-D Gaussian with per-dimension spreads 0.05 to 1, and
mixtures of 8 isotropic Gaussians in 2-D and 16-D with unequal weights and component spread 0.05 (small against the
spread of the means). Every sampler starts from the same pure noise at sigma 1 (1024 samples); the reference is the
exact ODE endpoint (closed form for the Gaussian; for the mixtures a 600-step RK4 solve in float64, checked against
300 steps). Error = RMS distance to the reference over the RMS spread of the data, and the share of samples that end
in another component than their reference. diffusers' schedulers run on their own flow grids at the same NFE in the
same run; calibrated grids are tuned on 16 other samples.

On a pipeline (``--pipeline``, text-to-image or class-conditional): distance to a 200-NFE reference image from the
same noise (RMS in [-1, 1] pixels) and the shapes adherence of ``benchmarks/eval_shapes.py`` at 4, 6, 8, 12, 20 NFE,
against 40-NFE Heun. Prints tables, writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pixel_diffusers.schedulers import PixelFlowMatchScheduler
from pixel_diffusers.schedulers.scheduling_pixel_flow import calibrate_time_grid

NFES = (4, 6, 8, 12, 16, 24, 32)


# ----------------------------------------------------------------------------------------------------- oracles


class GaussianMixture:
    """Isotropic Gaussian components N(mu_k, s_k^2 I) with weights w_k; its exact denoiser E[x0 | x_sigma]."""

    def __init__(self, means, spreads, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.spreads = torch.as_tensor(spreads, dtype=torch.float64).reshape(len(self.means), -1)
        self.log_weights = torch.log(torch.as_tensor(weights, dtype=torch.float64) / sum(weights))
        mean = (self.log_weights.exp()[:, None] * self.means).sum(0)
        second = (self.log_weights.exp()[:, None] * (self.means**2 + self.spreads**2)).sum(0)
        self.data_std = float((second - mean**2).mean().sqrt())

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        a = 1.0 - sigma
        variance = a**2 * self.spreads**2 + sigma**2  # (K, D) per-component variance of x_sigma
        diff = x[:, None, :] - a * self.means[None]  # (B, K, D)
        log_p = self.log_weights - 0.5 * ((diff**2 / variance) + variance.log()).sum(-1)
        posterior = torch.softmax(log_p, dim=1)  # (B, K)
        x0_given_k = self.means[None] + (a * self.spreads**2 / variance)[None] * diff
        return (posterior[..., None] * x0_given_k).sum(1)


def gaussian_endpoint(oracle: GaussianMixture, noise: torch.Tensor) -> torch.Tensor:
    """Exact ODE endpoint from sigma 1 for a single Gaussian: x0 = mu + s * z."""
    return oracle.means[0] + oracle.spreads[0] * noise


def rk4_endpoint(oracle: GaussianMixture, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """High-accuracy ODE solve dx/dsigma = (x - D(x, sigma)) / sigma from 1 to 1e-5 (RK4 on a sigma^(1/7) grid),
    then the jump to D (its error is ~1e-5^2 / spread)."""
    sigmas = torch.linspace(1.0, 1e-5 ** (1 / 7), steps + 1, dtype=torch.float64) ** 7

    def flow(x, sigma):
        return (x - oracle.denoise(x, sigma)) / sigma

    x = noise.clone()
    for s, t in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        h = t - s
        k1 = flow(x, s)
        k2 = flow(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = flow(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = flow(x + h * k3, t)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return oracle.denoise(x, sigmas[-1].item())


def make_oracles(num_samples: int) -> dict:
    g = torch.Generator().manual_seed(0)
    dim = 64
    gaussian = GaussianMixture(
        (torch.rand(1, dim, generator=g) - 0.5), torch.linspace(0.05, 1.0, dim)[None], [1.0]
    )
    oracles = {"gaussian_64d": gaussian}
    for dim in (2, 16):
        means = torch.randn(8, dim, generator=g)
        weights = (torch.arange(8) + 1.0).tolist()  # 1:8 weight ratio between the smallest and largest component
        oracles[f"mixture8_{dim}d"] = GaussianMixture(means, torch.full((8, 1), 0.05), weights)
    out = {}
    for name, oracle in oracles.items():
        dim = oracle.means.shape[1]
        noise = torch.randn(num_samples, dim, generator=g, dtype=torch.float64)
        if name.startswith("gaussian"):
            reference, check = gaussian_endpoint(oracle, noise), None
        else:
            reference = rk4_endpoint(oracle, noise, 600)
            coarse = rk4_endpoint(oracle, noise, 300)
            check = float((reference - coarse).pow(2).mean().sqrt()) / oracle.data_std
        out[name] = {"oracle": oracle, "noise": noise, "reference": reference, "reference_check": check}
    return out


# ---------------------------------------------------------------------------------------------------- samplers


def steps_for(solver: str, nfe: int) -> int:
    """Grid points giving `nfe` model calls (heun and dpmpp_2s: 2 N - 1 calls on N points)."""
    return (nfe + 1) // 2 if solver in ("heun", "dpmpp_2s") else nfe


def ours(solver: str, nfe: int, **config) -> PixelFlowMatchScheduler:
    scheduler = PixelFlowMatchScheduler(solver=solver, prediction_type="sample", **config)
    scheduler.set_timesteps(steps_for(solver, nfe))
    return scheduler


def diffusers_scheduler(name: str, nfe: int):
    """diffusers' flow-matching counterparts on their own default flow grids, shift 1."""
    if name == "diffusers_euler":
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(nfe)
    elif name == "diffusers_heun":
        scheduler = FlowMatchHeunDiscreteScheduler()
        scheduler.set_timesteps((nfe + 1) // 2)
    elif name.startswith("diffusers_unipc"):
        scheduler = UniPCMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=3, solver_type="bh2",
            flow_shift=1.0,
        )
        scheduler.set_timesteps(nfe)
    else:
        order = int(name[-2])
        scheduler = DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
            solver_order=order, flow_shift=1.0,
        )
        scheduler.set_timesteps(nfe)
    return scheduler


def run_loop(scheduler, noise: torch.Tensor, denoise) -> tuple[torch.Tensor, int]:
    """Samples from `noise` at the scheduler's first sigma; returns the result and the number of model calls."""
    kind = getattr(scheduler.config, "prediction_type", "flow_prediction")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    x = noise.to(torch.float32)
    calls = 0
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        x0 = denoise(x.double(), sigma).to(torch.float32)
        calls += 1
        output = x0 if kind == "sample" else (x - x0) / sigma  # flow_prediction: noise - x0
        x = scheduler.step(output, t, x).prev_sample
    return x, calls


def oracle_table(oracles: dict, configs: dict, nfes) -> dict:
    """Per configuration and NFE: the relative RMS error and the share of samples that end nearest another component
    mean than their reference (a mixture's flow map is nearly discontinuous between components: such a sample costs
    about the distance between two means, whatever the solver's accuracy elsewhere)."""
    results = {}
    for name, entry in oracles.items():
        oracle = entry["oracle"]
        results[name] = {}
        reference_component = torch.cdist(entry["reference"], oracle.means).argmin(1)
        for label, make in configs.items():
            row = {}
            for nfe in nfes:
                scheduler = make(nfe, entry)
                out, calls = run_loop(scheduler, entry["noise"], oracle.denoise)
                assert calls <= nfe, (label, nfe, calls)  # heun, dpmpp_2s: 2 N - 1 calls
                error = (out.double() - entry["reference"]).pow(2).mean().sqrt() / oracle.data_std
                wrong = torch.cdist(out.double(), oracle.means).argmin(1) != reference_component
                row[nfe] = {"error": float(error), "wrong_component": float(wrong.double().mean())}
            results[name][label] = row
    return results


def first_nfe_below(row: dict, tolerance: float):
    return next((nfe for nfe, entry in sorted(row.items()) if entry["error"] <= tolerance), None)


def print_oracle_table(results: dict, nfes):
    for name, rows in results.items():
        print(f"\n{name}: relative error (% of samples in another component) at NFE "
              + " ".join(f"{n:>13d}" for n in nfes) + "   NFE to 1e-2 / 1e-3")
        for label, row in rows.items():
            cells = " ".join(f"{row[n]['error']:7.1e} ({100 * row[n]['wrong_component']:3.1f})" for n in nfes)
            print(f"  {label:34s} {cells}   {first_nfe_below(row, 1e-2)} / {first_nfe_below(row, 1e-3)}")


# ---------------------------------------------------------------------------------------------------- pipelines


def pipeline_denoiser(pipe, call_kwargs: dict):
    """``denoise(x, sigma) -> x0`` of a flow pipeline (guidance included): the pipeline itself, run for one step from
    `x` at `sigma` with a data-prediction scheduler, whose step into sigma 0 returns the model's x0 estimate."""
    probe = type(pipe)(**{**pipe.components, "scheduler": PixelFlowMatchScheduler(solver="euler",
                                                                                  prediction_type="sample")})
    probe.set_progress_bar_config(disable=True)

    def denoise(x, sigma):
        return probe(**call_kwargs, latents=x, sigmas=[sigma], output_type="latent").images

    return denoise


def pipeline_configs(base: dict, hi: float, lo: float) -> dict:
    """Heun on the pipeline's own grid (the earlier PixelHDM default, JiT's recipe), and each multistep solver on the
    pipeline's own grid and on the karras rho 0.5 and log-SNR grids over ``hi -> lo`` (log-SNR needs ``hi < 1``)."""
    grids = {"linear": {"time_grid": "linear"}, "karras 0.5": {"time_grid": "karras", "rho": 0.5}}
    if hi < 1.0:
        grids["log_snr"] = {"time_grid": "log_snr"}
    configs = {"heun linear": {**base, "solver": "heun", "time_grid": "linear"}}
    for solver in ("unipc", "dpmpp_3m", "dpmpp_2m"):
        for name, grid in grids.items():
            configs[f"{solver} {name}"] = {**base, "solver": solver, "sigma_max": hi, "sigma_min": lo, **grid}
    return configs


def pipeline_table(args) -> dict:
    from diffusers import DiffusionPipeline

    import pixel_diffusers  # noqa: F401 - registers our pipelines with diffusers
    from eval_shapes import conditioning, is_class_conditional, score
    from pixel_diffusers.training_utils import shapes

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    # from_config would drop the keys a loaded config lists in `_use_default_values`: keep the values only.
    base = {key: value for key, value in pipe.scheduler.config.items() if not key.startswith("_")}
    hi = base["sigma_max"] if args.sigma_max is None else args.sigma_max
    lo = base["sigma_min"] if args.sigma_min is None else args.sigma_min
    text_conditional = not is_class_conditional(pipe)
    combos = shapes.evaluation_prompts(args.num_images, seed=0, include_held_out=text_conditional)
    size = {"height": args.resolution, "width": args.resolution, "guidance_scale": args.guidance_scale}
    call = {**conditioning(pipe, combos), **size}
    noise = torch.randn(args.num_images, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
    noise = noise * getattr(pipe.transformer, "noise_scale", 1.0)  # JiT samples from N(0, noise_scale^2)

    def sample(config: dict, nfe: int) -> torch.Tensor:
        pipe.scheduler = PixelFlowMatchScheduler.from_config(config)
        steps = steps_for(config["solver"], nfe)
        return pipe(**call, latents=noise, num_inference_steps=steps, output_type="latent").images

    configs = {label: (config, args.pipeline_nfes) for label, config in pipeline_configs(base, hi, lo).items()}
    configs = {"heun linear (40 NFE)": (configs["heun linear"][0], (39,)), **configs}
    if args.calibrate and args.calibrate not in configs:
        raise ValueError(f"--calibrate must name one of this pipeline's configurations {sorted(configs)}, got "
                         f"{args.calibrate!r}.")
    started = time.perf_counter()
    grid = {"time_grid": "karras", "rho": 3.0} if args.reference_grid == "karras" else {"time_grid": "linear"}
    reference = sample({**base, "solver": "unipc", "sigma_max": hi, "sigma_min": lo, **grid}, 200)
    if args.calibrate:
        calibration_call = {**conditioning(pipe, combos[: args.calibration_images]), **size}
        calibrated = calibrate_time_grid(
            PixelFlowMatchScheduler.from_config(configs[args.calibrate][0]),
            pipeline_denoiser(pipe, calibration_call),
            noise[: args.calibration_images],
            num_inference_steps=8,
            reference_steps=100,
            max_trials=args.calibration_trials,
        )
        print(f"calibrated grid ({args.calibrate}, 8 NFE):", [round(v, 4) for v in calibrated.config.calibrated_sigmas])
        configs[f"{args.calibrate} calibrated@8"] = (dict(calibrated.config), args.pipeline_nfes)
    results = {"sigma_range": [hi, lo]}
    for label, (config, nfes) in configs.items():
        row = {}
        for nfe in nfes:
            out = sample(config, nfe)
            images = pipe.image_processor.postprocess(out, output_type="pil")
            adherence = score(images, combos, text_conditional)
            row[nfe] = {
                "distance": float((out - reference).pow(2).mean().sqrt()),
                "class_accuracy": adherence["class_accuracy"],
                "color_accuracy": adherence["color_accuracy"],
                "shape_accuracy": adherence["shape_accuracy"],
            }
        results[label] = row
        print(f"  {label:28s} " + "  ".join(
            f"{nfe}: {r['distance']:.4f} / {r['class_accuracy']:.3f}" for nfe, r in row.items()), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


# --------------------------------------------------------------------------------------------------------- main


def oracle_configs() -> dict:
    """Our solvers and grids (starting at sigma 1) and diffusers' schedulers, each a (nfe, oracle) -> scheduler."""
    configs = {
        "heun linear 1->1e-3": lambda n, e: ours("heun", n, sigma_max=1.0, sigma_min=1e-3),
        "dpmpp_2m linear 1->1e-3": lambda n, e: ours("dpmpp_2m", n, sigma_max=1.0, sigma_min=1e-3),
    }
    for solver in ("dpmpp_3m", "unipc"):
        configs[f"{solver} linear 1->0.05"] = lambda n, e, s=solver: ours(s, n, sigma_max=1.0)
        configs[f"{solver} karras 1.5 1->0.1"] = lambda n, e, s=solver: ours(
            s, n, sigma_max=1.0, sigma_min=0.1, time_grid="karras", rho=1.5)
        configs[f"{solver} karras 3 1->0.02"] = lambda n, e, s=solver: ours(
            s, n, sigma_max=1.0, sigma_min=0.02, time_grid="karras", rho=3.0)
        configs[f"{solver} log_snr 0.999->0.02"] = lambda n, e, s=solver: ours(
            s, n, sigma_max=0.999, sigma_min=0.02, time_grid="log_snr")
    for name in ("diffusers_euler", "diffusers_heun", "diffusers_dpm2m", "diffusers_dpm3m", "diffusers_unipc"):
        configs[name] = lambda n, e, name=name: diffusers_scheduler(name, n)
    return configs


def calibrated_config(solver: str, nfe: int):
    """Our `solver` on a grid calibrated to the oracle at `nfe` (16 calibration samples, other than the scored ones)."""
    cache = {}

    def make(n, entry):
        if id(entry) not in cache:
            start = PixelFlowMatchScheduler(solver=solver, prediction_type="sample", sigma_max=1.0, sigma_min=1e-3)
            noise = torch.randn(16, entry["noise"].shape[1], generator=torch.Generator().manual_seed(1))
            cache[id(entry)] = calibrate_time_grid(
                start, lambda x, s: entry["oracle"].denoise(x.double(), s).float(), noise, steps_for(solver, nfe),
            )
        scheduler = PixelFlowMatchScheduler.from_config(cache[id(entry)].config)
        scheduler.set_timesteps(steps_for(solver, n))
        return scheduler

    return make


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_samples", type=int, default=1024, help="Oracle samples per configuration.")
    parser.add_argument("--pipeline", default=None, help="Also measure this saved flow pipeline (shapes prompts).")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--pipeline_nfes", type=int, nargs="+", default=[4, 6, 8, 12, 20])
    parser.add_argument("--sigma_max", type=float, default=None, help="First sigma of the karras and log-SNR grids on "
                        "the pipeline (default: its scheduler's sigma_max; JiT starts at 1).")
    parser.add_argument("--sigma_min", type=float, default=None, help="Their last sigma (default: the scheduler's).")
    parser.add_argument("--reference_grid", choices=("karras", "linear"), default="karras", help="Grid of the 200-NFE "
                        "UniPC reference: karras rho 3 over the range, or the pipeline's own (JiT's 1 -> 1/N holds the "
                        "sigma 0.9 where its guidance interval starts, a jump in the flow the karras grid steps over).")
    parser.add_argument("--calibrate", default=None, help="Also calibrate this configuration's grid (e.g. "
                        "'dpmpp_2m log_snr') to the pipeline at 8 NFE.")
    parser.add_argument("--calibration_images", type=int, default=8)
    parser.add_argument("--calibration_trials", type=int, default=600)
    parser.add_argument("--skip_oracles", action="store_true")
    args = parser.parse_args(argv)

    results = {"nfes": list(NFES)}
    if not args.skip_oracles:
        oracles = make_oracles(args.num_samples)
        results["reference_check"] = {name: entry["reference_check"] for name, entry in oracles.items()}
        configs = oracle_configs()
        for solver, nfe in (("dpmpp_3m", 8), ("unipc", 8), ("unipc", 16)):
            configs[f"{solver} calibrated@{nfe}"] = calibrated_config(solver, nfe)
        results["oracles"] = oracle_table(oracles, configs, NFES)
        print_oracle_table(results["oracles"], NFES)
    if args.pipeline:
        print(f"\n{args.pipeline}: RMS distance to a 200-NFE UniPC reference / class adherence, by NFE")
        results["pipeline"] = {"name": args.pipeline, **pipeline_table(args)}
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "bench_samplers.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
