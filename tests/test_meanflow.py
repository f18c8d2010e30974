"""MeanFlow (methods/meanflow.py): the identity its loss rests on, checked on the exact average velocity of a Gaussian
mixture; the second time input; the flow-map rollout and its single-file pipeline; bad input."""

import json

import numpy as np
import pytest
import torch

from stepdistill.config import ConfigError, build_recipe
from stepdistill.denoisers import Denoiser, GMMDenoiser, Reparameterized, UNet2DDenoiser
from stepdistill.methods import METHODS
from stepdistill.mixture import GaussianMixture
from stepdistill.parameterization import Coefficients, Prediction, ddim_step
from stepdistill.sampling import StudentGrid, sample_student
from stepdistill.schedules import RectifiedFlow, VPDiscrete
from stepdistill.teachers import DEFAULT_SCHEDULER
from stepdistill.train import Trainer

from ._recipes import SMOKE_PROMPTS, _apply, gmm_recipe
from .test_export import _consume, _expected


def _mixture():
    return GaussianMixture(torch.tensor([[0.6, 0.0], [-0.3, 0.5], [-0.3, -0.5]], dtype=torch.float64),
                           torch.tensor([0.25, 0.2, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2]))


class ExactAverageVelocity(Denoiser):
    """The mixture's true average velocity ``u(z, r, t) = (z - z_r) / (t - r)`` on rectified flow, ``z_r`` by
    integrating its exact PF-ODE from ``t`` to ``r`` (Heun, 400 steps, float64); ``r = t``: the velocity itself."""

    def __init__(self, teacher: GMMDenoiser, steps: int = 400):
        super().__init__(teacher.schedule, "flow_match")
        self.teacher, self.steps = teacher, steps

    def forward(self, x_t, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        r = cond["r"]
        z = x_t.double()
        for i in range(self.steps):  # one trajectory per row, each on its own [r, t]
            a = t + (r - t) * i / self.steps
            b = t + (r - t) * (i + 1) / self.steps
            v = self.teacher(z, a).get("flow_match")
            z_euler = z + (b - a)[:, None] * v
            z = z + 0.5 * (b - a)[:, None] * (v + self.teacher(z_euler, b).get("flow_match"))
        gap = (t - r)[:, None]
        inst = self.teacher(x_t.double(), t).get("flow_match")
        u = torch.where(gap > 0, (x_t.double() - z) / gap.clamp(min=1e-300), inst)
        return Prediction.from_output("flow_match", u, x_t.double(), Coefficients.at(self.schedule, t, x_t))


def test_the_meanflow_target_of_the_exact_average_velocity_is_itself():
    """``u = v - (t - r) du/dt`` (Geng et al. 2025, Eq. 6): the loss's target, computed by the method's own JVP wiring
    (tangent ``(v, 1)``, ``r`` held fixed), reproduces the true average velocity of the mixture; the instantaneous
    velocity, which is not a fixed point, is moved."""
    teacher = GMMDenoiser(_mixture(), RectifiedFlow())
    method = METHODS["meanflow"](jvp="finite_difference", jvp_step=1e-4)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.9, 0.7, 0.5, 0.8, 0.6], dtype=torch.float64)
    r = torch.tensor([0.2, 0.01, 0.3, 0.8, 0.05], dtype=torch.float64)  # one row with r = t
    z = RectifiedFlow().add_noise(_mixture().sample(5, generator=g)[0].double(), torch.randn(5, 2, generator=g,
                                                                                   dtype=torch.float64), t)
    v = teacher(z, t).get("flow_match")
    exact = ExactAverageVelocity(teacher)
    u = exact(z, t, {"r": r}).get("flow_match")
    target = method.target(exact, z, t, r, v, None)
    assert float((target - u).abs().max()) < 2e-4 * float(u.abs().max())
    assert float((u - v)[:3].abs().min()) > 1e-2  # the average velocity really differs from the instantaneous one

    class Instantaneous(ExactAverageVelocity):
        def forward(self, x_t, t, cond=None):
            return self.teacher(x_t, t)

    wrong = Instantaneous(teacher)
    moved = method.target(wrong, z, t, r, v, None) - v
    assert float(moved[:3].abs().max()) > 1e-2 and float(moved[3].abs().max()) == 0  # r = t: no correction


def _vp_student():
    from stepdistill.backbones import vector_unet

    torch.manual_seed(0)
    schedule = VPDiscrete.from_scheduler_config(DEFAULT_SCHEDULER)
    return UNet2DDenoiser(vector_unet(2, width=16), schedule, "v")


def test_a_flow_map_student_starts_as_its_network_and_takes_the_gap_in_timesteps():
    base = _vp_student()
    student = base.with_end_time()
    assert student.unet.config.class_embed_type == "timestep" and student.with_end_time() is student
    x, t = torch.randn(4, 2), torch.full((4,), 0.75, dtype=torch.float64)
    for r in (0.0, 0.25, 0.75):
        got = student(x, t, {"r": torch.full((4,), r, dtype=torch.float64)}).x0
        torch.testing.assert_close(got, base(x, t).x0)  # a zero-initialised input: the network is unchanged
    torch.nn.init.normal_(student.unet.class_embedding.linear_2.weight)
    seen = []
    student.unet.class_embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    outs = [student(x, t, {"r": torch.full((4,), r, dtype=torch.float64)}).x0 for r in (0.0, 0.5)]
    assert float((outs[0] - outs[1]).detach().abs().max()) > 1e-4
    assert len(seen) == 2  # the gap went in through the class embedding: timestep 767 to -1 (the clean end), to 511
    view = Reparameterized(student, RectifiedFlow(), prediction="flow_match")
    t_rf = view.schedule.t_from_logsnr(student.schedule.logsnr(t))
    x_rf = (x.double() * view.schedule.alpha(t_rf)[:, None] / student.schedule.alpha(t)[:, None]).float()
    torch.testing.assert_close(view(x_rf, t_rf, {"r": torch.zeros(4, dtype=torch.float64)}).x0, outs[0],
                               atol=1e-4, rtol=1e-4)  # the clean end maps to the clean end through the view


def test_the_flow_map_rollout_is_ddim_told_each_end():
    student = _vp_student().with_end_time()
    torch.nn.init.normal_(student.unet.class_embedding.linear_2.weight, std=0.1)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    x = sample_student(student, noise, StudentGrid(times=(1.0, 0.5), transition="flow_map"))

    def at(x_, t, r):
        return student(x_, torch.full((3,), t, dtype=torch.float64), {"r": torch.full((3,), r, dtype=torch.float64)})

    half = ddim_step(at(noise, 1.0, 0.5), student.schedule, torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(x, at(half, 0.5, 0.0).x0)
    assert float((x - sample_student(student, noise, StudentGrid(times=(1.0, 0.5)))).abs().max()) > 1e-4  # r used


def _meanflow(tmp_path, **overrides):
    recipe = _apply(gmm_recipe(), {"method": {"name": "meanflow"}, "data.batch_size": 16, "train.max_steps": 3,
                                   **overrides})
    return Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()


@pytest.mark.parametrize("steps", [1, 2])
def test_the_exported_flow_map_pipeline_reproduces_the_student(tmp_path, steps):
    """The folder's own pipeline (pipelines/flow_map.py, loaded with trust_remote_code in a process that never
    imports stepdistill) replays the student's rollout, second time input included."""
    trainer = _meanflow(tmp_path, **{"method.student_steps": steps, "optim.student.lr": 1e-2})
    trainer.train()
    assert float(trainer.nets.student.unet.class_embedding.linear_2.weight.abs().max()) > 0  # the r input trained
    folder = trainer.export()
    meta = json.loads((folder / "stepdistill.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["flow_map", "FlowMapPipeline"] and (folder / "flow_map.py").is_file()
    assert meta["load_kwargs"] == {"trust_remote_code": True} and meta["transition"] == "flow_map"
    assert "trust_remote_code=True" in (folder / "README.md").read_text()
    images, stdout = _consume(folder, tmp_path)
    assert stdout.startswith("FlowMapPipeline DDIMScheduler " + str(meta["timesteps"]))
    np.testing.assert_allclose(images, _expected(trainer), atol=2e-5, rtol=0)


@pytest.mark.parametrize("overrides,message", [
    ({"method.ratio": 1.5}, "method.ratio .* must be in \\[0, 1\\]"),
    ({"method.jvp": "forward"}, "method.jvp must be one of"),
    ({"teacher": {"tiny": "unet2d"}, "roles.mode": "lora", "data": {"batch_size": 2}},
     "takes a second time input .* use roles.mode: full"),
    ({"teacher": {"tiny": "sd15"}, "data": {"source": "gaussian", "prompts": SMOKE_PROMPTS, "batch_size": 2}},
     "needs a second time input, .* not to UNetCondDenoiser"),
])
def test_bad_meanflow_settings_are_one_line(tmp_path, overrides, message):
    recipe = _apply(gmm_recipe(), {"method": {"name": "meanflow"}, "data.batch_size": 16, "train.max_steps": 2})
    if "teacher" in overrides:
        recipe["teacher"] = overrides.pop("teacher")
        recipe.pop("student")
    recipe = _apply(recipe, overrides)
    with pytest.raises((ConfigError, ValueError), match=message):
        Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    assert not (tmp_path / "run").exists()
