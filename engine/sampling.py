"""Samplers in numpy: timestep schedules and update rules, shared by every backend.

A model's scheduler config is read by its `_class_name` (`schedule_from_config`): the
beta-schedule classes of diffusion models give a `NoiseSchedule`, the rectified-flow
`FlowMatchEulerDiscreteScheduler` a `FlowSchedule`, and any other class is refused by name.

`DDIM` reproduces diffusers' `DDIMScheduler` (eta = 0), `DPMSolverPP2M` diffusers'
`DPMSolverMultistepScheduler` (DPM-Solver++, order 2, midpoint, final sigma 0), and
`FlowMatchEuler` diffusers' `FlowMatchEulerDiscreteScheduler` (shift from the config, float
timesteps and sigmas); tests/test_sampling_noise.py checks the timesteps and every update against
diffusers. A sampler has `timesteps` and `step(model_output, t, sample) -> previous sample`,
works on any batch, and starts from unit-variance noise.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from perco.engine.errors import ModelError


# diffusers scheduler classes whose configs describe a beta (DDPM) noise schedule; any of them can be
# sampled with DDIM or DPM-Solver++, which read only that schedule from the config
BETA_SCHEDULERS = frozenset({
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
})
FLOW_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler"})


def schedule_from_config(config: dict):
    """NoiseSchedule or FlowSchedule by the config's `_class_name` (absent: a beta schedule, diffusers'
    default); ModelError naming any other class."""
    name = config.get("_class_name")
    if name is None or name in BETA_SCHEDULERS:
        return NoiseSchedule.from_config(config)
    if name in FLOW_SCHEDULERS:
        return FlowSchedule.from_config(config)
    raise ModelError(f"scheduler class {name!r} is not supported (beta schedules: {', '.join(sorted(BETA_SCHEDULERS))}; "
                     f"flow matching: {', '.join(sorted(FLOW_SCHEDULERS))})")


@dataclass(frozen=True)
class FlowSchedule:
    """A rectified-flow schedule: x_sigma = (1 - sigma) x_0 + sigma noise, sigmas shifted by `shift`."""

    num_train_timesteps: int
    shift: float
    default_sampler = "flow-euler"

    @classmethod
    def from_config(cls, config: dict) -> "FlowSchedule":
        for option in ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                       "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"):
            if config.get(option):
                raise ModelError(f"scheduler option {option}={config[option]!r} is not supported")
        n, shift = config.get("num_train_timesteps", 1000), config.get("shift", 1.0)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
            raise ModelError(f"scheduler num_train_timesteps must be an integer in 1..100000, got {n!r}")
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not 0 < shift <= 1000:
            raise ModelError(f"scheduler shift must be a number in (0, 1000], got {shift!r}")
        return cls(n, float(shift))

    def shifted(self, sigmas: np.ndarray) -> np.ndarray:
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a diffusion model (from its scheduler_config.json)."""

    alphas_cumprod: np.ndarray  # [num_train_timesteps] float64
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    final_alpha_cumprod: float
    explicit_spacing: Optional[str] = None  # timestep_spacing as written in the config, if it is
    default_sampler = "ddim"

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float64)
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float32).astype(np.float64)
        elif kind == "scaled_linear":
            betas = (np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2).astype(np.float64)
        else:
            raise ModelError(f"scheduler beta_schedule {kind!r} is not supported (linear, scaled_linear)")
        for option in ("thresholding", "rescale_betas_zero_snr"):
            if config.get(option):
                raise ModelError(f"scheduler option {option}=true is not supported")
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ModelError(f"scheduler prediction_type {prediction!r} is not supported")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in ("leading", "trailing", "linspace"):
            raise ModelError(f"scheduler timestep_spacing {spacing!r} is not supported")
        # diffusers computes the products in float32; do the same so the schedules match bit for bit
        alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)
        final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
        return cls(
            alphas_cumprod=alphas_cumprod.astype(np.float64),
            prediction_type=prediction,
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
            final_alpha_cumprod=final,
            explicit_spacing=config.get("timestep_spacing"),
        )


class DDIM:
    """Deterministic DDIM (eta = 0) over a `NoiseSchedule`."""

    def __init__(self, schedule: NoiseSchedule, steps: int):
        if not 1 <= steps <= schedule.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
        self.schedule = schedule
        self.steps = steps
        self.timesteps = _timesteps(schedule, steps)
        if int(self.timesteps.max()) >= schedule.num_train_timesteps:  # "leading" + steps_offset can reach n
            raise ValueError(f"steps must be in 1..{max_steps(schedule)} for this schedule, got {steps}")
        self._stride = schedule.num_train_timesteps // steps

    def _alpha(self, t: int) -> float:
        return float(self.schedule.alphas_cumprod[t]) if t >= 0 else self.schedule.final_alpha_cumprod

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """One update x_t -> x_{t-stride}, computed in float64, returned as float32."""
        alpha, alpha_prev = self._alpha(t), self._alpha(t - self._stride)
        x = sample.astype(np.float64)
        out = model_output.astype(np.float64)
        a, s = np.sqrt(alpha), np.sqrt(1.0 - alpha)
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            x0, eps = (x - s * out) / a, out
        elif kind == "v_prediction":
            x0, eps = a * x - s * out, a * out + s * x
        else:  # "sample"
            x0, eps = out, (x - a * out) / s
        prev = np.sqrt(alpha_prev) * x0 + np.sqrt(1.0 - alpha_prev) * eps
        return prev.astype(np.float32)


class DPMSolverPP2M:
    """DPM-Solver++ (2M): second-order multistep, first order on the first and the last step.

    Timestep spacing defaults to "linspace" (diffusers' default for this scheduler) unless the
    config names one; the final sigma is 0, so the last step returns the predicted clean sample.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int):
        n = schedule.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in 1..{n}, got {steps}")
        ts = _dpm_timesteps(schedule, steps)
        if int(ts.max()) >= n:
            raise ValueError(f"steps must be in 1..{max_steps(schedule, _dpm_timesteps)} for this schedule, got {steps}")
        self.schedule, self.steps, self.timesteps = schedule, steps, ts
        all_sigmas = np.sqrt((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
        sigmas = np.interp(ts, np.arange(n), all_sigmas)
        self._sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
        self._x0 = []  # predicted clean samples of the previous steps
        self._index = 0

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple:
        alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
        return alpha, sigma * alpha

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        i = self._index
        if i >= self.steps or int(self.timesteps[i]) != int(t):
            raise ValueError(f"DPM-Solver++ steps must follow its timesteps; got t={t} at step {i}")
        x = sample.astype(np.float64)
        out = model_output.astype(np.float64)
        alpha_s, sigma_s = self._alpha_sigma(self._sigmas[i])
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            x0 = (x - sigma_s * out) / alpha_s
        elif kind == "v_prediction":
            x0 = alpha_s * x - sigma_s * out
        else:
            x0 = out
        self._x0 = (self._x0 + [x0])[-2:]
        alpha_t, sigma_t = self._alpha_sigma(self._sigmas[i + 1])
        if sigma_t == 0.0:  # final step to sigma 0: the update is exactly the predicted sample
            prev = x0
        else:
            h = np.log(alpha_t / sigma_t) - np.log(alpha_s / sigma_s)
            prev = (sigma_t / sigma_s) * x - alpha_t * np.expm1(-h) * x0
            if i > 0:  # second order (midpoint) with the previous prediction
                alpha_p, sigma_p = self._alpha_sigma(self._sigmas[i - 1])
                r = (np.log(alpha_s / sigma_s) - np.log(alpha_p / sigma_p)) / h
                prev = prev - 0.5 * alpha_t * np.expm1(-h) * (x0 - self._x0[0]) / r
        self._index += 1
        return prev.astype(np.float32)


class FlowMatchEuler:
    """Euler steps of a rectified flow over a `FlowSchedule`, as diffusers' FlowMatchEulerDiscreteScheduler.

    The model predicts the velocity (noise - x_0); a step is x + (sigma_next - sigma) * velocity, in
    float32 like diffusers. Timesteps (sigma * num_train_timesteps) are floats; the last sigma is 0.
    """

    def __init__(self, schedule: FlowSchedule, steps: int):
        n = schedule.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in 1..{n}, got {steps}")
        # diffusers: shifted training sigmas give sigma_max and sigma_min (float32), the inference sigmas
        # are a float64 linspace between them, shifted again, then float32
        train = schedule.shifted(np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n))
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        sigmas = schedule.shifted(np.linspace(sigma_max * n, sigma_min * n, steps) / n).astype(np.float32)
        self.schedule, self.steps = schedule, steps
        self.timesteps = sigmas * np.float32(n)  # float32, as the denoiser receives them
        self._sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        self._index = 0

    def step(self, model_output: np.ndarray, t, sample: np.ndarray) -> np.ndarray:
        i = self._index
        if i >= self.steps or float(self.timesteps[i]) != float(t):
            raise ValueError(f"flow-matching Euler steps must follow its timesteps; got t={t} at step {i}")
        self._index += 1
        dt = self._sigmas[i + 1] - self._sigmas[i]  # float32
        return (sample.astype(np.float32) + dt * model_output.astype(np.float32)).astype(np.float32)


SAMPLERS = {"ddim": DDIM, "dpmpp2m": DPMSolverPP2M, "flow-euler": FlowMatchEuler}
_SCHEDULE_KINDS = {"ddim": "NoiseSchedule", "dpmpp2m": "NoiseSchedule", "flow-euler": "FlowSchedule"}


def make_sampler(name: Optional[str], schedule, steps: int):
    """Sampler `name` (None: the schedule's default) over `schedule`; ValueError if it does not fit."""
    name = name or schedule.default_sampler
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if type(schedule).__name__ != _SCHEDULE_KINDS[name]:
        fits = [n for n, kind in _SCHEDULE_KINDS.items() if kind == type(schedule).__name__]
        raise ValueError(f"sampler {name!r} does not fit this model's {type(schedule).__name__}; use "
                         f"{' or '.join(fits)}")
    return SAMPLERS[name](schedule, steps)


def max_steps(schedule: NoiseSchedule, timesteps=None) -> int:
    """The largest step count whose timesteps (DDIM's unless given) all lie inside the schedule (999 for
    SD 2.1's DDIM: "leading" spacing plus steps_offset=1 reaches t=1000 at 1000 steps)."""
    timesteps = timesteps or _timesteps
    n = schedule.num_train_timesteps
    return next((steps for steps in range(n, 0, -1) if int(timesteps(schedule, steps).max()) < n), 1)


def _dpm_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """DPM-Solver++ timesteps: "linspace" spacing (diffusers' default for it) unless the config names one."""
    n = schedule.num_train_timesteps
    spacing = schedule.explicit_spacing or "linspace"
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = n // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    return np.arange(n, 0, -n / steps).round().astype(np.int64) - 1  # trailing


def _timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    n = schedule.num_train_timesteps
    if schedule.timestep_spacing == "leading":
        ratio = n // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        ratio = n / steps
        ts = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    else:  # linspace
        ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    return ts


def guided(model_output: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance on a [2B, ...] output ordered (uncond, cond)."""
    uncond, cond = np.split(model_output, 2, axis=0)
    return uncond + guidance * (cond - uncond)
