"""The Gaussian-mixture oracle: E[x0 | x_t] against Monte Carlo and Tweedie's formula, the per-component posterior,
the log-density, sampling, and the ``GMMDenoiser`` adapter."""

import math

import pytest
import torch
from torch import distributions as D

from stepdistill.denoisers import GMMDenoiser
from stepdistill.mixture import GaussianMixture
from stepdistill.schedules import RectifiedFlow, VPCosine, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER


pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
MEANS = [[-2.0, 0.0], [1.5, 1.0], [0.5, -2.5]]
STDS = [0.3, 0.6, 0.15]
WEIGHTS = [5.0, 3.0, 2.0]  # normalised to 0.5, 0.3, 0.2


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture(MEANS, STDS, WEIGHTS)


def _reference(gmm) -> D.MixtureSameFamily:
    comp = D.Independent(D.Normal(gmm.means, gmm.stds[:, None].expand_as(gmm.means)), 1)
    return D.MixtureSameFamily(D.Categorical(probs=gmm.weights), comp)


def _marginal_log_density(gmm, x, a, s):
    """log p_t(x) for x_t = a x0 + s eps, written out directly: a mixture of N(a mu_k, (a^2 std_k^2 + s^2) I)."""
    scale = (a**2 * gmm.stds**2 + s**2).sqrt()[:, None].expand_as(gmm.means)
    comp = D.Independent(D.Normal(a * gmm.means, scale), 1)
    return D.MixtureSameFamily(D.Categorical(probs=gmm.weights), comp).log_prob(x)


POINTS = torch.tensor([[0.0, 0.0], [-1.5, 0.5], [1.0, -1.0], [2.0, 2.0], [0.4, -2.2]], dtype=F64)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.75])
def test_denoise_matches_monte_carlo_posterior_mean(gmm, t):
    """E[x0 | x_t] by self-normalised importance sampling: prior samples weighted by N(x_t; a x0, s^2 I)."""
    sch = VPCosine()
    a, s = sch.alpha(t).item(), sch.sigma(t).item()
    exact = gmm.denoise(POINTS, torch.full((5,), a), torch.full((5,), s))
    x0, _ = gmm.sample(200_000, torch.Generator().manual_seed(0))
    x0 = x0.double()
    logw = -0.5 * ((POINTS[:, None, :] - a * x0[None]) ** 2).sum(-1) / s**2  # [P, M]
    w = torch.softmax(logw, dim=1)
    estimate = w @ x0
    # standard error of a self-normalised estimate: sqrt(posterior variance / effective sample size)
    ess = 1.0 / (w**2).sum(1, keepdim=True)
    stderr = ((w @ x0**2 - estimate**2).clamp(min=0) / ess).sqrt()
    assert (ess > 300).all()
    assert ((estimate - exact).abs() <= 5 * stderr + 1e-3).all(), (estimate, exact, stderr)
    assert (estimate - exact).abs().max().item() < 0.05


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_denoise_is_tweedie(gmm, t):
    """E[x0 | x_t] = (x_t + s^2 grad log p_t(x_t)) / a with p_t the noised mixture's density."""
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    a, s = sch.alpha(t), sch.sigma(t)
    x = (POINTS * a).requires_grad_(True)
    (grad,) = torch.autograd.grad(_marginal_log_density(gmm, x, a, s).sum(), x)
    exact = gmm.denoise(x.detach(), a.expand(5), s.expand(5))
    torch.testing.assert_close(exact, (x.detach() + s**2 * grad) / a, rtol=1e-9, atol=1e-9)


def test_denoise_with_labels_is_the_component_posterior(gmm):
    a = torch.tensor([0.9, 0.6, 0.3, 0.95, 0.5], dtype=F64)
    s = (1 - a**2).sqrt()
    x = POINTS
    labels = torch.tensor([0, 1, 2, 1, 3])  # 3 = the null class: the whole mixture
    got = gmm.denoise(x, a, s, labels=labels)
    for i, k in enumerate(labels.tolist()):
        if k == gmm.num_modes:
            expected = gmm.denoise(x[i:i + 1], a[i:i + 1], s[i:i + 1])[0]
        else:
            mu, var = gmm.means[k], gmm.stds[k] ** 2
            expected = mu + a[i] * var / (a[i] ** 2 * var + s[i] ** 2) * (x[i] - a[i] * mu)
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)


def test_denoise_limits(gmm):
    # at sigma -> 0 the denoiser returns its input; at alpha = 0 it returns the mixture mean
    x = POINTS
    torch.testing.assert_close(gmm.denoise(x, torch.ones(5), torch.full((5,), 1e-9)), x, rtol=0, atol=1e-8)
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    torch.testing.assert_close(gmm.denoise(x, torch.zeros(5), torch.ones(5)), mean.expand(5, 2), rtol=0, atol=1e-12)


def test_log_prob_matches_torch_distributions(gmm):
    x = torch.cat([POINTS, gmm.sample(100, torch.Generator().manual_seed(1))[0].double()])
    torch.testing.assert_close(gmm.log_prob(x), _reference(gmm).log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gmm.log_prob(x.float()), _reference(gmm).log_prob(x.float().double()))


def test_log_prob_integrates_to_one(gmm):
    h = 0.02
    axis = torch.arange(-6.0, 6.0, h, dtype=F64) + h / 2
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    assert (gmm.log_prob(grid).exp().sum() * h * h).item() == pytest.approx(1.0, abs=1e-4)


def test_responsibilities_are_bayes_rule(gmm):
    x = POINTS
    joint = torch.stack([math.log(w) + D.Independent(D.Normal(mu, sd), 1).log_prob(x)
                         for w, mu, sd in zip(gmm.weights.tolist(), gmm.means, gmm.stds)], dim=1)
    torch.testing.assert_close(gmm.responsibilities(x), torch.softmax(joint, 1), rtol=1e-10, atol=1e-12)


def test_sample_follows_weights_means_and_stds(gmm):
    x, labels = gmm.sample(40_000, torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 2) and x.dtype == torch.float32
    freq = torch.bincount(labels, minlength=3).double() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2], dtype=F64), rtol=0, atol=0.01)
    for k in range(3):
        xk = x[labels == k].double()
        torch.testing.assert_close(xk.mean(0), gmm.means[k], rtol=0, atol=0.02)
        torch.testing.assert_close(xk.std(0), gmm.stds[k].expand(2), rtol=0.03, atol=0)
    fixed = torch.full((50,), 2)
    x2, labels2 = gmm.sample(50, torch.Generator().manual_seed(0), labels=fixed)
    assert (labels2 == 2).all() and (gmm.responsibilities(x2).argmax(1) == 2).all()


def test_constructor_validates_and_normalises():
    g = GaussianMixture([[0.0], [1.0]], 0.5)
    assert g.stds.tolist() == [0.5, 0.5] and g.weights.tolist() == [0.5, 0.5]
    assert g.dim == 1 and g.num_modes == 2
    assert g.config() == {"means": [[0.0], [1.0]], "stds": [0.5, 0.5], "weights": [0.5, 0.5]}
    with pytest.raises(ValueError):
        GaussianMixture([0.0, 1.0], 0.5)  # means must be [K, D]
    with pytest.raises(ValueError):
        GaussianMixture([[0.0], [1.0]], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError):
        GaussianMixture([[0.0], [1.0]], 0.5, [1.0, 0.0])
    with pytest.raises(ValueError):
        GaussianMixture([[0.0], [1.0]], [0.5, -0.1])


# ---------------------------------------------------------------------------------------------------------------
# GMMDenoiser


@pytest.mark.parametrize("schedule", [VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER), RectifiedFlow(shift=3.0)],
                         ids=["vp_default", "rf_shift3"])
def test_gmm_denoiser_returns_the_exact_posterior_mean(gmm, schedule):
    den = GMMDenoiser(gmm, schedule)
    assert den.prediction == "x0"
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    x = POINTS.float()
    pred = den(x, t)
    a, s = schedule.alpha(t), schedule.sigma(t)
    x0 = gmm.denoise(x, a, s)
    torch.testing.assert_close(pred.x0_64, x0, rtol=0, atol=0)
    assert pred.x0.dtype == pred.eps.dtype == torch.float32
    # eps is the one consistent with x_t = a x0 + s eps
    torch.testing.assert_close(a[:, None] * pred.x0_64 + s[:, None] * pred.eps_64, x.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.eps_64, (x.double() - a[:, None] * x0) / s[:, None], rtol=1e-12, atol=1e-12)
    # a scalar time is broadcast over the batch
    torch.testing.assert_close(den(x, torch.tensor(0.5, dtype=F64)).x0_64, gmm.denoise(x, a[2].expand(5),
                                                                                     s[2].expand(5)))


def test_gmm_denoiser_conditions_on_the_component(gmm):
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    den = GMMDenoiser(gmm, sch)
    t = torch.full((5,), 0.6, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 3])
    pred = den(POINTS, t, {"class_labels": labels})
    a, s = sch.alpha(t), sch.sigma(t)
    torch.testing.assert_close(pred.x0_64, gmm.denoise(POINTS, a, s, labels=labels), rtol=0, atol=0)
    null = den.null_cond({"class_labels": labels})["class_labels"]
    assert (null == gmm.num_modes).all()
    torch.testing.assert_close(den(POINTS, t, {"class_labels": null}).x0_64, den(POINTS, t).x0_64)
