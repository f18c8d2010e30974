"""The project's own teacher and feature-network training (reproducible; seeds and settings recorded).

Teachers are trained with the standard denoising objective of Ho et al. (2020) in the v-parameterisation
(Salimans & Ho 2022, §4) on ``DEFAULT_SCHEDULER``; weights are an EMA of the iterates. This is pre-training, not
distillation, so it is a short dedicated loop rather than a method of the accelerate loop.

Entry points: ``stepdistill build-assets`` (the shipped digits teacher and digits classifier) and
``fit_vector_teacher`` (the MLP teacher of a ``teacher.gmm`` recipe, fitted once and cached).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_dir
from .denoisers import UNet2DDenoiser
from .mixture import GaussianMixture
from .parameterization import Coefficients, from_x0_eps
from .schedules import UniformIndex, VPDiscrete


@dataclass
class TeacherFit:
    """Settings of a teacher fit (all recorded next to the weights)."""

    steps: int = 3000
    batch_size: int = 512
    lr: float = 2e-3
    width: int = 64
    ema_decay: float = 0.995
    seed: int = 0


def train_denoiser(unet, sample_batch, scheduler_config: dict, *, steps: int, lr: float, ema_decay: float,
                   seed: int, desc: str = "teacher"):
    """Train ``unet`` with v-prediction MSE; ``sample_batch(generator) -> x0``. Returns the EMA copy (eval mode)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    schedule = VPDiscrete.from_scheduler_config(scheduler_config)
    denoiser = UNet2DDenoiser(unet, schedule, "v")  # raw() handles vector data and the backbone's timestep
    times = UniformIndex()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_at = lambda i: min(1.0, (i + 1) / 200) * 0.5 * (1 + torch.cos(torch.tensor(i / steps * torch.pi)).item())  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for i in bar:
        x0 = sample_batch(gen)
        t = times.sample(x0.shape[0], schedule, gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        v = from_x0_eps("v", x0.double(), eps.double(), Coefficients.at(schedule, t, x0)).float()
        loss = ((denoiser.raw(x_t, schedule.model_time(t), None) - v) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + i) / (10 + i))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        if i % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
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
    from .teachers import vector_unet

    torch.manual_seed(fit.seed)
    unet = vector_unet(mixture.dim, width=fit.width)
    ema = train_denoiser(unet, lambda g: mixture.sample(fit.batch_size, g)[0], scheduler_config, steps=fit.steps,
                         lr=fit.lr, ema_decay=fit.ema_decay, seed=fit.seed, desc="fit gmm teacher")
    _save_teacher(ema, scheduler_config, Path(folder), {"mixture": mixture.config(), "fit": asdict(fit)})
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(Path(folder) / "unet")  # the published copy: every rank uses the same one


# ----------------------------------------------------------------------------------------------------------------
# The shipped assets.

DIGITS_TEACHER = TeacherFit(steps=6000, batch_size=128, lr=1e-3, width=32, ema_decay=0.999, seed=0)
DIGITS_CLASSIFIER = {"steps": 3000, "batch_size": 128, "lr": 2e-3, "seed": 0}


def build_digits_teacher(folder: Path, fit: TeacherFit = DIGITS_TEACHER):
    """Train the embedded 8x8 digits teacher on all 1797 scikit-learn digits."""
    from .data import digits_tensor
    from .teachers import DEFAULT_SCHEDULER, digits_unet

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
