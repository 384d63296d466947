"""Tests of PixelFlowMatchScheduler against closed-form answers and diffusers' own flow-matching schedulers.

Closed forms: point-mass data (x0 = c for every input) makes every flow line straight, so every solver must be
exact; Gaussian data N(mu, s^2) per pixel has the exact denoiser
E[x0 | x] = mu + (1 - sigma) s^2 / ((1 - sigma)^2 s^2 + sigma^2) * (x - (1 - sigma) mu)
and the exact ODE solution x(sigma) = (1 - sigma) mu + sqrt((1 - sigma)^2 s^2 + sigma^2) * z with z fixed.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pixel_diffusers.schedulers import PixelFlowMatchScheduler, PixelFlowMatchSchedulerOutput
from pixel_diffusers.schedulers.scheduling_pixel_flow import calibrate_time_grid

SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "unipc"]
PREDICTION_TYPES = ["flow_prediction", "sample", "velocity", "epsilon"]
GRIDS = {
    "linear": {},
    "karras": {"time_grid": "karras", "rho": 3.0},
    "log_snr": {"time_grid": "log_snr"},
    "calibrated": {"time_grid": "calibrated", "calibrated_sigmas": [0.9, 0.6, 0.2, 0.03]},
}
SHAPE = (2, 3, 8, 8)


def model_output(kind, x, sigma, x0):
    """What a model of `kind` returns at (x, sigma) when its x0 estimate is `x0` (noise estimate implied by x)."""
    noise = (x - (1 - sigma) * x0) / sigma
    return {"sample": x0, "flow_prediction": noise - x0, "velocity": x0 - noise, "epsilon": noise}[kind]


def sample_loop(scheduler, x, denoiser, on_step=None):
    """A plain pipeline loop: one model call per entry of `timesteps`."""
    scheduler.set_begin_index(0)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].item()
        out = model_output(scheduler.config.prediction_type, x, sigma, denoiser(x, sigma))
        result = scheduler.step(out, t, x)
        x = result.prev_sample
        if on_step is not None:
            on_step(i, result)
    return x


def noise(seed=1, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Gaussian:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(SHAPE, generator=g) - 0.5
        self.s = 0.1 + 0.7 * torch.rand(SHAPE, generator=g)

    def denoise(self, x, sigma):
        a = 1 - sigma
        return self.mu + a * self.s**2 / (a**2 * self.s**2 + sigma**2) * (x - a * self.mu)

    def radius(self, sigma):
        return torch.sqrt((1 - sigma) ** 2 * self.s**2 + sigma**2)

    def flow(self, x, sigma_from, sigma_to):
        """Exact ODE solution: carry x from sigma_from to sigma_to."""
        z = (x - (1 - sigma_from) * self.mu) / self.radius(sigma_from)
        return (1 - sigma_to) * self.mu + self.radius(sigma_to) * z


def gaussian_error(solver, num_steps=None, sigmas=None, data=None):
    """RMS error of the final sample against the exact answer on the same grid.

    Every solver ends with the exact jump from the last sigma to the x0 estimate, so the reference is the exact ODE
    solution down to the last sigma followed by that same jump: what remains is the solver's integration error.
    """
    data = data or Gaussian()
    scheduler = PixelFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(num_steps, sigmas=sigmas)
    x = noise()
    first, last = scheduler.sigmas[0].item(), scheduler.sigmas[-2].item()
    reference = data.denoise(data.flow(x, first, last), last)
    out = sample_loop(scheduler, x, data.denoise)
    assert torch.isfinite(out).all()
    return (out - reference).pow(2).mean().sqrt().item()


# ------------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_point_mass_is_exact(solver, prediction_type, grid):
    c = torch.rand(SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    scheduler = PixelFlowMatchScheduler(solver=solver, prediction_type=prediction_type, **GRIDS[grid])
    scheduler.set_timesteps(6)
    x = noise()  # pure N(0, I), treated as the sample at sigma_max
    sigma0 = scheduler.sigmas[0].item()
    line_noise = (x - (1 - sigma0) * c) / sigma0  # the straight flow line through the start

    def check(i, result):
        sigma_next = scheduler.sigmas[i + 1].item()
        on_line = (1 - sigma_next) * c + sigma_next * line_noise
        assert (result.prev_sample - on_line).abs().max() <= 1e-5
        assert (result.pred_original_sample - c).abs().max() <= 1e-5

    out = sample_loop(scheduler, x, lambda x, sigma: c, on_step=check)
    assert (out - c).abs().max().item() <= 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
def test_point_mass_from_sigma_one(solver):
    """Flux-style grid starting at sigma = 1 (alpha = 0, lambda = -inf): no NaN, still exact."""
    c = torch.full(SHAPE, 0.3)
    scheduler = PixelFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 5))
    out = sample_loop(scheduler, noise(), lambda x, sigma: c)
    assert (out - c).abs().max().item() <= 1e-5
    scheduler = PixelFlowMatchScheduler(solver=solver, sigma_max=1.0, sigma_min=0.002, time_grid="karras")
    scheduler.set_timesteps(7)
    assert scheduler.sigmas[0].item() == 1.0
    out = sample_loop(scheduler, noise(), lambda x, sigma: c)
    assert (out - c).abs().max().item() <= 1e-5


def test_gaussian_second_order_solvers_beat_euler():
    errors = {solver: gaussian_error(solver, num_steps=10) for solver in SOLVERS}
    print("10-step Gaussian RMS errors (default grid 0.95 -> 0.05 -> 0):", errors)
    # Measured: euler 6.7e-2, heun 4.2e-3, dpmpp_2m 2.4e-2, dpmpp_2s 1.1e-2.
    assert errors["heun"] <= 0.3 * errors["euler"]
    assert errors["dpmpp_2s"] <= 0.3 * errors["euler"]
    # dpmpp_2m makes half the model calls of heun/2s and its first step is first order over a long lambda interval.
    assert errors["dpmpp_2m"] <= 0.45 * errors["euler"]


def test_gaussian_from_sigma_one_beats_euler():
    sigmas = np.linspace(1.0, 0.1, 10)
    errors = {solver: gaussian_error(solver, sigmas=sigmas) for solver in SOLVERS}
    print("10-step Gaussian RMS errors (grid 1.0 -> 0.1 -> 0):", errors)
    for solver in ["heun", "dpmpp_2m", "dpmpp_2s"]:
        assert errors[solver] <= 0.3 * errors["euler"], solver


@pytest.mark.parametrize(
    "solver,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpmpp_2s", 2), ("dpmpp_3m", 2.6), ("unipc", 3)]
)
def test_gaussian_convergence_order(solver, order):
    """Measured order log2(e_N / e_2N) on the default grid at N = 20 -> 40 -> 80, within 0.2 of nominal.

    Measured: euler 1.02/1.01, heun 2.03/2.01, dpmpp_2m 2.06/2.07, dpmpp_2s 2.04/2.02, dpmpp_3m 2.69/2.53, unipc
    2.85/2.81. dpmpp_3m is third order in its interior steps, but its first step is first order (no history yet, as
    in diffusers), which caps the global order at 2 as N grows; 2.6 is what it shows over this range.
    """
    errors = [gaussian_error(solver, num_steps=n) for n in (20, 40, 80)]
    rates = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    print(solver, "errors at 20/40/80 steps:", errors, "orders:", rates)
    assert all(abs(rate - order) <= 0.2 for rate in rates), rates


# ------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize(
    "config,mu",
    [
        ({}, None),
        ({"shift": 3.0}, None),
        ({"use_dynamic_shifting": True}, 0.8),
        ({"use_dynamic_shifting": True}, 1.15),
    ],
)
def test_euler_matches_diffusers_flow_match_euler(config, mu):
    sigmas = np.linspace(1.0, 1 / 12, 12)
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    ours = PixelFlowMatchScheduler(solver="euler", prediction_type="flow_prediction", **config)
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)

    data = Gaussian()
    x = y = noise()
    for i, t in enumerate(ours.timesteps):
        sigma = ours.sigmas[i].item()
        x = ours.step(model_output("flow_prediction", x, sigma, data.denoise(x, sigma)), t, x).prev_sample
        y = ref.step(model_output("flow_prediction", y, sigma, data.denoise(y, sigma)), t, y).prev_sample
        assert (x - y).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_matches_diffusers_flow_match_heun(shift):
    ref = FlowMatchHeunDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    ours = PixelFlowMatchScheduler(solver="heun", prediction_type="flow_prediction")
    ours.set_timesteps(sigmas=torch.unique_consecutive(ref.sigmas[:-1]))
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)

    data = Gaussian()
    x = y = noise()
    for i, t in enumerate(ours.timesteps):
        sigma = ours.sigmas[i].item()
        x = ours.step(model_output("flow_prediction", x, sigma, data.denoise(x, sigma)), t, x).prev_sample
        y = ref.step(model_output("flow_prediction", y, sigma, data.denoise(y, sigma)), t, y).prev_sample
        # diffusers' Heun goes through x0 and back ((x - x0) / sigma), which loses digits at its sigma_min = 1e-3.
        assert (x - y).abs().max().item() <= 5e-5


@pytest.mark.parametrize(
    "sigmas", [np.linspace(0.95, 0.05, 10), np.linspace(1.0, 0.1, 10), np.linspace(0.99, 0.02, 30)]
)
def test_dpmpp_2m_matches_diffusers_dpm_solver_plus_plus(sigmas):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, flow sigmas) run on our grid."""
    ours = PixelFlowMatchScheduler(solver="dpmpp_2m", prediction_type="flow_prediction")
    ours.set_timesteps(sigmas=sigmas)
    ref = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2
    )
    ref.set_timesteps(len(sigmas))
    run_against(ours, ref, 5e-6)


def run_against(ours, ref, tolerance):
    """Steps ours and a diffusers scheduler (moved onto our sigmas) side by side on the Gaussian oracle."""
    ref.sigmas, ref.timesteps = ours.sigmas.clone(), ours.timesteps.clone()  # it takes no `sigmas` argument
    ref.set_begin_index(0)
    data = Gaussian()
    x = y = noise()
    for i, t in enumerate(ours.timesteps):
        sigma = ours.sigmas[i].item()
        x = ours.step(model_output("flow_prediction", x, sigma, data.denoise(x, sigma)), t, x).prev_sample
        y = ref.step(model_output("flow_prediction", y, sigma, data.denoise(y, sigma)), t, y).prev_sample
        assert (x - y).abs().max().item() <= tolerance, i


@pytest.mark.parametrize(
    "grid,num_steps", [({}, 10), ({"time_grid": "karras", "rho": 3.0}, 14), ({"time_grid": "log_snr"}, 4)]
)
@pytest.mark.parametrize("solver", ["dpmpp_3m", "unipc"])
def test_third_order_solvers_match_diffusers(solver, grid, num_steps):
    """dpmpp_3m = DPMSolverMultistepScheduler(dpmsolver++, order 3), unipc = UniPCMultistepScheduler(bh2, order 3),
    both with flow sigmas, on our grid. diffusers lowers the order of the second-to-last step only below 15 steps
    (`lower_order_final`); we always do, so the grids here have fewer than 15 steps."""
    ours = PixelFlowMatchScheduler(solver=solver, prediction_type="flow_prediction", **grid)
    ours.set_timesteps(num_steps)
    common = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "solver_order": 3}
    if solver == "dpmpp_3m":
        ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    else:
        ref = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
    ref.set_timesteps(num_steps)
    run_against(ours, ref, 2e-6)


def test_multistep_order_ramps_up_and_down():
    """Order 1 first, then 2, then 3; the last steps drop to the steps left (the jump into 0 is first order)."""
    scheduler = PixelFlowMatchScheduler(solver="dpmpp_3m", prediction_type="sample")
    scheduler.set_timesteps(6)
    orders = []
    x = noise()
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros(SHAPE), t, x).prev_sample
        orders.append(len(scheduler._last_step[1]))
    assert orders == [1, 2, 3, 3, 2, 1]


@pytest.mark.parametrize("num_steps", [1, 2, 10])
def test_time_grids(num_steps):
    u = np.linspace(0, 1, num_steps)

    def grid(**config):
        scheduler = PixelFlowMatchScheduler(solver="unipc", **config)
        scheduler.set_timesteps(num_steps)
        return scheduler.sigmas[:-1].double().numpy()

    karras = grid(time_grid="karras", rho=5.0, sigma_max=1.0, sigma_min=0.002)
    np.testing.assert_allclose(karras, (1 + u * (0.002**0.2 - 1)) ** 5, rtol=1e-6)
    np.testing.assert_allclose(grid(time_grid="karras", rho=1.0), grid(), rtol=1e-6)
    log_snr = grid(time_grid="log_snr", sigma_max=0.9, sigma_min=0.01)
    lam = np.log(1 - log_snr) - np.log(log_snr)
    np.testing.assert_allclose(lam, np.log(1 / 9) + u * (np.log(99) - np.log(1 / 9)), atol=1e-5)
    knots = [1.0, 0.5, 0.1, 0.01]
    calibrated = grid(time_grid="calibrated", calibrated_sigmas=knots)
    assert calibrated[0] == 1.0 and calibrated[-1] == pytest.approx(0.01 if num_steps > 1 else 1.0)
    if num_steps == 10:  # every third point is a knot; between knots the grid is linear in log(sigma)
        np.testing.assert_allclose(calibrated[::3], knots, rtol=1e-6)
        np.testing.assert_allclose(calibrated[1:3], [0.5 ** (1 / 3), 0.5 ** (2 / 3)], rtol=1e-6)
    np.testing.assert_allclose(grid(time_grid="karras", shift=3.0), 3 * (s := grid(time_grid="karras")) / (1 + 2 * s),
                               rtol=1e-5)


def test_calibrate_time_grid_beats_its_start_and_is_saved(tmp_path):
    data = Gaussian()
    start = PixelFlowMatchScheduler(solver="dpmpp_3m", prediction_type="velocity", sigma_max=1.0, sigma_min=0.01)
    calibrated = calibrate_time_grid(start, data.denoise, noise(9), num_inference_steps=5, reference_steps=40,
                                     max_trials=150)
    assert calibrated.config.time_grid == "calibrated" and len(calibrated.config.calibrated_sigmas) == 5
    assert calibrated.config.calibrated_sigmas[0] == 1.0 and calibrated.config.prediction_type == "velocity"

    def error(scheduler):  # on other noise than the calibration's, against the exact ODE endpoint
        scheduler.set_timesteps(5)
        x = noise(3)
        last = scheduler.sigmas[-2].item()
        reference = data.mu + data.s * (x - 0 * data.mu)  # x0 = mu + s z from z at sigma 1
        return (sample_loop(scheduler, x, data.denoise) - reference).pow(2).mean().sqrt().item(), last

    before, _ = error(start)
    after, _ = error(calibrated)
    print("5-step errors before/after calibration:", before, after)
    assert after < 0.1 * before
    calibrated.save_pretrained(tmp_path)
    loaded = PixelFlowMatchScheduler.from_pretrained(tmp_path)
    assert loaded.config.calibrated_sigmas == calibrated.config.calibrated_sigmas
    assert error(loaded)[0] == after


def test_calibrate_time_grid_moves_a_grid_that_ends_on_sigma_min():
    # PixelHDM's default grid ends exactly on sigma_min, the bound of the search: the search must still move it.
    data = Gaussian(seed=3)
    start = PixelFlowMatchScheduler(solver="dpmpp_2m", time_grid="log_snr")
    calibrated = calibrate_time_grid(start, data.denoise, noise(4), num_inference_steps=6, reference_steps=40,
                                     max_trials=120)
    knots = calibrated.config.calibrated_sigmas
    start.set_timesteps(6)
    assert knots[0] == pytest.approx(0.95) and knots[-1] >= 0.05 and all(np.diff(knots) < 0)
    assert not np.allclose(knots, start.sigmas[:-1].tolist(), atol=1e-4)

    def error(scheduler):  # on other noise, against the same reference solve as the calibration's
        reference = PixelFlowMatchScheduler(solver="unipc", time_grid="karras")
        reference.set_timesteps(200)
        x = noise(5)
        target = sample_loop(reference, x, data.denoise)
        scheduler.set_timesteps(6)
        return (sample_loop(scheduler, x, data.denoise) - target).pow(2).mean().sqrt().item()

    assert error(calibrated) < 0.5 * error(start)


def test_dpmpp_2s_midpoints_are_lambda_midpoints():
    scheduler = PixelFlowMatchScheduler(solver="dpmpp_2s", shift=2.0)
    scheduler.set_timesteps(7)
    sigmas = scheduler.sigmas.double()
    lam = torch.log(1 - sigmas[:-1]) - torch.log(sigmas[:-1])
    starts, mids = lam[0::2], lam[1::2]
    torch.testing.assert_close(mids, 0.5 * (starts[:-1] + starts[1:]), atol=1e-5, rtol=0)


def test_scale_noise_matches_diffusers():
    sigmas = np.linspace(0.95, 0.05, 6)
    ours = PixelFlowMatchScheduler()
    ours.set_timesteps(sigmas=sigmas)
    ref = FlowMatchEulerDiscreteScheduler()
    ref.set_timesteps(sigmas=sigmas)
    x, n = noise(3), noise(4)
    t = ours.timesteps[[1, 4]]
    torch.testing.assert_close(ours.scale_noise(x, t, n), ref.scale_noise(x, t, n), rtol=0, atol=1e-6)
    ours.set_begin_index(2)
    expected = ours.sigmas[2] * n + (1 - ours.sigmas[2]) * x
    torch.testing.assert_close(ours.scale_noise(x, ours.timesteps[2:3], n), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("num_steps", [1, 2, 7])
@pytest.mark.parametrize("solver", SOLVERS)
def test_schedule_invariants(solver, num_steps):
    scheduler = PixelFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(num_steps, device="cpu")
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    two_calls = solver in ("heun", "dpmpp_2s")
    assert scheduler.order == (2 if two_calls else 1)
    assert scheduler.init_noise_sigma == 1.0
    assert scheduler.num_inference_steps == num_steps
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert len(sigmas) == len(timesteps) + 1
    assert len(timesteps) == (2 * num_steps - 1 if two_calls else num_steps)
    assert torch.equal(timesteps, sigmas[:-1] * 1000)
    assert sigmas[-1].item() == 0.0 and sigmas[0].item() == pytest.approx(0.95)
    assert (sigmas[:-1] > 0).all() and (sigmas[:-1] <= 1).all()
    assert (sigmas[1:] <= sigmas[:-1]).all()
    if solver != "heun":  # heun repeats each interior sigma (predictor end, corrector start)
        assert (sigmas[1:] < sigmas[:-1]).all()
    if num_steps > 1:
        assert sigmas[-2].item() == pytest.approx(0.05)
    x = torch.ones(SHAPE)
    assert scheduler.scale_model_input(x, timesteps[0]) is x
    assert len(scheduler) == 1000


def test_static_shift_of_default_grid():
    scheduler = PixelFlowMatchScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    base = np.linspace(0.95, 0.05, 5)
    expected = torch.tensor(3.0 * base / (1 + 2.0 * base), dtype=torch.float32)
    torch.testing.assert_close(scheduler.sigmas[:-1], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("solver", SOLVERS)
def test_set_timesteps_resets_state(solver):
    data = Gaussian()
    scheduler = PixelFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(8)
    x = noise()
    for i, t in enumerate(scheduler.timesteps[:5]):  # stop halfway, inside a two-call step for heun / 2s
        sigma = scheduler.sigmas[i].item()
        x = scheduler.step(model_output(scheduler.config.prediction_type, x, sigma, data.denoise(x, sigma)), t, x).prev_sample
    scheduler.set_timesteps(8)
    again = sample_loop(scheduler, noise(), data.denoise)
    fresh = PixelFlowMatchScheduler(solver=solver)
    fresh.set_timesteps(8)
    assert torch.equal(again, sample_loop(fresh, noise(), data.denoise))


@pytest.mark.parametrize("solver", SOLVERS)
def test_loop_without_begin_index_and_img2img_start(solver):
    """Index lookup from the timestep value, and a pipeline-style late start at `t_start * order`."""
    c = torch.full(SHAPE, -0.2)
    scheduler = PixelFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(6)
    x = noise()
    for i, t in enumerate(scheduler.timesteps):  # no set_begin_index: look the timestep up
        x = scheduler.step(model_output(scheduler.config.prediction_type, x, scheduler.sigmas[i].item(), c), t, x).prev_sample
    assert (x - c).abs().max().item() <= 1e-5

    scheduler.set_timesteps(6)
    begin = 2 * scheduler.order
    scheduler.set_begin_index(begin)
    start = scheduler.scale_noise(c, scheduler.timesteps[begin : begin + 1], noise())
    x = start
    for i, t in enumerate(scheduler.timesteps[begin:], start=begin):
        x = scheduler.step(model_output(scheduler.config.prediction_type, x, scheduler.sigmas[i].item(), c), t, x).prev_sample
    assert (x - c).abs().max().item() <= 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
def test_dtype_is_kept(solver):
    scheduler = PixelFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(3)
    x = noise().to(torch.bfloat16)
    for t in scheduler.timesteps:
        out = scheduler.step(torch.zeros_like(x), t, x)
        assert isinstance(out, PixelFlowMatchSchedulerOutput)
        assert out.prev_sample.dtype == out.pred_original_sample.dtype == torch.bfloat16
        x = out.prev_sample
    scheduler.set_timesteps(3)
    prev, x0 = scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[0], torch.zeros(SHAPE), return_dict=False)
    assert prev.dtype == x0.dtype == torch.float32


def test_config_round_trip(tmp_path):
    scheduler = PixelFlowMatchScheduler(
        solver="dpmpp_2s", prediction_type="flow_prediction", shift=2.5, use_dynamic_shifting=True, sigma_max=0.9
    )
    scheduler.save_config(tmp_path)
    loaded = PixelFlowMatchScheduler.from_pretrained(tmp_path)
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(scheduler.config)
    assert loaded.order == 2
    scheduler.set_timesteps(5, mu=0.7)
    loaded.set_timesteps(5, mu=0.7)
    assert torch.equal(loaded.sigmas, scheduler.sigmas) and torch.equal(loaded.timesteps, scheduler.timesteps)

    # from_config swaps within the family and to the diffusers schedulers listed as compatible.
    heun = PixelFlowMatchScheduler.from_config(scheduler.config, solver="heun")
    assert heun.config.solver == "heun" and heun.order == 2 and heun.config.shift == 2.5
    euler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    assert euler.config.shift == 2.5 and euler.config.use_dynamic_shifting
    assert FlowMatchEulerDiscreteScheduler in PixelFlowMatchScheduler().compatibles


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"solver": "dpm_pp"}, "solver"),
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"time_shift_type": "cubic"}, "time_shift_type"),
        ({"sigma_min": 0.5, "sigma_max": 0.4}, "sigma_min"),
        ({"sigma_max": 1.5}, "sigma_max"),
        ({"shift": 0.0}, "shift"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"time_grid": "cosine"}, "time_grid"),
        ({"time_grid": "karras", "rho": 0.0}, "rho"),
        ({"time_grid": "calibrated"}, "calibrated_sigmas"),
        ({"calibrated_sigmas": [0.9, 0.1]}, "calibrated_sigmas"),
        ({"time_grid": "calibrated", "calibrated_sigmas": [0.9]}, "calibrated_sigmas"),
        ({"time_grid": "calibrated", "calibrated_sigmas": [0.5, 0.9]}, "calibrated_sigmas"),
        ({"time_grid": "log_snr", "sigma_max": 1.0}, "sigma_max"),
    ],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PixelFlowMatchScheduler(**kwargs)


@pytest.mark.parametrize(
    "config,kwargs,match",
    [
        ({}, {}, "num_inference_steps"),
        ({}, {"num_inference_steps": 0}, "num_inference_steps"),
        ({}, {"num_inference_steps": 3, "sigmas": [0.9, 0.5]}, "len\\(sigmas\\)"),
        ({"use_dynamic_shifting": True}, {"num_inference_steps": 4}, "mu"),
        ({}, {"sigmas": [0.5, 0.9]}, "strictly decreasing"),
        ({}, {"sigmas": [0.9, 0.5, 0.5]}, "strictly decreasing"),
        ({}, {"sigmas": [1.2, 0.5]}, "\\(0, 1\\]"),
        ({}, {"sigmas": [0.9, 0.5, 0.0]}, "\\(0, 1\\]"),
        ({}, {"sigmas": [0.9, float("nan")]}, "\\(0, 1\\]"),
        ({}, {"sigmas": []}, "non-empty"),
        ({"prediction_type": "epsilon"}, {"sigmas": [1.0, 0.5]}, "epsilon"),
    ],
)
def test_bad_set_timesteps_raises(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelFlowMatchScheduler(**config).set_timesteps(**kwargs)


def test_bad_step_raises():
    scheduler = PixelFlowMatchScheduler(solver="heun")
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 950.0, x)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="not one of"):
        scheduler.step(x, 123.0, x)
    scheduler.set_begin_index(1)  # the corrector call of the first step, without its predictor
    with pytest.raises(ValueError, match="even index"):
        scheduler.step(x, scheduler.timesteps[1], x)
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros(SHAPE), t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(-1)


def test_default_output_is_pure_x0_jump_at_the_end():
    """The last step lands exactly on the model's x0 estimate (upstream stops at sigma 0.05 with noise left)."""
    for solver in SOLVERS:
        scheduler = PixelFlowMatchScheduler(solver=solver, prediction_type="velocity")
        scheduler.set_timesteps(4)
        scheduler.set_begin_index(len(scheduler.timesteps) - 1)
        x = noise()
        v = noise(7)
        out = scheduler.step(v, scheduler.timesteps[-1], x)
        sigma = scheduler.sigmas[-2].item()
        assert math.isclose(sigma, 0.05, rel_tol=1e-6)
        torch.testing.assert_close(out.prev_sample, x + sigma * v)
        torch.testing.assert_close(out.pred_original_sample, x + sigma * v)
