"""Samplers in numpy: timestep schedules and update rules, shared by every backend.

`DDIM` reproduces diffusers' `DDIMScheduler` (eta = 0) from the same scheduler config;
tests/test_sampling.py checks both the timesteps and every update against diffusers.
"""

from dataclasses import dataclass

import numpy as np

from perco.engine.errors import ModelError


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a diffusion model (from its scheduler_config.json)."""

    alphas_cumprod: np.ndarray  # [num_train_timesteps] float64
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    final_alpha_cumprod: float

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
        )


class DDIM:
    """Deterministic DDIM (eta = 0) over a `NoiseSchedule`."""

    def __init__(self, schedule: NoiseSchedule, steps: int):
        if not 1 <= steps <= schedule.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
        self.schedule = schedule
        self.steps = steps
        self.timesteps = _timesteps(schedule, steps)
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
