"""KL-weight schedules for VAE-style objectives: loss = reconstruction + weight · KL.

One typed config, `KLSchedule`, holds every kind's params (so `-S models.vae.kl.kind=linear`
switches kind without rewriting the section); `at(step)` is a pure function of the step.

    constant   weight · KL
    linear     weight ramps 0 -> `weight` over `warmup_steps`, then stays
    cyclical   the linear ramp repeated every `cycle_steps`, rising over the first `ratio`
    capacity   γ · |KL − C| per image, C rising 0 -> `capacity_max` nats over `capacity_steps`

Every value is arithmetic and `min` of the step, with no `if` on it: once torch.compile has made
the step dynamic (its one recompile), the training step does not recompile as the schedule moves.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import Field

from genflow.config import StrictModel


class KLTerm(NamedTuple):
    # The multiplier of the KL term: β, or γ for the capacity kind.
    weight: float
    # The target C of γ·|KL − C| in nats; 0 for every kind but capacity.
    capacity: float


class KLSchedule(StrictModel):
    kind: Literal["constant", "linear", "cyclical", "capacity"] = "constant"
    # 0.00025: the CelebA recipe of AntixK/PyTorch-VAE (MSE over pixels + weight · KL per image).
    weight: float = Field(0.00025, ge=0, description="β, the KL weight (the plateau of linear and cyclical)")
    warmup_steps: int = Field(10_000, ge=1, description="linear: steps for the weight to rise from 0 to `weight`")
    cycle_steps: int = Field(10_000, ge=1, description="cyclical: steps per cycle")
    ratio: float = Field(0.5, gt=0, le=1, description="cyclical: fraction of each cycle spent rising")
    # 0.25: AntixK/PyTorch-VAE's capacity recipe for CelebA, gamma 1000 times kld_weight 0.00025 (its
    # KL term is scaled by both), for this same per-pixel MSE reconstruction term.
    gamma: float = Field(0.25, gt=0, description="capacity: γ, the weight of |KL − C| per image")
    capacity_max: float = Field(25.0, ge=0, description="capacity: the final C, in nats")
    capacity_steps: int = Field(100_000, ge=1, description="capacity: steps for C to rise from 0 to capacity_max")

    def at(self, step: int) -> KLTerm:
        """The KL weight (and capacity C) at optimisation step `step` (counted from 0)."""
        if self.kind == "constant":
            return KLTerm(self.weight, 0.0)
        if self.kind == "linear":
            # KL cost annealing (Bowman et al. 2016, Sec. 3.1) in the linear "warm-up" form of
            # Sønderby et al. 2016 (Ladder VAE): β_t = β · min(t / T_warmup, 1).
            return KLTerm(self.weight * min(step / self.warmup_steps, 1.0), 0.0)
        if self.kind == "cyclical":
            # Fu et al. 2019 (NAACL), cyclical annealing: τ = mod(t, T/M) / (T/M),
            # β_t = f(τ) for τ ≤ R and 1 for τ > R, with the linear f(τ) = τ / R (scaled by β).
            # The mod written with //: torch.compile (2.13) fails on `%` of a dynamic step.
            tau = (step - self.cycle_steps * (step // self.cycle_steps)) / self.cycle_steps
            return KLTerm(self.weight * min(tau / self.ratio, 1.0), 0.0)
        # Burgess et al. 2018, "Understanding disentangling in β-VAE", controlled capacity increase:
        # loss term γ · |KL − C|, C increased linearly from 0 to C_max over training.
        return KLTerm(self.gamma, self.capacity_max * min(step / self.capacity_steps, 1.0))
