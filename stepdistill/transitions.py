"""How a few-step student moves between the times of its grid (METHODS.md §1.4), and which stock diffusers scheduler
replays each move.

A transition takes the student's prediction at time ``t`` and gives the sample at the next grid time ``s < t``:

* ``DDIM``: the deterministic jump ``x_s = a_s x0 + s_s eps`` (DDIM, Song et al. 2021, Eq. 12 with eta = 0);
  progressive distillation and one-step students;
* ``Renoise``: denoise, then re-noise with fresh noise, ``x_s = a_s x0 + s_s z`` (multistep consistency sampling,
  Song et al. 2023, Algorithm 1 on a VP schedule; LCM; DMD2's multi-step student);
* ``CM(sigma_min)``: the consistency models' re-noise to ``sqrt(sigma_s^2 - sigma_min^2)`` in EDM's sigma (Song et al.
  2023, Algorithm 1: the clean estimate already sits at ``sigma_min``); ``Renoise`` is ``sigma_min = 0``;
* ``FlowMap``: the DDIM jump of a network told the jump's end time (MeanFlow's average velocity);
* ``TCD(gamma)``: strategic stochastic sampling (Zheng et al. 2024, §4.3): a DDIM jump to ``s' = (1 - gamma) s``, then
  ``noise_travel`` forward from ``s'`` to ``s``; ``gamma = 0`` is DDIM, ``gamma = 1`` is ``Renoise``.

``noise_travel`` (the forward kernel from ``s`` to ``t > s``,
``x_t = (a_t/a_s) x_s + sqrt(s_t^2 - (a_t/a_s)^2 s_s^2) n``) is the second half of TCD's step and the forward
noising of PCM and phased DMD; as a sampler step it is ``TCD``.

Each transition lists the stock schedulers that replay it on a discrete VP teacher (``vp_schedulers``: the scheduler
and the pipeline call arguments it needs, most natural first; ``export.py`` checks each against the grid before
anything is written), and whether FlowMatchEuler replays it on flow teachers (``flow``).
"""

from __future__ import annotations

import inspect
import math

import torch

from .parameterization import Prediction, ddim_step
from .schedules import NoiseSchedule, VPDiscrete, _bcast


def noise_travel(x_s: torch.Tensor, schedule: NoiseSchedule, s, t, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising from time ``s`` to ``t >= s`` (the marginal kernel q(x_t | x_s), METHODS.md §1.4).

    ``s`` and ``t`` are scalars or per-sample ``[B]``; float64 inside, cast back to ``x_s``'s dtype."""
    a_s, s_s = _bcast(schedule.alpha(s), x_s), _bcast(schedule.sigma(s), x_s)
    a_t, s_t = _bcast(schedule.alpha(t), x_s), _bcast(schedule.sigma(t), x_s)
    ratio = a_t / a_s
    scale = (s_t**2 - ratio**2 * s_s**2).clamp(min=0).sqrt()
    return (ratio * x_s.double() + scale * noise.double()).to(x_s.dtype)


class Transition:
    """Base class. ``step`` moves to a grid time ``s > 0``; ``last`` gives the sample after the final step."""

    name = ""
    #: whether FlowMatchEulerDiscreteScheduler replays it (``stochastic_sampling`` value), ``None`` if it does not
    flow: bool | None = None
    #: the single-file pipeline under ``pipelines/`` that replays it where no stock one can (``None``: stock ones)
    pipeline: str | None = None

    def step(self, pred: Prediction, schedule: NoiseSchedule, s: torch.Tensor, noise) -> torch.Tensor:
        """The sample at ``s`` (``[B]`` times) from the prediction at the current step; ``noise()`` draws fresh
        standard normal noise shaped like the sample, for stochastic transitions."""
        raise NotImplementedError

    def last(self, pred: Prediction, schedule: NoiseSchedule) -> torch.Tensor:
        """The sample after the last step: the clean estimate (``sigma(0)`` may be > 0 on a discrete schedule)."""
        return pred.x0

    def config(self) -> dict:
        """The transition's name and settings (``stepdistill.json``)."""
        return {"name": self.name}

    def call_kwargs(self) -> dict:
        """Pipeline call arguments the transition itself needs (TCD's ``eta``)."""
        return {}

    def inputs(self, cond, s: torch.Tensor):
        """The condition the network takes a step to ``s`` with (``[B]`` times; 0 at the last step): ``cond`` itself,
        except for flow maps, which are told where they jump (``FlowMap``)."""
        return cond

    def vp_schedulers(self, cfg: dict, grid, timesteps: list[int]):
        """Stock schedulers on the teacher's betas (``cfg``: its scheduler config with the student's prediction type)
        that may replay ``grid``, each with the call arguments it needs (``{}``: the config alone holds the grid)."""
        return iter(())

    def __eq__(self, other) -> bool:  # transitions compare by what they do; a name compares with the name
        if isinstance(other, str):
            return self.name == other
        return isinstance(other, Transition) and self.config() == other.config()

    def __hash__(self) -> int:  # consistent with __eq__, which equates a transition with its name
        return hash(self.name)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")
        return f"{self.name}({args})" if args else self.name


def _own(cls, cfg: dict) -> dict:
    """The keys of ``cfg`` that scheduler ``cls`` takes (DDPM-only keys would only draw a warning)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in cfg.items() if k in accepted}


def _distillation_schedulers(cls, cfg: dict, grid, timesteps: list[int]):
    """LCMScheduler / TCDScheduler candidates (epsilon, v or sample outputs only). ``original_inference_steps = K``
    spaces their K steps as DMD2's grid (999/749/499/249 on 1000, ECOSYSTEM.md §1); other grids (3 steps on 1000:
    LCM's own grid is 998/665/332, ours trailing 999/666/332) go as ``timesteps=`` in SD pipelines, with
    ``original_inference_steps = N`` so that every timestep is on their "distillation schedule" and calls do not warn
    that ours are off it."""
    own = _own(cls, cfg)
    if own.get("prediction_type") not in ("epsilon", "v_prediction", "sample"):
        return
    yield cls.from_config({**own, "original_inference_steps": grid.steps}), {}
    # A grid picked from a finer N-step grid as these schedulers pick it (a consistency student trained on LCM's
    # 50-step grid samples 4 steps at 999/759/499/259): N from the spacing every timestep sits on
    n_train = cfg.get("num_train_timesteps", 1000)
    finer = n_train // math.gcd(n_train, *(int(ts) + 1 for ts in timesteps))
    if finer not in (grid.steps, n_train):
        yield cls.from_config({**own, "original_inference_steps": finer}), {}
    yield cls.from_config({**own, "original_inference_steps": cfg.get("num_train_timesteps", 1000)}), \
        {"timesteps": timesteps}


class DDIM(Transition):
    """Deterministic jumps (eta = 0)."""

    name = "ddim"
    flow = False

    def step(self, pred, schedule, s, noise):
        return ddim_step(pred, schedule, s)

    def vp_schedulers(self, cfg, grid, timesteps):
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

        # steps_offset is unused by "trailing"; 1 keeps StableDiffusionPipeline from warning about (and resetting) it
        yield DDIMScheduler.from_config({**cfg, "timestep_spacing": "trailing", "steps_offset": 1}), {}
        if grid.steps == 1:
            # A one-step student told another time than the start (DMD2's conditioning timestep). SD pipelines take it
            # as timesteps=[t]; DMD2's own call uses LCMScheduler, whose one step returns its x0 estimate
            # (c_skip < 2e-7).
            yield LCMScheduler.from_config(_own(LCMScheduler, cfg)), {"timesteps": timesteps}
            # DDPMPipeline has no timesteps argument: DDIM's "leading" spacing puts its single step at steps_offset,
            # and that step lands on x0 (set_alpha_to_one). StableDiffusionPipeline resets steps_offset to 1.
            yield DDIMScheduler.from_config({**cfg, "timestep_spacing": "leading", "steps_offset": timesteps[0]}), {}
            return
        # Unevenly spaced grids (PD's 3 or 16 steps on 1000 timesteps), which DDIMScheduler steps between wrongly:
        # SD pipelines take them as timesteps= in EulerDiscreteScheduler, whose deterministic Euler step in sigma is
        # the DDIM step (Song et al. 2021; Karras et al. 2022 §3) and goes to the next timestep it is given, the last
        # to sigma 0. Its initial noise is sqrt(sigma_max^2 + 1) times the pipeline's draw (pure noise, as we start)
        # only under "leading" spacing ("linspace"/"trailing" scale by sigma_max), which custom timesteps otherwise
        # ignore. The teacher's sampling-only settings are dropped: log-linear interpolation would move the sigmas
        # between timesteps, and Karras/exponential/beta sigmas refuse custom timesteps.
        euler = {**_own(EulerDiscreteScheduler, cfg), "timestep_spacing": "leading", "steps_offset": 1,
                 "final_sigmas_type": "zero", "interpolation_type": "linear", "timestep_type": "discrete",
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
        yield EulerDiscreteScheduler.from_config(euler), {"timesteps": timesteps}


class FlowMap(DDIM):
    """The jump of a flow-map student (MeanFlow, Geng et al. 2025): the network takes the step's end time ``s`` as
    ``cond["r"]`` and its prediction, read as the average velocity over ``[s, t]``, moves the sample there:
    ``x_s = x_t - (t - s) u`` on rectified flow, which is the DDIM jump of the same prediction on any schedule (the
    jump's clean estimate and noise are the prediction's own). No stock scheduler passes ``r`` to the network, so the
    export is the single-file pipeline ``pipelines/flow_map.py`` (``pipeline``)."""

    name = "flow_map"
    flow = None
    #: the file under pipelines/ that replays it (``export.py``)
    pipeline = "flow_map"

    def inputs(self, cond, s):
        return {**(cond or {}), "r": s}

    def vp_schedulers(self, cfg, grid, timesteps):
        return iter(())


class CM(Transition):
    """Multistep consistency sampling: re-noise the clean estimate to EDM sigma ``sqrt(sigma_s^2 - sigma_min^2)``.

    Args:
        sigma_min: the EDM sigma the consistency function's boundary sits at (0.002 in Song et al. 2023).
    """

    name = "cm"

    def __init__(self, sigma_min: float = 0.002):
        if not (math.isfinite(sigma_min) and sigma_min >= 0):
            raise ValueError(f"the cm transition's sigma_min must be >= 0, got {sigma_min}")
        self.sigma_min = float(sigma_min)
        self.flow = True if sigma_min == 0 else None  # FlowMatchEuler's stochastic_sampling re-noises plainly

    def config(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min}

    def step(self, pred, schedule, s, noise):
        # x_s = a_s (x0 + sqrt(sigma_s^2 - sigma_min^2) z) with sigma = s/a (EDM); float64 inside
        like = pred.x0_64
        a, sd = _bcast(schedule.alpha(s), like), _bcast(schedule.sigma(s), like)
        scale = (sd**2 - a**2 * self.sigma_min**2).clamp(min=0).sqrt()
        return (a * pred.x0_64 + scale * noise().double()).to(pred.dtype)

    def vp_schedulers(self, cfg, grid, timesteps):
        if self.sigma_min == 0:  # plain re-noising: LCMScheduler's step
            yield from Renoise().vp_schedulers(cfg, grid, timesteps)


class Renoise(CM):
    """Denoise, then re-noise with fresh noise (CM with ``sigma_min = 0``)."""

    name = "renoise"

    def __init__(self):
        super().__init__(0.0)

    def config(self) -> dict:
        return {"name": self.name}

    def step(self, pred, schedule, s, noise):
        # DMD2's rollout re-noises the float32 clean estimate (``add_noise(x0, z, t)``), and so does this
        return schedule.add_noise(pred.x0, noise(), s)

    def vp_schedulers(self, cfg, grid, timesteps):
        from diffusers import LCMScheduler

        # LCMScheduler's multistep sampling is "denoise, then re-noise with fresh noise" (DMD2's 4-step sampler). Its
        # boundary scalings (timestep_scaling 10) leave c_skip < 2e-7 at every grid step >= N/8.
        return _distillation_schedulers(LCMScheduler, cfg, grid, timesteps)


class TCD(Transition):
    """Strategic stochastic sampling (Zheng et al. 2024, §4.3), as diffusers' ``TCDScheduler`` runs it: a DDIM jump to
    ``s' = (1 - gamma) s`` then noise travel to ``s``; on a discrete schedule ``s'`` is the timestep
    ``floor((1 - gamma) n_s)``, and the last step lands on timestep 0 (``TCDScheduler.step``), not on the clean
    estimate.

    Args:
        gamma: the stochasticity (``eta`` in diffusers' call), in [0, 1]; 0.3 is TCD's default.
    """

    name = "tcd"
    flow = None

    def __init__(self, gamma: float = 0.3):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"the tcd transition's gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)

    def config(self) -> dict:
        return {"name": self.name, "gamma": self.gamma}

    def call_kwargs(self) -> dict:
        return {"eta": self.gamma}

    def _intermediate(self, schedule: NoiseSchedule, s: torch.Tensor) -> torch.Tensor:
        if isinstance(schedule, VPDiscrete):
            # TCDScheduler: timestep_s = floor((1 - eta) * prev_timestep), in torch's default float32 as it computes it
            # (float64 would floor 0.7 * 10 to 7 where float32 gives 6)
            n = torch.floor((1.0 - self.gamma) * schedule.model_time(s).round().long())
            return schedule.index_to_t(n.double())
        return (1.0 - self.gamma) * s

    def step(self, pred, schedule, s, noise):
        mid = self._intermediate(schedule, s)
        x_mid = ddim_step(pred, schedule, mid)
        return x_mid if self.gamma == 0 else noise_travel(x_mid, schedule, mid, s, noise())

    def last(self, pred, schedule):
        if not isinstance(schedule, VPDiscrete):
            return pred.x0
        # TCDScheduler's last step: prev_timestep 0, so timestep_s = 0, and the sample stays at that timestep
        first = schedule.index_to_t(torch.zeros(pred.x0_64.shape[0], dtype=torch.float64))
        return ddim_step(pred, schedule, first)

    def vp_schedulers(self, cfg, grid, timesteps):
        from diffusers import TCDScheduler

        return _distillation_schedulers(TCDScheduler, cfg, grid, timesteps)


TRANSITIONS = {"ddim": DDIM, "renoise": Renoise, "cm": CM, "tcd": TCD, "flow_map": FlowMap}


def transition(spec) -> Transition:
    """A ``Transition`` from itself, a name (``"renoise"``) or a config mapping (``{"name": "tcd", "gamma": 0.3}``)."""
    if isinstance(spec, Transition):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TRANSITIONS:
        raise ValueError(f"transition must be one of {sorted(TRANSITIONS)}, got {name!r}")
    return TRANSITIONS[name](**spec)
