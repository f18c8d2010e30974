"""Quality metrics (DESIGN.md §8), always beside the teacher's own sampler at the same NFE and at full NFE.

* Gaussian-mixture teachers, exact against the true mixture: mode coverage, mean log-likelihood of the samples under
  the mixture, and the sliced Wasserstein-2 distance to exact mixture samples.
* Digits: Frechet distance between classifier features of samples and of the 1797 real digits, and class coverage
  (classes that receive at least a quarter of their fair share of the samples).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .mixture import GaussianMixture
from .sampling import TEACHER_SAMPLERS, StudentGrid, nfe, prior_noise, sample_student


# ---------------------------------------------------------------------------------------------------------------
# Gaussian mixtures.


def sliced_wasserstein(x: torch.Tensor, ref: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between samples ``x [N, D]`` and ``ref [M, D]`` (quantile matching per direction)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = (x.double() @ dirs).sort(0).values  # [N, P]
    levels = (torch.arange(x.shape[0], dtype=torch.float64) + 0.5) / x.shape[0]
    pr = torch.quantile(ref.double() @ dirs, levels, dim=0)  # [N, P]
    return float(((px - pr) ** 2).mean().sqrt())


def gmm_metrics(x: torch.Tensor, mixture: GaussianMixture, *, reference_size: int = 20000, seed: int = 0) -> dict:
    """Exact metrics of samples ``x [N, D]`` against the true mixture."""
    from scipy.stats import chi2

    x = x.double().reshape(x.shape[0], -1)
    n, k, d = x.shape[0], mixture.num_modes, mixture.dim
    assign = mixture.responsibilities(x).argmax(1)
    dist = (x - mixture.means[assign]).norm(dim=1)
    # Within the 99.9% ball of its component (|x - mu| / std is chi-distributed with d degrees of freedom): exact
    # samples are "near" 99.9% of the time, while mass smeared between modes is not.
    near = dist <= mixture.stds[assign] * math.sqrt(chi2.ppf(0.999, d))
    counts = torch.bincount(assign[near], minlength=k).double()
    covered = counts >= 0.25 * mixture.weights * n
    ref = mixture.sample(reference_size, torch.Generator().manual_seed(seed + 99))[0]
    shares = torch.bincount(assign, minlength=k).double() / n
    return {
        "modes_covered": int(covered.sum()),
        "num_modes": k,
        "fraction_near_a_mode": float(near.double().mean()),
        "log_likelihood": float(mixture.log_prob(x).mean()),
        "sliced_wasserstein": sliced_wasserstein(x, ref, seed=seed),
        # mode weights (each sample to its most responsible component) against the true ones: the diversity that
        # reverse-KL students lose, 0.5 sum_k |p_k - w_k|
        "mode_weight_tv": float(0.5 * (shares - mixture.weights).abs().sum()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Digits.


@lru_cache(maxsize=1)
def digits_classifier():
    from safetensors.torch import load_file

    from .nets.digits_classifier import DigitsClassifier
    from .teachers import ASSETS

    net = DigitsClassifier()
    net.load_state_dict(load_file(str(ASSETS / "digits_classifier.safetensors")))
    return net.eval()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017), via a symmetric square root."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root1 = linalg.sqrtm(s1).real
    cross = linalg.sqrtm(root1 @ s2 @ root1).real  # (S1^1/2 S2 S1^1/2)^1/2 has the same trace as (S1 S2)^1/2
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


@torch.no_grad()
def digits_metrics(x: torch.Tensor) -> dict:
    """Frechet distance to the real digits in classifier-feature space, and class coverage."""
    from .data import digits_tensor

    net = digits_classifier()
    x = x.float().clamp(-1, 1).cpu()
    real, _ = digits_tensor()
    f_fake, f_real = net.features(x).numpy().astype(np.float64), net.features(real).numpy().astype(np.float64)
    labels = net.head(net.features(x)).argmax(1)
    counts = torch.bincount(labels, minlength=10)
    return {
        "frechet_distance": frechet_distance(f_fake, f_real),
        "classes_covered": int((counts >= 0.25 * x.shape[0] / 10).sum()),
        "class_counts": counts.tolist(),
    }


# ---------------------------------------------------------------------------------------------------------------


def sample_metrics(x: torch.Tensor, teacher) -> dict:
    if teacher.mixture is not None:  # in the data's own coordinates (teacher.gmm.normalize)
        return gmm_metrics(teacher.to_data(x), teacher.data_mixture or teacher.mixture)
    if tuple(teacher.sample_shape) == (1, 8, 8):
        return digits_metrics(x)
    return {"mean": float(x.mean()), "std": float(x.std())}  # no reference distribution for other teachers


def noise_batches(num: int, shape, seed: int, batch: int = 1000):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, num, batch):
        yield torch.randn(min(batch, num - start), *shape, generator=g)


@torch.no_grad()
def teacher_samples(teacher, steps: int, *, sampler: str, num: int, seed: int) -> torch.Tensor:
    den = teacher.denoiser
    times = den.schedule.grid(steps)
    fn = TEACHER_SAMPLERS[sampler]
    return torch.cat([fn(den, prior_noise(den.schedule, z), times) for z in noise_batches(num, teacher.sample_shape,
                                                                                             seed)])


@torch.no_grad()
def student_samples(student, grid: StudentGrid, *, shape, num: int, seed: int,
                    conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``num`` student samples from seeded noise; with a prompt table, sample i uses prompt i (cycled)."""
    g = torch.Generator().manual_seed(seed + 1)  # the fresh noise of re-noising grids, reproducible too
    out, start = [], 0
    for z in noise_batches(num, shape, seed):
        cond = None
        if conditions is not None:
            rows = torch.arange(start, start + z.shape[0]) % next(iter(conditions.values())).shape[0]
            cond = {k: v[rows] for k, v in conditions.items()}
        out.append(sample_student(student, z, grid, cond=cond, generator=g))
        start += z.shape[0]
    return torch.cat(out)


def evaluate(student, grid: StudentGrid, teacher, *, num_samples: int = 1000, seed: int = 1234,
             teacher_sampler: str = "ddim", full_steps: int = 64) -> dict:
    """Student metrics beside the teacher's sampler at the student's NFE and at ``full_steps``."""
    was_training = student.training
    student.eval()
    same_steps = grid.steps if teacher_sampler != "heun" else max(1, (grid.steps + 1) // 2)
    out = {
        "student": {"nfe": grid.steps, **sample_metrics(
            student_samples(student, grid, shape=teacher.sample_shape, num=num_samples, seed=seed), teacher)},
        "teacher_same_nfe": {"nfe": nfe(teacher_sampler, same_steps), "sampler": teacher_sampler, **sample_metrics(
            teacher_samples(teacher, same_steps, sampler=teacher_sampler, num=num_samples, seed=seed), teacher)},
        "teacher_full": {"nfe": nfe(teacher_sampler, full_steps), "sampler": teacher_sampler, **sample_metrics(
            teacher_samples(teacher, full_steps, sampler=teacher_sampler, num=num_samples, seed=seed), teacher)},
        "num_samples": num_samples,
    }
    student.train(was_training)
    return out
