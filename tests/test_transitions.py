"""Transitions of the student rollout (DDIM, re-noise, CM, TCD), their stock schedulers, noise travel, and students of
several experts."""

import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler

from stepdistill.denoisers import GMMDenoiser, UNet2DDenoiser
from stepdistill.export import grid_timesteps, student_scheduler
from stepdistill.mixture import GaussianMixture
from stepdistill.sampling import Piecewise, StudentGrid, sample_student
from stepdistill.schedules import RectifiedFlow, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER, tiny_unet2d
from stepdistill.transitions import CM, DDIM, TCD, Renoise, noise_travel, transition

from .conftest import SD_SCHEDULER


pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return UNet2DDenoiser(tiny_unet2d().eval().requires_grad_(False),
                          VPDiscrete.from_scheduler_config(SD_SCHEDULER), "eps")


def _grid(schedule, steps, move):
    return StudentGrid(tuple(float(t) for t in schedule.grid(steps)[:-1]), transition=move)


def _seeded(student, grid, noise, seed=5):
    return sample_student(student, noise, grid, generator=torch.Generator().manual_seed(seed))


def test_tcd_spans_ddim_and_renoising(student):
    """TCD's gamma runs from deterministic DDIM chaining (0) to denoise-and-re-noise (1) (Zheng et al. 2024, §4.3);
    CM with sigma_min = 0 is the plain re-noise."""
    sch = student.schedule
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ddim = _seeded(student, _grid(sch, 4, "ddim"), noise)
    tcd0 = _seeded(student, _grid(sch, 4, TCD(0.0)), noise)
    # TCD's last step stays at timestep 0 (TCDScheduler.step), DDIM lands on the clean estimate: compare the inputs
    # of the last step, then the last step's own rule
    steps = 3
    a = sample_student(student, noise, _grid(sch, 4, "ddim"), steps=steps)
    b = sample_student(student, noise, _grid(sch, 4, TCD(0.0)), steps=steps)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * a.abs().max().item())
    assert not torch.equal(ddim, tcd0)
    renoise = _seeded(student, _grid(sch, 4, "renoise"), noise)
    torch.testing.assert_close(_seeded(student, _grid(sch, 4, CM(0.0)), noise), renoise, rtol=1e-6, atol=1e-5)
    # gamma = 1: the DDIM jump goes all the way to the clean estimate before noise travels back up. On a discrete
    # schedule TCDScheduler stops at timestep 0 instead (sigma 0.029 on SD), so compare on a continuous one.
    flow = GMMDenoiser(GaussianMixture([[0.3, -0.2], [-0.4, 0.5]], [0.1, 0.2]), RectifiedFlow(shift=3.0))
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_seeded(flow, _grid(flow.schedule, 4, TCD(1.0)), z),
                               _seeded(flow, _grid(flow.schedule, 4, "renoise"), z))


@pytest.mark.parametrize("move, cls, call", [
    (Renoise(), LCMScheduler, {}),
    (TCD(0.3), TCDScheduler, {"eta": 0.3}),
    (TCD(0.7), TCDScheduler, {"eta": 0.7}),
])
def test_stochastic_transitions_equal_their_stock_scheduler(student, move, cls, call):
    """The stock scheduler each transition exports to, stepped as a pipeline steps it, with the same generator for
    the initial and the re-noising draws, gives our rollout's sample (4 steps on SD's 1000 timesteps)."""
    sch = student.schedule
    grid = _grid(sch, 4, move)
    scheduler, extra = student_scheduler(SD_SCHEDULER, "eps", grid, grid_timesteps(sch, grid))
    assert isinstance(scheduler, cls) and {k: v for k, v in extra.items() if k != "timesteps"} == call
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    ours = sample_student(student, x, grid, generator=gen)

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    if "timesteps" in extra:
        scheduler.set_timesteps(timesteps=extra["timesteps"])
    else:
        scheduler.set_timesteps(grid.steps)
    assert scheduler.timesteps.tolist() == grid_timesteps(sch, grid)
    for t in scheduler.timesteps:
        out = student.unet(x, t).sample
        x = scheduler.step(out, t, x, generator=gen, **call).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4 * max(1.0, x.abs().max().item()))


def test_noise_travel_gives_the_forward_marginal():
    """From x_s = a_s x0 + s_s e, travelling to t > s gives a_t x0 + s_t e' in distribution (METHODS.md §1.4)."""
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200000, 1), 0.7, dtype=F64)
    s, t = torch.tensor(0.2, dtype=F64), torch.tensor(0.6, dtype=F64)
    x_s = sch.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=F64), s)
    x_t = noise_travel(x_s, sch, s, t, torch.randn(x0.shape, generator=g, dtype=F64))
    assert abs(float(x_t.mean()) - 0.7 * float(sch.alpha(t))) < 5e-3
    assert abs(float(x_t.std()) - float(sch.sigma(t))) < 5e-3
    same = noise_travel(x_s, sch, s, s, torch.randn(x0.shape, dtype=F64))
    torch.testing.assert_close(same, x_s)


def test_transitions_by_name_and_config():
    assert transition("ddim") == DDIM() == "ddim" and transition({"name": "tcd", "gamma": 0.5}) == TCD(0.5)
    assert TCD(0.5) != TCD(0.3) and StudentGrid((1.0,), transition="renoise").transition == Renoise()
    for bad in ("euler", {"name": "tcd", "gamma": 2.0}, {"name": "cm", "sigma_min": -1.0}):
        with pytest.raises(ValueError):
            transition(bad)


def test_a_student_of_experts_samples_each_step_with_its_own_network():
    """``StudentGrid.experts``: step i's time goes to its expert (``Piecewise``); with every expert the same network
    the sample equals the one-network rollout."""
    sch = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    mixtures = [GaussianMixture([[0.5, 0.0]], [0.1]), GaussianMixture([[-0.5, 0.0]], [0.1])]
    first, second = (GMMDenoiser(m, sch) for m in mixtures)
    grid = StudentGrid((1.0, 0.5), transition="ddim", experts=("first", "second"))
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    pw = Piecewise({"first": first, "second": second}, grid)
    x = sample_student(pw, noise, grid)
    # the last step is the second expert's: its clean estimate sits at its own mode
    assert float((x - torch.tensor([-0.5, 0.0])).norm(dim=1).mean()) < 0.2
    seen = []
    first.register_forward_hook(lambda m, i, o: seen.append(("first", float(i[1].max()))))
    second.register_forward_hook(lambda m, i, o: seen.append(("second", float(i[1].max()))))
    sample_student(pw, noise, grid)
    assert seen == [("first", 1.0), ("second", 0.5)]
    same = Piecewise({"first": first, "second": first}, grid)
    torch.testing.assert_close(sample_student(same, noise, grid),
                               sample_student(first, noise, StudentGrid((1.0, 0.5))))
    with pytest.raises(ValueError, match="one expert per step"):
        StudentGrid((1.0, 0.5), experts=("first",))
    with pytest.raises(ValueError, match="no stock pipeline"):
        pw.plain_backbone()
