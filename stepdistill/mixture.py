"""An isotropic Gaussian mixture: exact samples, log-density and the exact denoiser E[x0 | x_t].

The ground truth that quality and correctness checks use (DESIGN.md §5, ``teacher.gmm``). For
``x_t = a x0 + s eps`` and component k ~ N(mu_k, std_k^2 I):

    x_t | k ~ N(a mu_k, (a^2 std_k^2 + s^2) I)
    E[x0 | x_t, k] = mu_k + a std_k^2 / (a^2 std_k^2 + s^2) (x_t - a mu_k)
    E[x0 | x_t] = sum_k r_k(x_t) E[x0 | x_t, k],   r_k ∝ w_k N(x_t; a mu_k, (a^2 std_k^2 + s^2) I)
"""

from __future__ import annotations

import math

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
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.expand(k).clone() if stds.ndim == 0 else stds
        weights = torch.ones(k) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if self.stds.shape != (k,) or weights.shape != (k,):
            raise ValueError(f"teacher.gmm: stds and weights need {k} entries, got {tuple(self.stds.shape)} and "
                             f"{tuple(weights.shape)}")
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
