"""The project's own teacher and feature-network training (reproducible; seeds and settings recorded).

Teachers are trained with the standard denoising objective of Ho et al. (2020) in the v-parameterisation
(Salimans & Ho 2022, §4) on ``DEFAULT_SCHEDULER``; weights are an EMA of the iterates. This is pre-training, not
distillation, so it is a short dedicated loop rather than a method of the accelerate loop.

Entry points: ``stepdistill build-assets`` (the shipped digits teacher and digits classifier) and
``fit_vector_teacher`` (the MLP teacher of a ``teacher.gmm`` recipe, fitted once and cached). The MLP teacher departs
from the plain objective in what it is fitted to and where (``TeacherFit``: the mixture's exact posterior mean, at
log-normal noise levels), and trains its ``UNet2DModel`` as the MLP it is (``PointwiseView``); the result is the same
stock model.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from tqdm import tqdm

from .atomic import atomic_dir
from .backbones import DEFAULT_SCHEDULER, digits_unet, vector_unet
from .denoisers import UNet2DDenoiser
from .mixture import GaussianMixture
from .parameterization import Coefficients, from_x0_eps
from .schedules import NoiseSchedule, UniformIndex, VPDiscrete


@dataclass
class DenoiserFit:
    """Settings of a denoiser fit (recorded next to the weights): the digits teacher's, and ``TeacherFit``'s base."""

    steps: int = 3000
    batch_size: int = 512
    lr: float = 2e-3
    width: int = 64
    ema_decay: float = 0.995
    seed: int = 0


@dataclass
class TeacherFit(DenoiserFit):
    """Settings of the MLP teacher of ``teacher.gmm`` (``denoiser: mlp``); a recipe's ``fit:`` overrides them.

    The defaults are one setting for every dimension, chosen with ``benchmarks/teacher_fit.py`` on seed 0 of the
    ``benchmarks/mixtures.py`` families (seeds 1 and 2 held out); the numbers are in that script's docstring.

    Attributes:
        layers, time_dim: ``vector_unet``'s ``layers`` (resnets per block) and time-embedding width (``None``: the
            ``width``).
        times, p_mean, p_std: the training density of noise levels. ``lognormal``: ``ln(sigma/alpha) ~ N(p_mean,
            p_std^2)`` on the schedule's indices (``LogNormalIndex``; the EDM density, Karras et al. 2022 §5, whose
            own -1.2 / 1.2 did as well within about 0.01 of fraction near a mode), where a mixture of narrow modes is
            decided and sharpened; ``uniform``: every index alike (Ho et al. 2020), which spends about half of the
            batch at ``sigma/alpha > 3``, where the denoiser is nearly the mixture's mean.
        target: ``posterior`` regresses onto the mixture's exact ``E[x0 | x_t]`` (``GaussianMixture.denoise``);
            ``sample`` onto the drawn ``x0``, the usual denoising objective. Both have the same minimiser, the
            posterior mean, but the posterior target has no label noise (the conditional variance of ``x0`` given
            ``x_t``): it is the Rao-Blackwellised target that "stable target field" training estimates from a
            reference batch (Xu et al. 2023, ICLR), computed exactly here because the mixture is known in closed
            form. At equal steps it took the 25-mode grid from 0.88 to 0.94 of samples near a mode.

    ``fit: {steps: 3000, batch_size: 512, lr: 2.0e-3, layers: 1, time_dim: 256, times: uniform, target: sample}``
    is the fit before these defaults (the same training, up to float rounding).
    """

    steps: int = 2000
    batch_size: int = 1024
    lr: float = 3e-3
    layers: int = 1
    time_dim: int | None = None
    times: str = "lognormal"
    p_mean: float = -1.6
    p_std: float = 1.4
    target: str = "posterior"

    def __post_init__(self):
        if self.target not in ("posterior", "sample"):
            raise ValueError(f"fit.target must be 'posterior' or 'sample', got {self.target!r}")
        if self.times not in ("lognormal", "uniform"):
            raise ValueError(f"fit.times must be 'lognormal' or 'uniform', got {self.times!r}")


@dataclass(frozen=True)
class LogNormalIndex:
    """``schedules.LogNormalSigma``'s density discretised onto the ``N`` indices of a ``VPDiscrete`` schedule.

    Index ``n`` gets the normal mass of its cell on the ``ln(sigma/alpha)`` axis (cell edges halfway between
    neighbouring indices), renormalised over the schedule's range. Drawing whole indices trains a discrete-time
    teacher only where it is later evaluated, and a precomputed pmf avoids ``LogNormalSigma``'s bisection per draw.
    """

    p_mean: float = -1.2
    p_std: float = 1.2

    def pmf(self, schedule: VPDiscrete) -> torch.Tensor:
        """``[N]`` float64 probabilities, one per index."""
        if not isinstance(schedule, VPDiscrete):
            raise ValueError(f"LogNormalIndex needs a vp_discrete schedule, got {schedule.kind}")
        t = schedule.index_to_t(torch.arange(schedule.num_train_timesteps))
        log_sigma = torch.log(schedule.sigma(t) / schedule.alpha(t))  # increasing in the index
        mid = (log_sigma[1:] + log_sigma[:-1]) / 2
        edges = torch.cat([2 * log_sigma[:1] - mid[:1], mid, 2 * log_sigma[-1:] - mid[-1:]])
        mass = torch.special.ndtr((edges - self.p_mean) / self.p_std).diff()
        return mass / mass.sum()

    def sample(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
        cached = self.__dict__.get("_pmf")  # one schedule per fit: the pmf is computed once, not per batch
        if cached is None or cached[0] is not schedule:
            cached = (schedule, self.pmf(schedule))
            object.__setattr__(self, "_pmf", cached)
        idx = torch.multinomial(cached[1], n, replacement=True, generator=generator)
        return schedule.index_to_t(idx)


class PointwiseView:
    """Train a ``vector_unet`` as the MLP it is on 1x1 inputs: each convolution as a matrix product of its centre tap.

    A stride-1 convolution zero-padded by half its kernel reads only its centre tap on a 1x1 input, so ``F.linear``
    with that tap gives the same output at 1/9 of a 3x3 kernel's FLOPs and without mkldnn's per-call overhead.
    ``GroupNorm(1, C)`` on ``[B, C, 1, 1]`` is ``layer_norm`` over ``C`` with the same affine parameters. The centre
    taps are trained as leaves of their own (``params``, laid out as ``names``), so the optimiser, the gradient
    clipping and the EMA skip the 8/9 of each kernel that never receives a gradient (with zero gradients and no
    weight decay AdamW would leave them unchanged anyway, so the training is that of the full network).

    Only the modules' ``forward`` is replaced, and only inside ``with``; leaving it writes the trained taps back,
    and ``write`` puts any values laid out as ``params`` (the EMA's) into a copy of the network. What is saved is a
    stock ``UNet2DModel``.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.convs = {name: m for name, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and _pointwise(m)}
        self.norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm) and m.num_groups == 1]
        taps = [torch.nn.Parameter(_centre(m.weight).detach().clone()) for m in self.convs.values()]
        tapped = [f"{name}.weight" for name in self.convs]
        rest = [(n, p) for n, p in unet.named_parameters() if n not in set(tapped)]
        self.names = [*tapped, *(n for n, _ in rest)]
        self.params = [*taps, *(p for _, p in rest)]
        self._taps = dict(zip(self.convs, taps))

    def __enter__(self) -> PointwiseView:
        for name, m in self.convs.items():
            m.forward = partial(_linear_conv, m, self._taps[name])
        for m in self.norms:
            m.forward = partial(_layer_norm, m)
        return self

    def __exit__(self, *exc) -> None:
        for m in [*self.convs.values(), *self.norms]:
            del m.forward  # back to the class's forward
        self.write(self.unet, self.params)

    @torch.no_grad()
    def write(self, model: torch.nn.Module, values) -> None:
        """Copy ``values`` (laid out as ``params``) into ``model``: this network or a copy of it."""
        own = dict(model.named_parameters())
        for i, (name, value) in enumerate(zip(self.names, values)):
            (_centre(own[name]) if i < len(self._taps) else own[name]).copy_(value)


def _pointwise(conv: torch.nn.Conv2d) -> bool:
    """Whether ``conv`` reads only its centre tap on a 1x1 input (stride 1, odd kernel, 'same' zero padding)."""
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding)))


def _centre(weight: torch.Tensor) -> torch.Tensor:
    return weight[:, :, weight.shape[2] // 2, weight.shape[3] // 2]


def _linear_conv(conv: torch.nn.Conv2d, tap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] != (1, 1):
        raise ValueError(f"PointwiseView needs 1x1 inputs, got {tuple(x.shape)}")
    return F.linear(x.flatten(1), tap, conv.bias)[:, :, None, None]


def _layer_norm(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] != (1, 1):
        raise ValueError(f"PointwiseView needs 1x1 inputs, got {tuple(x.shape)}")
    return F.layer_norm(x.flatten(1), (norm.num_channels,), norm.weight, norm.bias, norm.eps)[:, :, None, None]


def train_denoiser(unet, sample_batch, scheduler_config: dict, *, steps: int, lr: float, ema_decay: float,
                   seed: int, desc: str = "teacher", times=None, posterior=None, pointwise: bool = False):
    """Train ``unet`` with v-prediction MSE; ``sample_batch(generator) -> x0``. Returns the EMA copy (eval mode).

    Args:
        times: the density of training times (``UniformIndex()`` when ``None``: every index alike, Ho et al. 2020).
        posterior: ``posterior(x_t, a, s) -> E[x0 | x_t]`` (``a, s``: ``[B]``) to regress onto in place of the
            drawn ``x0`` (``TeacherFit.target``); ``None``: the drawn ``x0``.
        pointwise: train through a ``PointwiseView`` (a ``vector_unet`` on ``[B, D, 1, 1]`` data).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    schedule = VPDiscrete.from_scheduler_config(scheduler_config)
    denoiser = UNet2DDenoiser(unet, schedule, "v")  # raw() handles vector data and the backbone's timestep
    times = UniformIndex() if times is None else times
    view = PointwiseView(unet) if pointwise else None
    params = view.params if view else list(unet.parameters())
    # fused: one C++ loop over the view's many small tensors (measured: 10-20% of a vector step at batch 512-128)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **({"fused": True} if view else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(  # 200 steps of linear warm-up, then cosine decay to 0
        opt, lambda i: min(1.0, (i + 1) / 200) * 0.5 * (1 + torch.cos(torch.tensor(i / steps * torch.pi)).item()))
    ema = copy.deepcopy(unet).requires_grad_(False)
    ema_params = [p.detach().clone() for p in params] if view else list(ema.parameters())
    unet.train()
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    with view or nullcontext():
        for i in bar:
            x0 = sample_batch(gen)
            t = times.sample(x0.shape[0], schedule, gen)
            eps = torch.randn(x0.shape, generator=gen)
            x_t = schedule.add_noise(x0, eps, t)
            coeffs = Coefficients.at(schedule, t, x0)
            if posterior is None:
                v = from_x0_eps("v", x0.double(), eps.double(), coeffs)
            else:  # E[v | x_t] from E[x0 | x_t]: v = a eps - s x0 is linear in (x0, eps) given x_t
                x0_mean = posterior(x_t, coeffs.a.flatten(), coeffs.s.flatten())
                v = from_x0_eps("v", x0_mean, (x_t.double() - coeffs.a * x0_mean) / coeffs.s, coeffs)
            loss = ((denoiser.raw(x_t, schedule.model_time(t), None) - v.float()) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - min(ema_decay, (1 + i) / (10 + i)))
            if i % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    if view:
        view.write(ema, ema_params)
    return ema.eval()


def _save_teacher(unet, scheduler_config: dict, folder: Path, record: dict, *, replace: bool = False) -> None:
    """Write the teacher folder whole or not at all (``atomic.py``).

    Several ranks may fit the same (fingerprinted) teacher at once when the cache is empty; the first folder
    published wins and the others drop their copy. ``replace`` (rebuilding the shipped assets) swaps an existing
    folder out, as does an incomplete folder that an older version left behind.
    """
    from diffusers import DDPMScheduler

    incomplete = folder.exists() and not (folder / "unet" / "config.json").exists()
    with atomic_dir(folder, replace=replace or incomplete) as tmp:
        unet.save_pretrained(tmp / "unet")
        DDPMScheduler.from_config(scheduler_config).save_pretrained(tmp / "scheduler")
        (tmp / "training.json").write_text(json.dumps(record, indent=2))


def fit_vector_teacher(mixture: GaussianMixture, fit: TeacherFit, scheduler_config: dict, folder: Path):
    """Fit the MLP teacher of a Gaussian mixture and cache it in ``folder``."""
    torch.manual_seed(fit.seed)
    unet = vector_unet(mixture.dim, width=fit.width, layers=fit.layers, time_dim=fit.time_dim or fit.width)
    ema = train_denoiser(unet, lambda g: mixture.sample(fit.batch_size, g)[0], scheduler_config, steps=fit.steps,
                         lr=fit.lr, ema_decay=fit.ema_decay, seed=fit.seed, desc="fit gmm teacher",
                         times=LogNormalIndex(fit.p_mean, fit.p_std) if fit.times == "lognormal" else UniformIndex(),
                         pointwise=True,
                         posterior=mixture.denoise if fit.target == "posterior" else None)
    _save_teacher(ema, scheduler_config, Path(folder), {"mixture": mixture.config(), "fit": asdict(fit)})
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(Path(folder) / "unet")  # the published copy: every rank uses the same one


# ----------------------------------------------------------------------------------------------------------------
# The shipped assets.

DIGITS_TEACHER = DenoiserFit(steps=6000, batch_size=128, lr=1e-3, width=32, ema_decay=0.999, seed=0)
DIGITS_CLASSIFIER = {"steps": 3000, "batch_size": 128, "lr": 2e-3, "seed": 0}


def build_digits_teacher(folder: Path, fit: DenoiserFit = DIGITS_TEACHER):
    """Train the embedded 8x8 digits teacher on all 1797 scikit-learn digits."""
    from .data import digits_tensor
    x, _ = digits_tensor()
    torch.manual_seed(fit.seed)
    unet = digits_unet(width=fit.width)
    ema = train_denoiser(unet, lambda g: x[torch.randint(0, x.shape[0], (fit.batch_size,), generator=g)],
                         DEFAULT_SCHEDULER, steps=fit.steps, lr=fit.lr, ema_decay=fit.ema_decay, seed=fit.seed,
                         desc="digits teacher")
    _save_teacher(ema, DEFAULT_SCHEDULER, Path(folder),
                  {"data": "sklearn.datasets.load_digits (1797 images, 8x8, scaled to [-1, 1])", "fit": asdict(fit),
                   "command": "stepdistill build-assets"}, replace=True)
    return ema


def build_digits_classifier(path: Path, settings: dict = DIGITS_CLASSIFIER):
    """Train the small CNN whose penultimate features the digits Frechet distance uses."""
    from safetensors.torch import save_file

    from .data import digits_tensor
    from .nets.digits_classifier import DigitsClassifier

    x, y = digits_tensor()
    g = torch.Generator().manual_seed(settings["seed"])
    torch.manual_seed(settings["seed"])
    perm = torch.randperm(x.shape[0], generator=g)
    train, held = perm[:1500], perm[1500:]
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=1e-4)
    for i in tqdm(range(settings["steps"]), desc="digits classifier", mininterval=2.0):
        idx = train[torch.randint(0, train.numel(), (settings["batch_size"],), generator=g)]
        # Light augmentation: additive noise, so features stay meaningful on imperfect samples.
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
        loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[held]).argmax(1) == y[held]).float().mean().item()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(path), metadata={"held_out_accuracy": f"{acc:.4f}",
                                                     "settings": json.dumps(settings)})
    return net, acc
