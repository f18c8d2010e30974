"""Progressive distillation (Salimans & Ho 2022): the x-target identity, stages, weighting, guided PD."""

import pytest
import torch
from torch import nn

from stepdistill.denoisers import Denoiser, GMMDenoiser, UNet2DDenoiser, guided
from stepdistill.methods.base import Batch, Nets
from stepdistill.methods.progressive import ProgressiveDistillation
from stepdistill.mixture import GaussianMixture
from stepdistill.parameterization import Coefficients, Prediction, ddim_step, ddim_x0_target
from stepdistill.roles import build_nets, with_recipe_roles
from stepdistill.schedules import VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER, load_gmm, vector_unet

from .conftest import SD_SCHEDULER


SCHEDULE = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
SD = VPDiscrete.from_scheduler_config(SD_SCHEDULER)  # 1000 timesteps: 16 and 32 steps fall between them
MIX = GaussianMixture([[0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]], 0.1, [0.5, 0.3, 0.2])


@pytest.mark.parametrize("n_steps,schedule", [(1, SCHEDULE), (2, SCHEDULE), (4, SCHEDULE), (8, SCHEDULE), (16, SD)])
def test_one_student_ddim_step_lands_on_two_teacher_steps(n_steps, schedule):
    """The PD identity: with x0 = x~, one DDIM step t -> s reproduces the teacher's two-step result z_s (also for
    the uneven halves of 16 steps snapped to SD's 1000 timesteps: 62.5 -> 62 + 63)."""
    torch.manual_seed(0)
    teacher = UNet2DDenoiser(vector_unet(2, width=16), schedule, "v")
    x_t = torch.randn(64, 2)
    for i in range(n_steps):
        t, t_mid, s = (schedule.snap(torch.full((64,), k / (2 * n_steps))) for k in (2 * i + 2, 2 * i + 1, 2 * i))
        with torch.no_grad():
            z_mid = ddim_step(teacher(x_t, t), schedule, t_mid)
            z_s = ddim_step(teacher(z_mid, t_mid), schedule, s)
        x_target = ddim_x0_target(x_t, z_s, schedule, t, s)
        c = Coefficients.at(schedule, t, x_t)
        student = Prediction(x_target, (x_t.double() - c.a * x_target) / c.s, c, torch.float64)
        assert torch.allclose(ddim_step(student, schedule, s).double(), z_s.double(), atol=1e-9, rtol=0)


def test_on_a_discrete_teacher_every_stage_queries_only_its_timesteps():
    """SD's 1000 timesteps, 32 -> 4 steps: 32 and 16 steps fall between them (32 steps: index 30.25). Snapped, every
    stage queries timesteps only, its grid is diffusers' trailing grid (what the export replays) and the even points
    of the stage before, and the teacher's two steps split the student's step at a point of that finer grid."""
    seen = []

    class Recording(GMMDenoiser):
        def forward(self, x_t, t, cond=None):
            seen.append(torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0]))
            return super().forward(x_t, t, cond)

        def role_state_dict(self):  # no weights: the stage hand-over has nothing to copy
            return {}

        def load_role_state_dict(self, state):
            pass

    den = Recording(MIX, SD)
    pd = ProgressiveDistillation(teacher_steps=32, final_steps=4, steps_per_stage=1, regression_steps=1)
    nets = Nets(student=den, teacher=den, extra={"stage_teacher": den})
    x0, _ = MIX.sample(512, torch.Generator().manual_seed(0))
    finer = None
    for step in range(pd.total_steps):  # the regression stage at 32 steps, then 16, 8 and 4
        pd.update_schedule(step, nets)
        grid = torch.tensor((*pd.student_grid().times, 0.0), dtype=torch.float64)
        torch.testing.assert_close(grid, SD.grid(pd.student_steps), rtol=0, atol=1e-12)
        seen.clear()
        pd("student", nets, Batch(x0=x0, cond=None, generator=torch.Generator().manual_seed(step)))
        idx = SD.model_time(torch.cat(seen))
        torch.testing.assert_close(idx, idx.round(), rtol=0, atol=1e-9)
        queried = set(torch.cat(seen).tolist())
        if finer is not None:
            assert torch.equal(grid, finer[::2])
            assert queried == set(finer[:-1].tolist())  # the student's starts and the teacher's midpoints
        finer = grid
    with pytest.raises(ValueError, match="teacher_steps: 2048 steps need as many distinct timesteps"):
        ProgressiveDistillation(teacher_steps=2048, final_steps=4).update_schedule(0, nets)


def _nets(teacher_den, student_den):
    return Nets(student=student_den, teacher=teacher_den,
                extra={"stage_teacher": UNet2DDenoiser(vector_unet(2, width=16), SCHEDULE, "v")})


def test_loss_is_zero_for_a_student_that_equals_its_target_and_weighting_is_snr_trunc():
    """An exact GMM teacher evaluated through a student whose x0 is the PD target gives zero loss."""
    torch.manual_seed(0)
    teacher = GMMDenoiser(MIX, SCHEDULE)
    pd = ProgressiveDistillation(teacher_steps=8, final_steps=4, steps_per_stage=10)
    pd.update_schedule(0, _nets(teacher, teacher))

    class Oracle(Denoiser):
        """Returns the PD target itself: the teacher's two-step x~ at (x_t, t)."""

        def __init__(self):
            super().__init__(SCHEDULE, "x0")

        def forward(self, x_t, t, cond=None):
            n = pd.student_steps
            t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
            z_mid = ddim_step(teacher(x_t, t), SCHEDULE, t - 0.5 / n)
            z_s = ddim_step(teacher(z_mid, t - 0.5 / n), SCHEDULE, t - 1.0 / n)
            x0 = ddim_x0_target(x_t, z_s, SCHEDULE, t, t - 1.0 / n)
            c = Coefficients.at(SCHEDULE, t, x_t)
            return Prediction(x0, (x_t.double() - c.a * x0) / c.s, c, x_t.dtype)

    x0, _ = MIX.sample(128, torch.Generator().manual_seed(1))
    out = pd("student", _nets(teacher, Oracle()), Batch(x0=x0, cond=None, generator=torch.Generator()))
    assert out.loss.shape == (128,)
    assert out.loss.abs().max() < 1e-10

    # snr_trunc = max(SNR, 1) * x-MSE, per sample.
    student = UNet2DDenoiser(vector_unet(2, width=16), SCHEDULE, "v")
    nets = _nets(teacher, student)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    trunc = pd("student", nets, Batch(x0=x0, cond=None, generator=gen_a))
    pd_const = ProgressiveDistillation(teacher_steps=8, final_steps=4, steps_per_stage=10, weighting="constant")
    pd_const.update_schedule(0, nets)
    const = pd_const("student", nets, Batch(x0=x0, cond=None, generator=gen_b))
    i = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(3))
    t = (i + 1) / 4
    snr = (SCHEDULE.alpha(t) / SCHEDULE.sigma(t)) ** 2
    assert torch.allclose(trunc.loss.double(), const.loss.double() * snr.clamp(min=1), rtol=1e-4)


def test_stages_halve_the_grid_and_hand_the_student_to_the_teacher():
    teacher = load_gmm(MIX.means.tolist(), stds=MIX.stds.tolist(), weights=MIX.weights.tolist(), denoiser="exact")
    pd = ProgressiveDistillation(teacher_steps=16, final_steps=2, steps_per_stage=5)
    nets = build_nets(teacher, pd.roles(), student_init="new")
    assert pd.num_stages == 3 and pd.total_steps == 15
    grids = []
    for step in range(15):
        with torch.no_grad():
            for p in nets.student.parameters():
                p.add_(0.01)  # stands in for an optimizer step
        pd.update_schedule(step, nets)
        pd.begin_step(step, nets)
        grids.append(pd.student_grid().times)
        if step in (5, 10):  # stage boundaries: the teacher becomes the student just trained
            for a, b in zip(nets["stage_teacher"].parameters(), nets.student.parameters()):
                assert torch.equal(a, b)
    assert grids[0] == (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
    assert grids[5] == (1.0, 0.75, 0.5, 0.25) and grids[14] == (1.0, 0.5)
    pd.update_schedule(10, nets)  # bookkeeping only (resume, probes): the boundary's hand-over is begin_step's
    assert not torch.equal(next(nets["stage_teacher"].parameters()), next(nets.student.parameters()))
    pd.begin_step(12, nets)  # away from a boundary nothing is copied (the student moved on since step 10)
    assert not torch.equal(next(nets["stage_teacher"].parameters()), next(nets.student.parameters()))


def test_with_an_ema_each_stage_hands_on_the_ema_and_the_next_student_starts_from_it():
    """The official notebook: the next teacher is the finished student's EMA, and the next student (and its EMA)
    start from it; the regression stage hands its EMA to the first halving's student the same way."""
    teacher = load_gmm(MIX.means.tolist(), stds=MIX.stds.tolist(), weights=MIX.weights.tolist(), denoiser="exact")
    pd = ProgressiveDistillation(teacher_steps=8, final_steps=2, steps_per_stage=3, regression_steps=2)
    nets = build_nets(teacher, with_recipe_roles(pd.roles(), 0.5), student_init="new")
    ema = nets["student_ema"]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))

    for step in range(pd.total_steps):
        pd.update_schedule(step, nets)
        assert pd.begin_step(step, nets) == (("student",) if step in (2, 5) else ())
        if step in (2, 5):  # the regression stage ends, then the first halving
            assert same(nets.student, ema) and (step == 2 or same(nets["stage_teacher"], ema))
        with torch.no_grad():  # an optimizer step, then the EMA update
            for p, e in zip(nets.student.parameters(), ema.parameters()):
                p.add_(0.01 * (step + 1))
                e.lerp_(p, 0.5)
        assert not same(nets.student, ema)
    pd.update_schedule(5, nets)  # bookkeeping for a step already run (a finished run resumed): nothing moves
    pd.begin_step(6, nets)  # away from a boundary nothing moves
    assert not same(nets.student, ema)


class _GuidanceAware(Denoiser):
    """A tiny w-conditioned student: records the guidance it is given."""

    def __init__(self):
        super().__init__(SCHEDULE, "x0")
        self.lin = nn.Linear(3, 2)
        self.seen = None

    def null_cond(self, cond):
        return {"class_labels": torch.full_like(cond["class_labels"], 3)}

    def raw(self, x_t, model_time, cond):
        self.seen = cond["guidance"]
        return self.lin(torch.cat([x_t, cond["guidance"][:, None]], 1))


def test_guided_pd_queries_the_cfg_teacher_and_conditions_the_student_on_w():
    teacher = GMMDenoiser(MIX, SCHEDULE)
    student = _GuidanceAware()
    pd = ProgressiveDistillation(teacher_steps=4, final_steps=2, steps_per_stage=10, guidance=(2.0, 4.0))
    nets = Nets(student=student, teacher=teacher, extra={"stage_teacher": _GuidanceAware()})
    pd.update_schedule(0, nets)
    x0, labels = MIX.sample(32, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(5)
    out = pd("student", nets, Batch(x0=x0, cond={"class_labels": labels}, generator=gen))
    assert torch.isfinite(out.loss).all()
    assert student.seen.shape == (32,) and (student.seen >= 2).all() and (student.seen <= 4).all()
    # The CFG teacher really extrapolates: at w > 1 it differs from the plain conditional denoiser.
    x_t = torch.randn(32, 2)
    t = torch.full((32,), 0.5, dtype=torch.float64)
    cond = {"class_labels": labels}
    plain = guided(teacher, x_t, t, cond, 1.0).x0_64
    cfg = guided(teacher, x_t, t, cond, 3.0).x0_64
    uncond = teacher(x_t, t).x0_64
    assert torch.allclose(cfg, uncond + 3.0 * (plain - uncond), atol=1e-10)
    with pytest.raises(ValueError, match="guidance"):
        ProgressiveDistillation(guidance=(0.5, 2.0))


def test_a_regression_stage_runs_first_at_the_teachers_steps_and_targets_its_x0():
    """Meng et al.'s stage one: before the halvings the student takes the teacher's own step count and regresses
    onto the teacher's x0 at (x_t, t); a student equal to the teacher has zero loss there, not in the halvings."""
    teacher = load_gmm(MIX.means.tolist(), stds=MIX.stds.tolist(), weights=MIX.weights.tolist(), denoiser="exact")
    pd = ProgressiveDistillation(teacher_steps=8, final_steps=2, steps_per_stage=5, regression_steps=3)
    nets = build_nets(teacher, pd.roles(), student_init="new")
    assert pd.total_steps == 13
    seen = []
    for step in range(13):
        with torch.no_grad():
            for p in nets.student.parameters():
                p.add_(0.01)
        pd.update_schedule(step, nets)
        pd.begin_step(step, nets)
        seen.append((pd.stage, pd.student_steps))
        if step == 8:  # the first halving ends: its student becomes the teacher
            assert all(torch.equal(a, b) for a, b in zip(nets["stage_teacher"].parameters(),
                                                           nets.student.parameters()))
    assert seen[:4] == [(-1, 8)] * 3 + [(0, 4)] and seen[8] == (1, 2) and seen[12] == (1, 2)
    assert not torch.equal(next(nets["stage_teacher"].parameters()), next(nets.student.parameters()))

    same = Nets(student=teacher.denoiser, teacher=teacher.denoiser, extra={"stage_teacher": teacher.denoiser})
    x0, _ = MIX.sample(64, torch.Generator().manual_seed(1))
    for step, zero in ((0, True), (3, False)):
        pd.update_schedule(step, same)
        loss = pd("student", same, Batch(x0=x0, cond=None, generator=torch.Generator().manual_seed(2))).loss
        assert (loss.abs().max() == 0) == zero


def test_a_student_reading_eps_weights_as_v_needs_the_regression_stage():
    from pathlib import Path

    from stepdistill.methods.base import PrepareContext

    eps_teacher = UNet2DDenoiser(vector_unet(2, width=16), SCHEDULE, "eps")
    nets = Nets(student=UNet2DDenoiser(vector_unet(2, width=16), SCHEDULE, "v"), teacher=eps_teacher, extra={})
    ctx = PrepareContext(cache_dir=Path("."), sample_shape=(2,), device=torch.device("cpu"), is_main_process=True,
                         wait_for_everyone=lambda: None)
    with pytest.raises(ValueError, match="which predict 'eps', but predicts 'v'.*method.regression_steps"):
        ProgressiveDistillation(teacher_steps=8, final_steps=4).prepare(nets, ctx)
    ProgressiveDistillation(teacher_steps=8, final_steps=4, regression_steps=10).prepare(nets, ctx)
    ctx.student_init = "new"  # a student trained from scratch has no teacher output to unlearn
    ProgressiveDistillation(teacher_steps=8, final_steps=4).prepare(nets, ctx)


@pytest.mark.parametrize("period, noted", [(3, False), (5, True), (None, False)])
def test_a_learning_rate_period_off_the_stage_boundaries_is_noted(tmp_path, capsys, period, noted):
    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    from ._recipes import gmm_recipe

    recipe = gmm_recipe(**{"optim.student.period": period, "optim.student.schedule": "linear"})  # stages of 3 steps
    Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    err = capsys.readouterr().err
    assert ("optim.student.period is 5 but the stages last [3] steps" in err) == noted


@pytest.mark.parametrize("decay, noted", [(0.9, True), (0.3, False), (0.0, False)])
def test_an_ema_too_slow_for_its_stages_is_noted(tmp_path, capsys, decay, noted):
    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    from ._recipes import gmm_recipe

    recipe = gmm_recipe(**{"train.ema_decay": decay})  # stages of 3 steps: 0.9^3 = 73% of the start stays
    Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    err = capsys.readouterr().err
    assert ("train.ema_decay 0.9 still weighs a stage's starting weights 73%" in err) == noted


def test_each_stage_starts_the_students_optimizer_afresh(tmp_path, monkeypatch):
    """As the official code does between distillation iterations: Adam's moments of the last stage are dropped at
    each boundary (regression stage -> first halving included), so the first update of a stage is Adam's first."""
    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    from ._recipes import gmm_recipe

    pd = ProgressiveDistillation(teacher_steps=8, final_steps=2, steps_per_stage=3, regression_steps=2)
    teacher = load_gmm(MIX.means.tolist(), stds=MIX.stds.tolist(), weights=MIX.weights.tolist(), denoiser="exact")
    nets = build_nets(teacher, pd.roles(), student_init="new")
    assert [s for s in range(12) if pd.begin_step(s, nets)] == [2, 5]  # stages: regression 0-1, 2-4, 5-...
    trainer = Trainer(build_recipe(gmm_recipe()), tmp_path / "run", show_progress=False).setup()  # stages of 3
    seen = []
    real = trainer._run_phase

    def spy(phase):
        opt = trainer.optimizers["student"]
        seen.append(min((int(s["step"]) for s in opt.state.values()), default=0))  # Adam steps taken so far
        return real(phase)

    monkeypatch.setattr(trainer, "_run_phase", spy)
    trainer.train()
    assert seen == [0, 1, 2, 0, 1, 2]


def test_a_stage_of_no_steps_is_one_line(tmp_path):
    from stepdistill.config import ConfigError, build_recipe
    from stepdistill.train import Trainer

    from ._recipes import gmm_recipe

    recipe = build_recipe(gmm_recipe(**{"method.steps_per_stage": 0}))
    with pytest.raises(ConfigError, match="^method.steps_per_stage must be >= 1, got 0"):
        Trainer(recipe, tmp_path / "run", show_progress=False).setup()
    assert not (tmp_path / "run").exists()
