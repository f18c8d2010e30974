"""Metrics: they separate good from bad samples in the ways the bars rely on."""

import numpy as np
import torch

from stepdistill.evaluate import digits_metrics, frechet_distance, gmm_metrics, sliced_wasserstein
from stepdistill.mixture import GaussianMixture


MIX = GaussianMixture([[0.7, 0.0], [-0.7, 0.0], [0.0, 0.7], [0.0, -0.7]], 0.06, [0.4, 0.3, 0.2, 0.1])


def test_gmm_metrics_reward_exact_samples_and_catch_dropped_or_smeared_modes():
    exact = gmm_metrics(MIX.sample(4000, torch.Generator().manual_seed(0))[0], MIX)
    assert exact["modes_covered"] == 4 and exact["fraction_near_a_mode"] > 0.99
    half = MIX.sample(4000, torch.Generator().manual_seed(1), labels=torch.tensor([0, 1] * 2000))[0]
    dropped = gmm_metrics(half, MIX)
    assert dropped["modes_covered"] == 2
    smeared = gmm_metrics(MIX.sample(4000, torch.Generator().manual_seed(2))[0] * 1.0
                          + 0.15 * torch.randn(4000, 2, generator=torch.Generator().manual_seed(3)), MIX)
    assert smeared["fraction_near_a_mode"] < 0.7
    assert smeared["log_likelihood"] < exact["log_likelihood"] - 1.0
    assert smeared["sliced_wasserstein"] > 2 * exact["sliced_wasserstein"]


def test_sliced_wasserstein_of_a_shift_is_the_projected_shift():
    x = torch.randn(5000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    sw = sliced_wasserstein(x + shift, x, projections=512)
    # For a pure shift, SW2^2 = E_theta[(theta . shift)^2] = |shift|^2 / d.
    assert abs(sw - 0.5 / np.sqrt(3)) < 0.02


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) * 2.0 + 1.0
    # |mu|^2 = 4; Tr(S1 + S2 - 2 sqrt(S1 S2)) = 4 * (1 + 4 - 2 * 2) = 4
    assert abs(frechet_distance(a, b) - 8.0) < 0.3
    assert frechet_distance(a, a) < 1e-6


def test_digits_metrics_on_real_digits_and_on_noise():
    from stepdistill.data import digits_tensor

    real, _ = digits_tensor()
    # A random half of the real digits is the floor (about 0.5 with 1000 samples).
    good = digits_metrics(real[torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:1000]])
    bad = digits_metrics(torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert good["classes_covered"] == 10 and good["frechet_distance"] < 1.0
    assert bad["frechet_distance"] > 20 * max(good["frechet_distance"], 0.05)
