"""Flow-matching sampler for pixel-space models (PixelHDM and friends).

Conventions (the same as diffusers' flow-matching schedulers): ``sigma`` runs from 1 (pure noise) to 0 (clean data),
``x_sigma = (1 - sigma) * x0 + sigma * noise``, ``timesteps = sigma * num_train_timesteps`` and a terminal sigma of 0
is appended to ``sigmas``. ``prediction_type`` says what ``step`` is given (diffusers' meaning; the default
``flow_prediction`` is ``noise - x0``, what diffusers' flow schedulers step with) and is converted in :meth:`_to_x0` /
:meth:`_to_flow` only. Pipelines convert their model's native output (PixelHDM's velocity ``x0 - noise``, JiT's x0)
into it, so that the same config swaps into diffusers' schedulers with ``from_config``.

Default schedule. ``num_inference_steps`` sigmas spaced linearly from ``sigma_max = 0.95`` to ``sigma_min = 0.05``
(PixelHDM's trained range), then one last step into sigma 0. As upstream, sampling starts from pure ``N(0, I)``
treated as the sample at ``sigma_max`` (``init_noise_sigma = 1``). Upstream ``num_steps=N`` walks the grid
``linspace(0.95, 0.05, N + 1)`` and stops there; ``sigmas=np.linspace(0.95, 0.05, N + 1)`` gives that grid here,
followed by the final step into sigma 0 (N + 1 model calls with euler).

Solvers (``solver``), NFE = model calls:

- ``"euler"``: first order, one model call per sigma.
- ``"heun"``: Heun's second-order method. As in diffusers' ``FlowMatchHeunDiscreteScheduler`` each interior sigma
  appears twice in ``timesteps`` (predictor end point, then the start of the next step), so a plain
  ``for t in timesteps`` loop runs it.
- ``"dpmpp_2m"``: DPM-Solver++(2M), multistep, one model call per sigma.
- ``"dpmpp_2s"``: DPM-Solver++(2S), single step with an extra model call at the midpoint in
  ``lambda = log(alpha / sigma)``; the midpoints are placed into ``timesteps``.
- ``"dpmpp_3m"``: DPM-Solver++(3M), multistep, one model call per sigma (diffusers' ``DPMSolverMultistepScheduler``
  with ``solver_order=3``).
- ``"unipc"``: UniPC (B(h) = e^h - 1, "bh2") of order 3: a multistep predictor, then a corrector that reuses the next
  model call, so still one model call per sigma (diffusers' ``UniPCMultistepScheduler``).

Multistep solvers start at order 1 and raise the order as model calls accumulate; near the end the order is at most
the number of steps left (the step into sigma 0 is first order), as diffusers' ``lower_order_final``.

Time grids (``time_grid``), before any shift: ``"linear"`` in sigma from ``sigma_max`` to ``sigma_min``;
``"karras"``, linear in ``sigma ** (1 / rho)`` (dense near ``sigma_min`` for large ``rho``); ``"log_snr"``, uniform
in lambda; ``"calibrated"``, the knots ``calibrated_sigmas`` found by :func:`calibrate_time_grid` for one model,
interpolated in ``log(sigma)`` for other step counts.

Which to use (measured by ``benchmarks/bench_samplers.py``, tables in the README). On an exact Gaussian denoiser a
grid calibrated at the step count used is far ahead: ``unipc`` reaches a relative error of 6e-4 in 8 calls and 7e-5
in 16, 65 and 150 times below the best diffusers scheduler. On multimodal data the error is set by the samples that
change mode for a small solver error, which no grid removes in 8 calls. A trained model differs again: on the shapes
PixelHDM (guidance 3) grids dense near the first sigma win, and ``dpmpp_2m`` on ``log_snr`` (0.95 -> 0.05) is the
closest to a 200-call reference at every count from 6 to 20 calls, as close with 12 as Heun with 39 and as adherent
with 8: PixelHDM's default. Measure a model before choosing its grid (or calibrate one). A model trained on a
limited noise range keeps its grid inside it (PixelHDM 0.95 -> 0.05; JiT's and pixel-SDXL's ``1 -> 1/N``): a grid
that leaves the range asks the model where it was never trained.

The DPM-Solver++ solvers use ``alpha = 1 - sigma`` and the data-prediction (x0) update
``x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D``. **Deliberate difference from upstream PixelHDM**: its
``dpm_pp`` sampler applies the epsilon-form (DDIM) coefficients to the x0 estimate, which is wrong (it is far off even
for an exact denoiser), and its "2S" is an alias of the multistep update. Here both are the correct data-prediction
DPM-Solver++ methods. Upstream also returns the sample at ``t = 0.95`` with ~5% noise left; here the last step always
lands on sigma 0.

Every solver takes the step into sigma 0 as the exact jump to the model's x0 estimate, and no solver ever evaluates
the model at sigma 0. All arithmetic is done in float32 and the results are cast back to the dtype of ``sample``.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "unipc")
PREDICTION_TYPES = ("flow_prediction", "sample", "velocity", "epsilon")
TIME_SHIFT_TYPES = ("exponential", "linear")
TIME_GRIDS = ("linear", "karras", "log_snr", "calibrated")
_SOLVER_ORDER = {"euler": 1, "heun": 2, "dpmpp_2m": 1, "dpmpp_2s": 2, "dpmpp_3m": 1, "unipc": 1}
_MULTISTEP_ORDER = {"dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3}  # highest order of each multistep solver


@dataclass
class PixelFlowMatchSchedulerOutput(BaseOutput):
    """Output of :meth:`PixelFlowMatchScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next entry of ``sigmas``; feed it to the next model call.
        pred_original_sample (`torch.Tensor`): the x0 estimate from this model call.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (-inf at sigma = 1, +inf at sigma = 0)."""
    alpha = 1.0 - sigma
    if alpha <= 0.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def _sigma_of_log_snr(lam):
    """The inverse of :func:`_log_snr`: alpha / sigma = e^lambda with alpha = 1 - sigma (scalars or arrays)."""
    return 1.0 / (1.0 + np.exp(lam))


def _data_prediction_step(x: torch.Tensor, d: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """First-order DPM-Solver++ update from sigma to sigma_next with x0 estimate d (exact for a constant d)."""
    ratio = sigma_next / sigma
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    return ratio * x + (alpha_next - alpha * ratio) * d


def _lambda_midpoint_sigma(sigma: float, sigma_next: float) -> float:
    """The sigma whose lambda is halfway between those of sigma and sigma_next.

    At sigma = 1 (lambda = -inf) there is no midpoint; we then use lambda_next - 1, where the weight exp(lambda) of
    the exact solution's integral has its centroid as the step becomes infinitely long in lambda.
    """
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    if alpha <= 0.0:
        return math.e * sigma_next / (math.e * sigma_next + alpha_next)
    noise_mid, signal_mid = math.sqrt(sigma * sigma_next), math.sqrt(alpha * alpha_next)
    return noise_mid / (noise_mid + signal_mid)


def _karras(hi: float, lo: float, rho: float, u: np.ndarray) -> np.ndarray:
    """Karras et al. (2022)'s grid: linear in sigma ** (1 / rho) from hi (u = 0) to lo (u = 1)."""
    return (hi ** (1.0 / rho) + u * (lo ** (1.0 / rho) - hi ** (1.0 / rho))) ** rho


def _dpmpp_multistep_step(
    x: torch.Tensor, x0s: list, lams: list, sigma: float, sigma_next: float
) -> torch.Tensor:
    """DPM-Solver++ multistep update of order ``len(x0s)`` (1 to 3) in data prediction.

    ``x0s[0]`` is the x0 estimate at ``sigma`` (lambda ``lams[0]``), ``x0s[1:]`` earlier ones, newest first. With
    h = lambda' - lambda, r_k the earlier lambda gaps over h and D1, D2 the divided differences of x0 in lambda:
    ``x' = (sigma'/sigma) x + alpha' [phi1 D0 + (1 - phi1/h) D1 - ((h - phi1)/h^2 - 1/2) D2]``, phi1 = 1 - e^-h
    (2M uses the midpoint form ``phi1 (D0 + D1/2)``), as Lu et al. (2022) and diffusers.
    """
    if len(x0s) == 1:
        return _data_prediction_step(x, x0s[0], sigma, sigma_next)
    h = _log_snr(sigma_next) - lams[0]
    phi1 = -math.expm1(-h)
    ratio, alpha_next = sigma_next / sigma, 1.0 - sigma_next
    r0 = (lams[0] - lams[1]) / h
    d1_0 = (x0s[0] - x0s[1]) / r0
    if len(x0s) == 2:
        return ratio * x + alpha_next * phi1 * (x0s[0] + 0.5 * d1_0)
    r1 = (lams[1] - lams[2]) / h
    d1_1 = (x0s[1] - x0s[2]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return (
        ratio * x
        + alpha_next * phi1 * x0s[0]
        + alpha_next * (1.0 - phi1 / h) * d1
        - alpha_next * ((h - phi1) / h**2 - 0.5) * d2
    )


def _unipc_step(
    x: torch.Tensor, x0s: list, lams: list, sigma: float, sigma_next: float, x0_next: torch.Tensor | None = None
) -> torch.Tensor:
    """UniPC update (B(h) = e^-h - 1 in data prediction, "bh2") from ``sigma`` to ``sigma_next``.

    ``x0s``/``lams`` as in :func:`_dpmpp_multistep_step`. Predictor (``x0_next`` None): order ``len(x0s)``, with the
    earlier estimates as nodes r_k. Corrector (``x0_next``, the estimate at ``sigma_next`` from the model call made
    there): one order more, node r = 1 added. The weights rho solve ``R rho = b`` with ``R[i, k] = r_k ** i`` and
    ``b_i = i! phi_{i+1}(h) / B(h)`` (one node: rho = 1/2), as Zhao et al. (2023) and diffusers; then
    ``x' = (sigma'/sigma) x + alpha' (1 - e^-h) D0 - alpha' B(h) sum_k rho_k (x0_k - D0) / r_k``.
    """
    h = _log_snr(sigma_next) - lams[0]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    nodes = [(lam - lams[0]) / h for lam in lams[1:]]
    diffs = [(m - x0s[0]) / r for m, r in zip(x0s[1:], nodes)]
    if x0_next is not None:
        nodes.append(1.0)
        diffs.append(x0_next - x0s[0])
    out = (sigma_next / sigma) * x - (1.0 - sigma_next) * h_phi_1 * x0s[0]
    if not nodes:
        return out
    if len(nodes) == 1:
        rhos = [0.5]
    else:
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
        for i in range(1, len(nodes) + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        matrix = torch.tensor([[r**i for r in nodes] for i in range(len(nodes))], dtype=torch.float64)
        rhos = torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()
    return out - (1.0 - sigma_next) * b_h * sum(rho * d for rho, d in zip(rhos, diffs))


class PixelFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching scheduler: Euler, Heun, DPM-Solver++(2M, 2S, 3M) and UniPC solvers on several time grids.

    See the module docstring for conventions and where this differs from upstream PixelHDM. Drop-in for diffusers'
    ``FlowMatchEulerDiscreteScheduler``: given the same ``sigmas`` (and ``mu``), ``solver="euler"`` with
    ``prediction_type="flow_prediction"`` gives the same sigmas, timesteps and steps. diffusers' flow schedulers
    expect ``noise - x0``, i.e. the negated PixelHDM velocity.

    Args:
        num_train_timesteps (`int`, defaults to 1000): timesteps are ``sigma * num_train_timesteps``.
        solver (`str`, defaults to ``"euler"``): one of ``"euler"``, ``"heun"``, ``"dpmpp_2m"``, ``"dpmpp_2s"``,
            ``"dpmpp_3m"``, ``"unipc"``.
        prediction_type (`str`, defaults to ``"flow_prediction"``): what ``step`` is given: ``"flow_prediction"``
            (noise - x0, as diffusers' flow schedulers), ``"sample"`` (x0), ``"epsilon"`` (noise) or ``"velocity"``
            (x0 - noise; kept for saved configs, but diffusers' UniPC / DPM-Solver reject it in ``from_config``).
        sigma_max (`float`, defaults to 0.95), sigma_min (`float`, defaults to 0.05): ends of the ``linear``,
            ``karras`` and ``log_snr`` grids (before shifting).
        time_grid (`str`, defaults to ``"linear"``): how ``set_timesteps(num_inference_steps)`` spaces the sigmas:
            ``"linear"``, ``"karras"`` (see ``rho``), ``"log_snr"`` (needs ``sigma_max < 1``: lambda is -inf at 1) or
            ``"calibrated"`` (see ``calibrated_sigmas``).
        rho (`float`, defaults to 7.0): exponent of the ``karras`` grid ``(hi^(1/rho) + u (lo^(1/rho) -
            hi^(1/rho)))^rho``, u uniform in [0, 1]; rho = 1 is the linear grid.
        calibrated_sigmas (`list[float]`, *optional*): the ``calibrated`` grid's knots (decreasing, in (0, 1]), as
            written by :func:`calibrate_time_grid`; ``save_pretrained`` keeps them.
        shift (`float`, defaults to 1.0): static shift ``shift * s / (1 + (shift - 1) * s)``.
        use_dynamic_shifting (`bool`, defaults to False): resolution-dependent shift; ``set_timesteps`` then needs
            ``mu`` (see ``base_shift``, ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len``, which pipelines
            read to compute it).
        time_shift_type (`str`, defaults to ``"exponential"``): dynamic shift ``exp(mu) / (exp(mu) + 1/s - 1)``, or
            ``"linear"``: ``mu / (mu + 1/s - 1)``.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver: str = "euler",
        prediction_type: str = "flow_prediction",
        sigma_max: float = 0.95,
        sigma_min: float = 0.05,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        time_grid: str = "linear",
        rho: float = 7.0,
        calibrated_sigmas: list[float] | None = None,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"`time_shift_type` must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}.")
        if time_grid not in TIME_GRIDS:
            raise ValueError(f"`time_grid` must be one of {TIME_GRIDS}, got {time_grid!r}.")
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise ValueError(f"`rho` must be a finite number > 0, got {rho!r}.")
        if (time_grid == "calibrated") != (calibrated_sigmas is not None):
            raise ValueError(
                "`calibrated_sigmas` must be given exactly when time_grid='calibrated' (got time_grid="
                f"{time_grid!r}, calibrated_sigmas={calibrated_sigmas!r})."
            )
        if calibrated_sigmas is not None:
            knots = np.asarray(calibrated_sigmas, dtype=np.float64)
            if knots.ndim != 1 or knots.size < 2:
                raise ValueError(f"`calibrated_sigmas` must list at least 2 sigmas, got {calibrated_sigmas!r}.")
            self._check_sigmas(knots, "calibrated_sigmas")
        if not _is_positive_int(num_train_timesteps):
            raise ValueError(f"`num_train_timesteps` must be a positive integer, got {num_train_timesteps!r}.")
        if not (0.0 < sigma_min < sigma_max <= 1.0):
            raise ValueError(
                "`sigma_min` and `sigma_max` must satisfy 0 < sigma_min < sigma_max <= 1, got "
                f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}."
            )
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"`shift` must be a finite number > 0, got {shift!r}.")
        if time_grid == "log_snr" and sigma_max >= 1.0:
            raise ValueError("time_grid='log_snr' needs `sigma_max` < 1 (lambda is -inf at sigma 1), got 1.")
        if not (0 < base_image_seq_len < max_image_seq_len):
            raise ValueError(
                "`base_image_seq_len` and `max_image_seq_len` must satisfy 0 < base_image_seq_len < "
                f"max_image_seq_len, got {base_image_seq_len!r} and {max_image_seq_len!r}."
            )

        # `prediction_type` means the same to diffusers' UniPC / DPM-Solver with flow sigmas, whose default is
        # "epsilon": mark it as set, so that `from_config(pipe.scheduler.config)` always passes it on.
        defaults = [key for key in self.config.get("_use_default_values", []) if key != "prediction_type"]
        self.register_to_config(_use_default_values=defaults)
        self.order = _SOLVER_ORDER[solver]
        self.init_noise_sigma = 1.0

        # Until `set_timesteps` is called, expose the training grid sigma = 1, ..., 1/T (statically shifted), which
        # training code uses to look up sigmas from timesteps. Sampling needs `set_timesteps`.
        grid = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=np.float32)
        if not use_dynamic_shifting:
            grid = self._static_shift(grid)
        grid = torch.from_numpy(np.ascontiguousarray(grid)).to(torch.float32)
        self.timesteps = grid * num_train_timesteps
        self.sigmas = torch.cat([grid, grid.new_zeros(1)])
        self._sigma_values = self.sigmas.tolist()
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._reset_solver_state()

    # ------------------------------------------------------------------ state

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next :meth:`step` call (``None`` before the first)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index into ``timesteps``, set by a pipeline through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the next sampling loop at ``timesteps[begin_index]`` (pipelines call this before the loop)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"`begin_index` must be an integer >= 0, got {begin_index!r}.")
        self._begin_index = begin_index

    @property
    def state_in_first_order(self) -> bool:
        """False only between the two model calls of a two-call (heun, dpmpp_2s) step."""
        return self._stage is None

    def _reset_solver_state(self):
        # heun / dpmpp_2s: what the second call of a step needs. Multistep solvers: the last x0 estimates and their
        # lambdas (newest first); unipc also its last predictor step (start sample, x0 estimates, lambdas).
        self._stage = None
        self._x0s, self._lams = [], []
        self._last_step = None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: flow-matching models take the noisy sample unscaled (kept for epsilon-style loops)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------- schedule

    def _static_shift(self, sigmas: np.ndarray) -> np.ndarray:
        shift = self.config.shift
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def _dynamic_shift(self, sigmas: np.ndarray, mu: float) -> np.ndarray:
        # Same formula and float arithmetic as diffusers' FlowMatchEulerDiscreteScheduler, so given sigmas match.
        if self.config.time_shift_type == "exponential":
            scale = math.exp(mu)
        else:
            if mu <= 0:
                raise ValueError(f"`mu` must be > 0 with time_shift_type='linear', got {mu!r}.")
            scale = mu
        return scale / (scale + (1 / sigmas - 1))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        mu: float | None = None,
    ):
        """Build the sampling schedule (and reset the solver state).

        Args:
            num_inference_steps (`int`, *optional*): number of sigmas before the terminal 0; the default grid is
                ``linspace(sigma_max, sigma_min, num_inference_steps)``. May be omitted when ``sigmas`` is given.
            device: where ``sigmas`` and ``timesteps`` are put.
            sigmas (sequence of floats, *optional*): strictly decreasing values in (0, 1] used instead of the default
                grid; the configured shift is applied to them (as diffusers does) and a terminal 0 is appended.
            mu (`float`, *optional*): required with ``use_dynamic_shifting``; ignored otherwise.

        ``sigmas`` then lists every point where the sample lives (model calls plus the terminal 0) and
        ``timesteps = sigmas[:-1] * num_train_timesteps`` every model call: ``num_inference_steps`` for euler and
        dpmpp_2m, ``2 * num_inference_steps - 1`` for heun and dpmpp_2s.
        """
        if num_inference_steps is None and sigmas is None:
            raise ValueError("Pass `num_inference_steps` or `sigmas` to `set_timesteps` (got neither).")
        if num_inference_steps is not None and not _is_positive_int(num_inference_steps):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")

        if sigmas is not None:
            if isinstance(sigmas, torch.Tensor):
                sigmas = sigmas.detach().cpu().numpy()
            base = np.array(sigmas, dtype=np.float32)
            if base.ndim != 1 or base.size == 0:
                raise ValueError(f"`sigmas` must be a non-empty 1-D sequence, got shape {tuple(base.shape)}.")
            if num_inference_steps is not None and num_inference_steps != base.size:
                raise ValueError(
                    f"`num_inference_steps` ({num_inference_steps}) must equal len(sigmas) ({base.size}) when both "
                    "are given."
                )
            self._check_sigmas(base, "sigmas")
        else:
            base = self._base_grid(int(num_inference_steps))

        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed to `set_timesteps` when `use_dynamic_shifting` is True.")
            if not math.isfinite(mu):
                raise ValueError(f"`mu` must be a finite number, got {mu!r}.")
            base = self._dynamic_shift(base, mu)
        else:
            base = self._static_shift(base)
        base = torch.from_numpy(np.ascontiguousarray(base)).to(torch.float32)
        self._check_sigmas(base.numpy(), "sigmas after shifting")
        if self.config.prediction_type == "epsilon" and base[0].item() >= 1.0:
            raise ValueError(
                "prediction_type='epsilon' cannot start at sigma = 1 (x0 is undefined there); pass `sigmas` below 1."
            )

        full = self._expand_for_solver(base)
        self.num_inference_steps = base.numel()
        self._sigma_values = full.tolist()
        self.sigmas = full.to(device=device)
        self.timesteps = (full[:-1] * self.config.num_train_timesteps).to(device=device)
        self._step_index = None
        self._begin_index = None
        self._reset_solver_state()

    def _base_grid(self, num_steps: int) -> np.ndarray:
        """``num_steps`` sigmas of the configured ``time_grid`` (before shifting)."""
        config = self.config
        hi, lo = config.sigma_max, config.sigma_min
        u = np.linspace(0.0, 1.0, num_steps)
        if config.time_grid == "karras":
            return _karras(hi, lo, config.rho, u)
        if config.time_grid == "log_snr":
            lam = _log_snr(hi) + u * (_log_snr(lo) - _log_snr(hi))
            return _sigma_of_log_snr(lam)
        if config.time_grid == "calibrated":
            knots = np.asarray(config.calibrated_sigmas, dtype=np.float64)
            return np.exp(np.interp(u, np.linspace(0.0, 1.0, knots.size), np.log(knots)))
        return np.linspace(hi, lo, num_steps)

    @staticmethod
    def _check_sigmas(values: np.ndarray, name: str):
        if not np.all(np.isfinite(values)) or values.min() <= 0.0 or values.max() > 1.0:
            raise ValueError(
                f"`{name}` must lie in (0, 1] (the terminal 0 is appended by the scheduler), got {values.tolist()}."
            )
        if values.size > 1 and not np.all(np.diff(values) < 0):
            raise ValueError(f"`{name}` must be strictly decreasing, got {values.tolist()}.")

    def _expand_for_solver(self, base: torch.Tensor) -> torch.Tensor:
        """Every point where the sample lives, terminal 0 included, for the configured solver."""
        zero = base.new_zeros(1)
        solver = self.config.solver
        if solver == "heun":
            # s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0: predictor end point and next start share a sigma.
            return torch.cat([base[:1], base[1:].repeat_interleave(2), zero])
        if solver == "dpmpp_2s":
            # s0, m0, s1, m1, ..., s_{N-1}, 0 with m_i the lambda-midpoint of (s_i, s_{i+1}).
            values = base.tolist()
            points = []
            for sigma, sigma_next in zip(values[:-1], values[1:]):
                points += [sigma, _lambda_midpoint_sigma(sigma, sigma_next)]
            points.append(values[-1])
            return torch.cat([torch.tensor(points, dtype=torch.float32), zero])
        return torch.cat([base, zero])

    # ----------------------------------------------------------- look-ups

    def index_for_timestep(
        self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        """Index of ``timestep`` in ``timesteps``; of two equal entries (heun), the second, where a step begins."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        matches = (schedule_timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(f"`timestep` {float(timestep)} is not one of `scheduler.timesteps`.")
        return matches[1 if len(matches) > 1 else 0].item()

    def _init_step_index(self, timestep: float | torch.Tensor):
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            self._step_index = self.index_for_timestep(timestep)

    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Forward process ``sigma * noise + (1 - sigma) * sample`` at ``timestep`` (one per batch item or one).

        As in diffusers: with no begin index the sigma of each timestep is looked up; otherwise the sigma at the
        current step index (or the begin index, before the first step) is used.
        """
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor([timestep], dtype=torch.float32)
        timestep = timestep.reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timestep]
        elif self._step_index is not None:
            indices = [self._step_index] * timestep.numel()
        else:
            indices = [self._begin_index] * timestep.numel()
        sigma = self.sigmas.to(device=sample.device, dtype=torch.float32)[indices]
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        noisy = sigma * noise.to(torch.float32) + (1.0 - sigma) * sample.to(torch.float32)
        return noisy.to(sample.dtype)

    # ------------------------------------------------------ conversions

    def _to_x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
        """The model's x0 estimate, whatever it predicts (the only place `prediction_type` is read)."""
        kind = self.config.prediction_type
        if kind == "velocity":
            return sample + sigma * model_output
        if kind == "flow_prediction":
            return sample - sigma * model_output
        if kind == "sample":
            return model_output
        return (sample - sigma * model_output) / (1.0 - sigma)

    def _to_flow(
        self, model_output: torch.Tensor, sample: torch.Tensor, x0: torch.Tensor, sigma: float
    ) -> torch.Tensor:
        """The flow dx/dsigma = noise - x0 (the quantity diffusers' Euler steps with)."""
        kind = self.config.prediction_type
        if kind == "velocity":
            return -model_output
        if kind == "flow_prediction":
            return model_output
        return (sample - x0) / sigma

    # ----------------------------------------------------------------- step

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> PixelFlowMatchSchedulerOutput | tuple:
        """Advance ``sample`` from ``sigmas[step_index]`` to ``sigmas[step_index + 1]`` given the model's output there.

        Args:
            model_output: the model's prediction at (``sample``, ``timestep``), of kind ``prediction_type``.
            timestep: the current entry of ``timesteps`` (a float, not an integer index).
            sample: the current sample.
            generator: unused (every solver is deterministic); accepted for drop-in use.
            return_dict: return a :class:`PixelFlowMatchSchedulerOutput` (default) or a tuple
                ``(prev_sample, pred_original_sample)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if isinstance(timestep, int) or (
            isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)
        ):
            raise ValueError(
                "`timestep` must be an entry of `scheduler.timesteps` (a float), not an integer index from "
                f"`enumerate`; got {timestep!r}."
            )
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            timestep = timestep.reshape(-1)[0]
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if index >= len(self.timesteps):
            raise ValueError(
                f"`step` was called {index + 1} times but there are only {len(self.timesteps)} timesteps; call "
                "`set_timesteps` to start a new loop."
            )

        out_dtype = sample.dtype
        x = sample.to(torch.float32)
        output = model_output.to(device=x.device, dtype=torch.float32)
        sigma, sigma_next = self._sigma_values[index], self._sigma_values[index + 1]
        x0 = self._to_x0(output, x, sigma)

        solver = self.config.solver
        # heun and dpmpp_2s make two calls per step: the odd entries of `timesteps` are the second calls.
        second_call = self.order == 2 and index % 2 == 1
        if second_call and self._stage is None:
            raise ValueError(
                f"timesteps[{index}] is the second model call of a {solver} step, but the first was not made; start "
                "the loop at an even index (e.g. `set_begin_index(t_start * scheduler.order)`)."
            )
        if not second_call:
            self._stage = None
        if second_call:
            prev = self._second_call(output, x, x0, sigma, sigma_next)
        elif sigma_next == 0.0:
            prev = x0  # the step into sigma 0: the exact jump to the x0 estimate, for every solver
        elif solver in _MULTISTEP_ORDER:
            prev = None  # below
        elif solver == "euler":
            prev = x + (sigma_next - sigma) * self._to_flow(output, x, x0, sigma)
        elif solver == "heun":
            flow = self._to_flow(output, x, x0, sigma)
            self._stage = (x, flow, sigma, sigma_next)
            prev = x + (sigma_next - sigma) * flow
        elif solver == "dpmpp_2s":
            # First call at s_i: move to the lambda-midpoint (sigma_next here) with x0 at s_i.
            self._stage = (x, sigma, self._sigma_values[index + 2])
            prev = _data_prediction_step(x, x0, sigma, sigma_next)
        if solver in _MULTISTEP_ORDER:
            prev = self._multistep(x, x0, index, prev)

        self._step_index += 1
        prev, x0 = prev.to(out_dtype), x0.to(out_dtype)
        if not return_dict:
            return (prev, x0)
        return PixelFlowMatchSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _second_call(
        self, output: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float
    ) -> torch.Tensor:
        """Finish a two-call step (heun corrector at s_{i+1}, or dpmpp_2s midpoint call)."""
        if self.config.solver == "heun":
            start, flow_start, sigma_start, sigma_end = self._stage
            flow_end = self._to_flow(output, x, x0, sigma)
            self._stage = None
            return start + (sigma_end - sigma_start) * (0.5 * (flow_start + flow_end))
        start, sigma_start, sigma_end = self._stage
        self._stage = None
        return _data_prediction_step(start, x0, sigma_start, sigma_end)

    def _multistep(self, x: torch.Tensor, x0: torch.Tensor, index: int, final: torch.Tensor | None) -> torch.Tensor:
        """One step of a multistep solver (dpmpp_2m, dpmpp_3m, unipc) from ``sigmas[index]``, unless ``final`` (the
        jump into sigma 0) is given; the history is updated either way."""
        sigma, sigma_next = self._sigma_values[index], self._sigma_values[index + 1]
        solver, lam = self.config.solver, _log_snr(sigma)
        if solver == "unipc" and self._last_step is not None:
            # Corrector: redo the last step with this call's x0 as one more node (no extra model call).
            start, x0s, lams = self._last_step
            x = _unipc_step(start, x0s, lams, self._sigma_values[index - 1], sigma, x0)
        # Earlier estimates at sigma = 1 (lambda = -inf) get no weight in the extrapolation (the limit drops them).
        earlier = [(m, value) for m, value in zip(self._x0s, self._lams) if math.isfinite(value)]
        steps_left = len(self._sigma_values) - 1 - index
        order = min(_MULTISTEP_ORDER[solver], steps_left, 1 + len(earlier))
        x0s = [x0] + [m for m, _ in earlier][: order - 1]
        lams = [lam] + [value for _, value in earlier][: order - 1]
        keep = _MULTISTEP_ORDER[solver] - 1
        self._x0s, self._lams = [x0, *self._x0s][:keep], [lam, *self._lams][:keep]
        self._last_step = (x, x0s, lams)
        if final is not None:
            return final
        if solver == "unipc":
            return _unipc_step(x, x0s, lams, sigma, sigma_next)
        return _dpmpp_multistep_step(x, x0s, lams, sigma, sigma_next)


def _sample_with(scheduler: PixelFlowMatchScheduler, sigmas, noise: torch.Tensor, denoise) -> torch.Tensor:
    """Runs a data-prediction scheduler from `noise` over `sigmas` with `denoise(x, sigma) -> x0`."""
    scheduler.set_timesteps(sigmas=sigmas)
    scheduler.set_begin_index(0)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(denoise(x, scheduler._sigma_values[i]), t, x).prev_sample
    return x


def _lambdas_to_search(lams: list, lam_floor: float) -> np.ndarray:
    """Unconstrained coordinates of increasing lambdas at or below `lam_floor`: the logs of the gaps between
    consecutive lambdas and of the last one's distance to the floor (a grid ending on the floor is moved 1e-6 up)."""
    distances = lam_floor - np.asarray(lams, dtype=np.float64)
    distances[-1] = max(distances[-1], 1e-6)
    return np.log(np.append(-np.diff(distances), distances[-1]))


def _search_to_lambdas(y: np.ndarray, lam_floor: float) -> list:
    return (lam_floor - np.cumsum(np.exp(y)[::-1])[::-1]).tolist()


@torch.no_grad()
def calibrate_time_grid(
    scheduler: PixelFlowMatchScheduler,
    denoise,
    noise: torch.Tensor,
    num_inference_steps: int,
    reference_steps: int = 200,
    max_trials: int = 1000,
    mu: float | None = None,
) -> PixelFlowMatchScheduler:
    """Tunes the time grid of `scheduler` (its solver, at `num_inference_steps`) to one model.

    The objective is the RMS distance between what the solver makes from `noise` and a reference: UniPC with
    `reference_steps` model calls on the ``karras`` grid over the same range. The search starts from the best of the
    scheduler's own grid and 20 karras grids (rho 1 to 5, last sigma from `sigma_min` to 0.2), then minimises the
    objective over every sigma but the first with Nelder-Mead (scipy's adaptive variant, restarted once where it
    stops), in coordinates that keep the grid decreasing and its last sigma at or above `sigma_min`: the logs of the
    gaps in lambda between consecutive sigmas and from the last one to `sigma_min`'s. Each trial costs one sampling
    run (`num_inference_steps` model calls on `noise`).

    The tuned grid is as good as `noise` is representative: on multimodal data a sample near the boundary between
    two modes can land in the other one, and a few calibration samples rarely contain such a sample, so the grid is
    tuned for the smooth part of the flow only (``benchmarks/bench_samplers.py`` measures both).

    Args:
        scheduler: the scheduler to tune (any solver, grid and prediction type; its shift is applied first).
        denoise: ``denoise(sample, sigma) -> x0`` estimate, the model wrapped by the caller (guidance included).
        noise: starting samples at the first sigma (a few, shaped as the model's input).
        num_inference_steps: the step count the grid is tuned at; other counts interpolate it in ``log(sigma)``.
        reference_steps: model calls of the reference solve.
        max_trials: sampling runs the search may make, the 21 starting grids included.
        mu: the dynamic shift, for schedulers with ``use_dynamic_shifting`` (the grid is then tuned at that `mu`).

    Returns:
        A scheduler of the same class and config with ``time_grid="calibrated"`` and the tuned ``calibrated_sigmas``
        (shift 1, no dynamic shifting: the knots are final sigmas); ``save_pretrained`` keeps them.
    """
    from scipy.optimize import minimize

    if not _is_positive_int(num_inference_steps) or num_inference_steps < 2:
        raise ValueError(f"`num_inference_steps` must be an integer >= 2, got {num_inference_steps!r}.")
    if not _is_positive_int(reference_steps):
        raise ValueError(f"`reference_steps` must be a positive integer, got {reference_steps!r}.")
    if not _is_positive_int(max_trials):
        raise ValueError(f"`max_trials` must be a positive integer, got {max_trials!r}.")
    config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    data_config = {**config, "prediction_type": "sample", "shift": 1.0, "use_dynamic_shifting": False}
    data_config.update(time_grid="linear", calibrated_sigmas=None)
    reference_scheduler = PixelFlowMatchScheduler.from_config(data_config, solver="unipc", time_grid="karras")
    reference = _sample_with(reference_scheduler, reference_scheduler._base_grid(reference_steps), noise, denoise)

    start = PixelFlowMatchScheduler.from_config(config)
    start.set_timesteps(num_inference_steps, mu=mu)
    grid = torch.unique_consecutive(start.sigmas[:-1]).tolist()
    if len(grid) != num_inference_steps:  # dpmpp_2s: drop the midpoints, keep the grid points
        grid = grid[::2]
    trial_scheduler = PixelFlowMatchScheduler.from_config(data_config)
    lam_first, lam_floor = _log_snr(grid[0]), _log_snr(config["sigma_min"])
    trials = 0

    def error(lams):
        nonlocal trials
        # Refused: no trials left, a sigma at or above the first, or below sigma_min (beyond float32 rounding).
        if trials >= max_trials or lams[0] <= lam_first or lams[-1] > lam_floor + 1e-6:
            return math.inf
        sigmas = [grid[0], *_sigma_of_log_snr(np.asarray(lams))]
        if not np.all(np.diff(np.asarray(sigmas, dtype=np.float32)) < 0):  # a gap below float32 resolution
            return math.inf
        trials += 1
        out = _sample_with(trial_scheduler, sigmas, noise, denoise)
        return (out - reference).float().pow(2).mean().sqrt().item()

    # Start from the best of the scheduler's grid and a few karras grids ending at or above sigma_min.
    u = np.linspace(0.0, 1.0, num_inference_steps)
    ends = np.geomspace(config["sigma_min"], max(config["sigma_min"], 0.2), 4)
    starts = [grid] + [_karras(grid[0], end, rho, u).tolist() for rho in (1.0, 1.5, 2.0, 3.0, 5.0) for end in ends]
    _, lams = min((error(lams), lams) for lams in ([_log_snr(v) for v in sigmas[1:]] for sigmas in starts))
    y = _lambdas_to_search(lams, lam_floor)
    for _ in range(2):
        if trials >= max_trials:
            break
        simplex = np.vstack([y, y + 0.5 * np.eye(y.size)])  # each log-gap half a unit up
        y = minimize(
            lambda point: error(_search_to_lambdas(point, lam_floor)), y, method="Nelder-Mead",
            options={"initial_simplex": simplex, "adaptive": True, "xatol": 1e-3, "fatol": 0.0,
                     "maxfev": max_trials},
        ).x
    knots = [grid[0], *_sigma_of_log_snr(np.asarray(_search_to_lambdas(y, lam_floor)))]
    return PixelFlowMatchScheduler.from_config(
        config, time_grid="calibrated", calibrated_sigmas=[float(v) for v in knots], shift=1.0,
        use_dynamic_shifting=False,
    )
