"""An isotropic Gaussian mixture: exact samples, log-density and the exact denoiser E[x0 | x_t].

The ground truth that quality and correctness checks use (DESIGN.md §5, ``teacher.gmm``). For
``x_t = a x0 + s eps`` and component k ~ N(mu_k, std_k^2 I):

    x_t | k ~ N(a mu_k, (a^2 std_k^2 + s^2) I)
    E[x0 | x_t, k] = mu_k + a std_k^2 / (a^2 std_k^2 + s^2) (x_t - a mu_k)
    E[x0 | x_t] = sum_k r_k(x_t) E[x0 | x_t, k],   r_k ∝ w_k N(x_t; a mu_k, (a^2 std_k^2 + s^2) I)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class GaussianMixture:
    """K isotropic Gaussians in D dimensions.

    Args:
        means: ``[K, D]`` component means.
        stds: ``[K]`` per-component standard deviations.
        weights: ``[K]`` mixture weights (normalised here).
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"teacher.gmm.means must be a list of K points of one dimension, got {self.means.shape}")
        k = self.means.shape[0]
        if k == 0 or self.means.shape[1] == 0:
            raise ValueError("teacher.gmm.means must hold at least one point of dimension >= 1")
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.expand(k).clone() if stds.ndim == 0 else stds
        weights = torch.ones(k) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if self.stds.shape != (k,) or weights.shape != (k,):
            raise ValueError(f"teacher.gmm: stds and weights need {k} entries, got {tuple(self.stds.shape)} and "
                             f"{tuple(weights.shape)}")
        for name, value in (("means", self.means), ("stds", self.stds), ("weights", weights)):
            if not torch.isfinite(value).all():
                raise ValueError(f"teacher.gmm.{name} must be finite numbers, got {value.tolist()}")
        if (weights <= 0).any() or (self.stds <= 0).any():
            raise ValueError("teacher.gmm: weights and stds must be positive")
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, *, labels: torch.Tensor | None = None):
        """``(x [n, D] float32, labels [n])``; ``labels`` fixes the components when given."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels, None] * noise
        return x.float(), labels

    def _component_logpdf(self, x: torch.Tensor, a, s) -> torch.Tensor:
        """``log N(x; a mu_k, (a^2 std_k^2 + s^2) I)`` for every k: ``[B, K]``."""
        x = x.double().reshape(x.shape[0], -1)
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1)
        var = a**2 * self.stds[None] ** 2 + s**2  # [B, K]
        sq = (x**2).sum(1, keepdim=True)  # |x|^2, [B, 1] (cdist has no forward-mode derivative: jvp needs one)
        # |x - a mu|^2 expanded, then per-sample scale a
        cross = x @ self.means.T  # [B, K]
        dist2 = sq - 2 * a * cross + a**2 * (self.means**2).sum(1)[None]
        return -0.5 * dist2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of clean samples ``[B, D]`` under the mixture."""
        lp = self._component_logpdf(x, 1.0, 0.0) + torch.log(self.weights)[None]
        return torch.logsumexp(lp, dim=1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities of clean samples, ``[B, K]``."""
        lp = self._component_logpdf(x, 1.0, 0.0) + torch.log(self.weights)[None]
        return torch.softmax(lp, dim=1)

    def denoise(self, x_t: torch.Tensor, a, s, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``E[x0 | x_t]`` (float64) for per-sample ``a, s`` of shape ``[B]``; per-component if ``labels``."""
        x = x_t.double().reshape(x_t.shape[0], -1)
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1)
        logits = self._component_logpdf(x, a, s) + torch.log(self.weights)[None]
        if labels is not None:
            # Condition on component k; the label ``num_modes`` (the null class) keeps the whole mixture.
            labels = labels.reshape(-1).long()
            keep = labels < self.num_modes
            mask = torch.full_like(logits, -math.inf)
            mask[keep] = mask[keep].scatter(1, labels[keep, None], 0.0)
            mask[~keep] = 0.0
            logits = logits + mask
        r = torch.softmax(logits, dim=1)  # [B, K]
        var = self.stds[None] ** 2  # [1, K]
        gain = a * var / (a**2 * var + s**2)  # [B, K]
        # E[x0|x_t,k] = mu_k + gain_k (x_t - a mu_k) = (1 - a gain_k) mu_k + gain_k x_t
        mean_k = (1 - a * gain)[..., None] * self.means[None] + gain[..., None] * x[:, None, :]  # [B, K, D]
        return (r[..., None] * mean_k).sum(1).reshape(x_t.shape)

    def config(self) -> dict:
        return {"means": self.means.tolist(), "stds": self.stds.tolist(), "weights": self.weights.tolist()}


#: how far out (in stds) a mode's samples are counted as part of the data's range: P(|N(0,1)| > 4) = 6e-5
RANGE_STDS = 4.0


@dataclass(frozen=True)
class DataMap:
    """The affine map between data coordinates and the model's, ``x_model = (x_data - shift) / scale``: one scale for
    every dimension (isotropic modes stay isotropic) and a shift per dimension.

    The stock ``DDPMPipeline`` clamps its output to [-1, 1] (``(image / 2 + 0.5).clamp(0, 1)``, not a scheduler
    setting), so a vector teacher whose data reach outside it is trained on the mapped mixture, and the map is
    recorded with the export (issue: data outside [-1, 1])."""

    shift: tuple[float, ...]
    scale: float

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not any(self.shift)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor(self.shift, dtype=torch.float64)
        return ((x.double() - shift) / self.scale).to(x.dtype)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor(self.shift, dtype=torch.float64)
        return (x.double() * self.scale + shift).to(x.dtype)

    def mixture(self, data: GaussianMixture) -> GaussianMixture:
        """``data`` in model coordinates."""
        shift = torch.tensor(self.shift, dtype=torch.float64)
        return GaussianMixture((data.means - shift) / self.scale, data.stds / self.scale, data.weights)

    def config(self) -> dict:
        return {"scale": self.scale, "shift": list(self.shift)}


def data_range(mixture: GaussianMixture, stds: float = RANGE_STDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension ``(low, high)`` of the mixture: every mode's mean -+ ``stds`` of its std."""
    spread = stds * mixture.stds[:, None]
    return (mixture.means - spread).min(0).values, (mixture.means + spread).max(0).values


def fit_data_map(mixture: GaussianMixture) -> DataMap:
    """The map that puts the mixture's range (``data_range``) inside [-1, 1]: the identity where it is already inside
    (the shipped mixtures, whose fitted teachers and figures stay as they were); else the range's centre to 0 and its
    widest half-width to 1."""
    low, high = data_range(mixture)
    if bool((low >= -1).all() and (high <= 1).all()):
        return DataMap(shift=(0.0,) * mixture.dim, scale=1.0)
    centre, half = (low + high) / 2, float(((high - low) / 2).max())
    return DataMap(shift=tuple(centre.tolist()), scale=half)
