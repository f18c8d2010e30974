"""DMD / DMD2 (METHODS.md §4): the DM gradient identity, who gets gradients, backward simulation, the f-divergence
weights, the ODE-pair cache, resume, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import ConfigError, build_recipe
from stepdistill.denoisers import guided
from stepdistill.methods.base import Batch, loss_terms
from stepdistill.methods.dmd import DMD
from stepdistill.methods.terms import density_ratio_weight, f_weight
from stepdistill.roles import enable_gradient_checkpointing, frozen
from stepdistill.schedules import EDM, KarrasGrid, VPDiscrete
from stepdistill.train import Trainer

from ._recipes import dmd_recipe
from .conftest import SD_SCHEDULER


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, name="run", **overrides):
    return Trainer(build_recipe(dmd_recipe(**overrides)), tmp_path / name, show_progress=False).setup()


def _batch(trainer, seed=0):
    batch = trainer.data.next(torch.Generator().manual_seed(seed))
    batch.generator = torch.Generator().manual_seed(seed + 1)
    return batch


def _perturb(module, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_dm_loss_gradient_is_grad_over_numel(tmp_path):
    trainer = _trainer(tmp_path)
    nets, method = trainer.nets, trainer.method
    _perturb(nets["fake_score"].backbone)  # so that the fake score differs from the teacher
    x = (0.5 * torch.randn(16, 2, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    loss, _ = method.dm_term(x, nets, None, torch.Generator().manual_seed(7))
    loss.mean().backward()

    # The same draws, recomputed by hand from METHODS.md §4.1.
    g = torch.Generator().manual_seed(7)
    sch = nets.teacher.schedule
    n = sch.num_train_timesteps
    t = sch.index_to_t(torch.randint(int(0.02 * n), int(0.98 * n) + 1, (16,), generator=g))
    eps = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        x_t = sch.add_noise(x.detach(), eps, t)
        real = guided(nets.teacher, x_t, t, None, 1.0).x0_64
        fake = nets["fake_score"](x_t, t, None).x0_64
        grad = (fake - real) / (x.detach().double() - real).abs().mean(1, keepdim=True)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(x.grad.double(), grad / x.numel(), rtol=1e-5, atol=1e-9)


def test_karras_time_density_draws_dmd2_edm_times_for_every_term(tmp_path):
    # DM loss in [0.02, 0.98] of the 1000-point Karras grid, fake score and GAN over the whole of it (gan_t_max 1)
    trainer = _trainer(tmp_path, **{"method.time_density": "karras"})
    method, sch = trainer.method, trainer.nets.teacher.schedule
    for lo, hi in ((0.02, 0.98), (0.0, 1.0)):
        t = method.times.draw(sch, 64, lo, hi, torch.Generator().manual_seed(5))
        expected = KarrasGrid(num_points=1000, lo=lo, hi=hi).sample(64, sch, torch.Generator().manual_seed(5))
        torch.testing.assert_close(t, expected, rtol=0, atol=0)
    sigma = sch.sigma(t) / sch.alpha(t)
    assert (sigma < 0.35).double().mean() > 0.2  # uniform timesteps put ~8% there on this schedule
    out = trainer.method("student", trainer.nets, _batch(trainer))
    assert torch.isfinite(out.loss).all()


def test_dm_gradient_vanishes_when_the_fake_score_is_the_teacher(tmp_path):
    trainer = _trainer(tmp_path)  # fake_score starts as a copy of the teacher
    x = torch.randn(16, 2).requires_grad_(True)
    loss, _ = trainer.method.dm_term(x, trainer.nets, None, torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert float(loss.detach().abs().max()) == 0.0 and float(x.grad.abs().max()) == 0.0


def test_student_phase_reaches_only_the_student_and_critic_phase_only_the_critic(tmp_path):
    trainer = _trainer(tmp_path, **{"method.regression_weight": 0.0})
    nets, method = trainer.nets, trainer.method
    groups = {"student": nets.student, "fake_score": nets["fake_score"], "discriminator": nets["discriminator"],
              "teacher": nets.teacher}

    def touched():
        return {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for k, m in
                groups.items()}

    with frozen([nets["fake_score"], nets["discriminator"]]):  # what the loop does in the student phase
        method("student", nets, _batch(trainer)).loss.mean().backward()
    assert touched() == {"student": True, "fake_score": False, "discriminator": False, "teacher": False}
    # the GAN generator term ran through the frozen fake score and head, which are trainable again afterwards
    assert all(p.requires_grad for p in nets["fake_score"].parameters())
    assert all(p.requires_grad for p in nets["discriminator"].parameters())
    for m in groups.values():
        m.zero_grad(set_to_none=True)
    with frozen([nets.student]):
        for term in loss_terms(method("fake_score", nets, _batch(trainer))):  # GAN classification, then denoising
            term.loss.mean().backward()
    assert touched() == {"student": False, "fake_score": True, "discriminator": True, "teacher": False}
    # and the loop does so by itself: a student update leaves the critic's weights alone, and the other way round
    for m in groups.values():
        m.zero_grad(set_to_none=True)
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in groups.items()}
    trainer._run_phase("student")
    moved = {k: any(not torch.equal(a, p) for a, p in zip(before[k], m.parameters())) for k, m in groups.items()}
    assert moved == {"student": True, "fake_score": False, "discriminator": False, "teacher": False}


def test_gan_head_reads_1x1_maps_and_keeps_dmd2s_32_groups_on_larger_maps():
    """32 GroupNorm groups of one value each normalise a 1x1 map to 0: the head then outputs its bias whatever the
    input. The head shrinks the grouping on small maps and keeps DMD2's 32 groups where a group holds enough values."""
    from torch import nn

    from stepdistill.nets.gan_head import BottleneckHead

    torch.manual_seed(0)
    head = BottleneckHead(32)
    x = torch.randn(4, 32, 1, 1, requires_grad=True)
    head(x).sum().backward()
    assert (head(x) - head(torch.randn(4, 32, 1, 1))).abs().max() > 1e-3
    assert x.grad.abs().max() > 1e-4
    norm, ref = head.body[1], nn.GroupNorm(32, 32)
    ref.load_state_dict(norm.state_dict())
    maps = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(norm(maps), ref(maps))


def test_gan_term_alone_trains_the_student_on_a_vector_backbone(tmp_path):
    """With the DM and regression terms off, the generator's GAN term must still reach the student (the GMM teachers
    are vector backbones: their bottleneck is a 1x1 map)."""
    trainer = _trainer(tmp_path, **{"method.dm_weight": 0.0, "method.regression_weight": 0.0,
                                    "method.gan_weight": 1.0})
    trainer.method("student", trainer.nets, _batch(trainer)).loss.mean().backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.nets.student.parameters() if p.grad is not None])
    assert grad.norm() > 1e-4


def test_the_critic_terms_backpropagated_in_turn_give_the_summed_loss_gradient(tmp_path):
    """The critic phase hands its GAN and denoising terms to backward one at a time (so one graph lives at a time);
    the gradients equal those of DMD2's single summed loss on the same draws."""
    trainer = _trainer(tmp_path)
    method, nets = trainer.method, trainer.nets
    _perturb(nets["fake_score"], seed=1)
    params = [p for role in ("fake_score", "discriminator") for p in nets[role].parameters()]

    def grads(in_turn: bool):
        for p in params:
            p.grad = None
        terms = loss_terms(method("fake_score", nets, _batch(trainer, seed=3)))
        if in_turn:
            for term in terms:
                term.loss.mean().backward()
        else:
            sum(term.loss.mean() for term in list(terms)).backward()
        return [p.grad.clone() for p in params]

    in_turn, summed = grads(True), grads(False)
    assert len(list(loss_terms(method("fake_score", nets, _batch(trainer))))) == 2 and method.uses_head
    assert any(g.abs().max() > 0 for g in in_turn)
    for a, b in zip(in_turn, summed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_backward_simulation_keeps_gradient_at_the_sampled_step_only(tmp_path):
    trainer = _trainer(tmp_path, **{"method.student_steps": 4})
    student, method = trainer.nets.student, trainer.method
    assert method.student_grid().times == (1.0, 0.75, 0.5, 0.25)
    assert method.student_grid().transition == "renoise"
    calls = []
    hook = student.register_forward_hook(lambda m, args, out: calls.append((torch.is_grad_enabled(), args)))
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    seen_k = set()
    for seed in range(12):
        calls.clear()
        x, k_out = method.generate(student, noise, None, torch.Generator().manual_seed(seed))
        k = len(calls) - 1
        assert k_out == k
        seen_k.add(k)
        assert [grad for grad, _ in calls] == [False] * k + [True]
        assert x.requires_grad
        first_x, first_t = calls[0][1][:2]
        assert torch.equal(first_x, noise)  # the first input is pure noise (DMD2's pure_noise_mask)
        assert torch.allclose(first_t, torch.ones(8, dtype=torch.float64))
        if k:  # the input at step k is the re-noised x0 of step k-1, at time t_k
            assert torch.allclose(calls[-1][1][1], torch.full((8,), (4 - k) / 4, dtype=torch.float64))
    # with a rank-shared generator, ranks whose own generators differ still make the same student calls (FSDP)
    def n_calls(rank_seed, shared):
        calls.clear()
        method.generate(student, noise, None, torch.Generator().manual_seed(rank_seed), shared=shared)
        return len(calls)

    pairs = [(2 * i, 2 * i + 1) for i in range(8)]
    assert any(n_calls(a, None) != n_calls(b, None) for a, b in pairs)  # per-rank draws alone would differ
    for i, (a, b) in enumerate(pairs):
        assert n_calls(a, torch.Generator().manual_seed(i)) == n_calls(b, torch.Generator().manual_seed(i))
    hook.remove()
    assert seen_k == {0, 1, 2, 3}


def test_phased_matching_judges_each_step_only_in_its_own_band(tmp_path):
    trainer = _trainer(tmp_path, **{"method.student_steps": 4, "method.multistep_matching": "phased"})
    nets, method, sch = trainer.nets, trainer.method, trainer.nets.teacher.schedule
    edges, n = (1.0, 0.75, 0.5, 0.25, 0.0), sch.num_train_timesteps
    gen = torch.Generator().manual_seed(0)
    fake_bands = []
    for k in range(4):
        idx = sch.model_time(method.times.draw(sch, 20000, 0.0, 1.0, gen, k)).round().long()
        fake_bands.append(set(idx.tolist()))
        lo, hi = edges[k + 1], edges[k]
        assert fake_bands[-1] == {i for i in range(n) if lo < (i + 1) / n <= hi}
        dm = method.times.draw(sch, 4000, method.t_min, method.t_max, gen, k)
        assert dm.min() > max(lo, method.t_min) - 1 / n and dm.max() <= min(hi, method.t_max)
        gan = method.times.draw(sch, 4000, 0.0, method.gan.t_max, gen, k)
        assert gan.min() > lo and gan.max() <= hi
    assert set().union(*fake_bands) == set(range(n))  # the fake score still learns every time, once

    # Through the phases: every time the fake score is asked about (DM loss, denoising) lies in the band of the step
    # whose output it judges.
    seen, ks = [], []
    generate = method.generate

    def recording_generate(*args, **kwargs):
        x, k = generate(*args, **kwargs)
        ks.append(k)
        return x, k

    method.generate = recording_generate
    hook = nets["fake_score"].register_forward_hook(lambda m, args, out: seen.append(args[1]))
    for seed in range(12):
        for phase in ("student", "fake_score"):
            seen.clear()
            terms = loss_terms(method(phase, nets, _batch(trainer, seed)))
            assert all(torch.isfinite(term.loss).all() for term in terms)
            k = ks[-1]
            t = torch.cat([s.to(torch.float64) for s in seen])
            assert t.min() > edges[k + 1] and t.max() <= edges[k], (phase, k)
    hook.remove()
    assert set(ks) == {0, 1, 2, 3}


def test_f_divergence_weights():
    r = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    assert torch.equal(f_weight("reverse_kl", r), torch.ones(3, dtype=torch.float64))
    assert torch.equal(f_weight("forward_kl", r), r)
    torch.testing.assert_close(f_weight("js", r), r / (1 + r))
    # h = f''(r) r^2 for f(r) = r log r - (r + 1) log((r + 1) / 2) (Jensen-Shannon), by finite differences
    f = lambda u: u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2)  # noqa: E731
    d = 1e-4
    second = (f(r + d) - 2 * f(r) + f(r - d)) / d**2
    torch.testing.assert_close(second * r**2, f_weight("js", r), rtol=1e-4, atol=1e-6)
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])
    h = density_ratio_weight(logits, torch.tensor([0.1, 0.1, 0.9, 0.9], dtype=torch.float64), "forward_kl", 0.02,
                             0.98)
    assert abs(float(h.mean()) - 1.0) < 1e-5  # normalised by the batch mean
    # within a time bin the ratio is divided by the bin mean: e vs e^-1 ... relative order is kept
    assert h[1] > h[0] and h[3] > h[2]


def test_f_divergence_run_needs_and_uses_the_head(tmp_path):
    trainer = _trainer(tmp_path, **{"method.divergence": "js", "method.gan_weight": 0.0})
    assert "discriminator" in trainer.nets.extra
    logs = trainer.train()
    assert "loss_dm/student" in logs and "loss_cls/fake_score" in logs and "loss_gan/student" not in logs


def test_two_time_scale_update_and_logs(tmp_path):
    trainer = _trainer(tmp_path, **{"train.update_every": {"student": 3}, "train.max_steps": 6})
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # the student steps at 0 and 3; the critic every step; a logging step shows the latest student values
    lr_steps = [r["step"] for r in rows if "grad_norm/student" in r]
    assert lr_steps == [1, 2, 3, 4, 5, 6]
    opt = trainer.optimizers
    assert opt["student"].state[next(iter(opt["student"].state))]["step"] == 2
    assert opt["fake_score"].state[next(iter(opt["fake_score"].state))]["step"] == 6
    assert opt["discriminator"].state[next(iter(opt["discriminator"].state))]["step"] == 6


def test_resume_is_exact_with_three_networks(tmp_path):
    full = _trainer(tmp_path, "full")
    full.train()
    part = _trainer(tmp_path, "part", **{"train.max_steps": 3})
    part.train()
    resumed = Trainer(build_recipe(dmd_recipe()), tmp_path / "part", resume=True, show_progress=False).setup()
    resumed.train()
    for role in ("student", "fake_score", "discriminator"):
        wa = load_file(str(tmp_path / "full" / "checkpoints" / "step-6" / f"{role}.safetensors"))
        wb = load_file(str(tmp_path / "part" / "checkpoints" / "step-6" / f"{role}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), role


def test_regression_pairs_are_cached_and_a_mismatched_cache_is_refused(tmp_path):
    cache = tmp_path / "pairs.safetensors"
    over = {"method.regression_weight": 0.25, "method.num_pairs": 32, "method.pair_steps": 8,
            "method.pair_cache": str(cache), "method.gan_weight": 0.0}
    trainer = _trainer(tmp_path, "a", **over)
    assert cache.exists() and trainer.method.ode.pairs["noise"].shape == (32, 2)
    stamp = cache.stat().st_mtime_ns
    logs = _trainer(tmp_path, "b", **over).train()
    assert cache.stat().st_mtime_ns == stamp and "loss_reg/student" in logs  # reused, not remade
    # the pair targets are the teacher's own 8-step DDIM samples of the stored noise
    from stepdistill.sampling import sample_ddim

    noise, target = trainer.method.ode.pairs["noise"], trainer.method.ode.pairs["target"]
    teacher = trainer.nets.teacher
    with torch.no_grad():
        torch.testing.assert_close(sample_ddim(teacher, noise[:4], teacher.schedule.grid(8)), target[:4])
    with pytest.raises(ConfigError, match="different teacher or recipe.*pair_steps|steps"):
        _trainer(tmp_path, "c", **{**over, "method.pair_steps": 16})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("overrides, match", [
    ({"method.student_steps": 3}, "no stock scheduler reproduces"),  # 1024 / 3: LCM cannot replay it
    ({"train.update_every": {"student": 0}}, "update ratio must be >= 1"),
    ({"method.conditioning_time": 0.4, "method.student_steps": 4}, "one-step students"),
    ({"method.regression_weight": 0.25, "method.student_steps": 2}, "one-step students"),
    ({"method.regression_warmup": 3, "method.student_steps": 2}, "regression_warmup: .*one-step students"),
    ({"method.regression_warmup": -1}, "regression_warmup must be a number of steps >= 0"),
    ({"method.divergence": "kl"}, "divergence must be one of"),
    ({"method.time_density": "lognormal"}, "time_density must be one of"),
    ({"data.source": "gaussian"}, "the GAN term .* needs a real-data source"),
    ({"method.multistep_matching": "bands"}, "multistep_matching must be one of"),
    ({"method.fake_score_target": "score"}, "fake_score_target must be one of"),
    ({"method.multistep_matching": "phased", "method.time_density": "karras"}, "not supported with it"),
    ({"method.multistep_matching": "phased", "method.student_steps": 4, "method.gan_t_max": 0.5},
     "leaves no time in step 0's band"),
])
def test_bad_input_is_named(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _trainer(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


def test_gan_without_real_data_on_a_tiny_teacher(tmp_path):
    recipe = dmd_recipe()
    recipe["teacher"] = {"tiny": "unet2d"}
    with pytest.raises(ConfigError, match="GAN term"):
        Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    # data-free DMD on the same teacher needs no data source at all (its regression pairs, made in setup, kept few)
    recipe["method"] = {"name": "dmd", "student_steps": 1, "num_pairs": 8, "pair_steps": 4}
    del recipe["optim"]["discriminator"]
    trainer = Trainer(build_recipe(recipe), tmp_path / "run", show_progress=False).setup()
    assert "discriminator" not in trainer.nets.extra and not trainer.method.reads_data


def test_one_step_conditioning_time_snaps_to_a_teacher_timestep(tmp_path):
    trainer = _trainer(tmp_path, **{"method.conditioning_time": 0.4})
    (t,) = trainer.method.student_grid().times
    assert t == 410 / 1024  # index 409 of the 1024-step teacher
    x, _ = trainer.method.generate(trainer.nets.student, torch.randn(4, 2), None, torch.Generator())
    assert x.shape == (4, 2)


def test_batch_shape_comes_from_the_data(tmp_path):
    trainer = _trainer(tmp_path)
    batch = Batch(x0=torch.zeros(5, 2), cond=None, generator=torch.Generator().manual_seed(0))
    assert trainer.method("student", trainer.nets, batch).loss.shape == (5,)


def test_fake_score_target_changes_the_critic_weighting_only(tmp_path):
    # eps-MSE = a_t^2 v-MSE at every (x_t, t) (the project's teachers predict v): same minimiser, other weights
    losses = {}
    for target in ("v", "eps"):
        trainer = _trainer(tmp_path, f"run-{target}", **{"method.fake_score_target": target,
                                                           "method.gan_weight": 0.0})
        [out] = loss_terms(trainer.method("fake_score", trainer.nets, _batch(trainer)))  # no head: one term
        losses[target] = out.loss
    assert not torch.allclose(losses["v"], losses["eps"]) and (losses["eps"] <= losses["v"] + 1e-6).all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gan_features_stop_at_the_bottleneck_with_the_same_values_and_gradients(checkpointing):
    """``Denoiser.features`` (DMD2's classify-mode forward) never runs the decoder half, yet gives the features and
    gradients of the whole pass (tiny SD1.5 UNet, with and without activation checkpointing)."""
    from stepdistill.conditioning import encode_prompts
    from stepdistill.teachers import load_tiny

    teacher = load_tiny("sd15")
    den = teacher.denoiser
    den.unet.requires_grad_(True)  # the teacher comes frozen; here it stands in for a trainable fake score
    cond = encode_prompts(teacher.load_pipeline(), "sd15", ["a", "b"], **teacher.encode_settings)
    if checkpointing:
        enable_gradient_checkpointing(den)
    decoder_calls = []
    den.unet.up_blocks[0].register_forward_hook(lambda *_: decoder_calls.append(1))
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    weights = None
    grads = []
    for cut_short in (False, True):
        den.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        [feats] = den.features(xi, t, cond) if cut_short else den.with_features(xi, t, cond)[1]
        if weights is None:
            weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1))
        (feats * weights).sum().backward()
        grads.append((feats.detach(), xi.grad, {n: p.grad.clone() for n, p in den.unet.named_parameters()
                                                 if p.grad is not None}))
        assert len(decoder_calls) == (0 if cut_short else 1)
        decoder_calls.clear()
    (f_full, gx_full, gp_full), (f_cut, gx_cut, gp_cut) = grads
    torch.testing.assert_close(f_cut, f_full)
    torch.testing.assert_close(gx_cut, gx_full)
    assert gp_cut.keys() == gp_full.keys() and gp_cut
    for name in gp_full:
        torch.testing.assert_close(gp_cut[name], gp_full[name])


def test_an_unperiodic_lr_schedule_anneals_over_each_roles_own_updates(tmp_path):
    # the student updates every 2nd step (dmd_recipe), the fake score and head every step
    trainer = _trainer(tmp_path, **{"train.max_steps": 7, "optim.student.schedule": "cosine",
                                    "optim.fake_score.schedule": "linear"})
    assert {r: trainer._optimizer_steps(r) for r in trainer.optimizers} == {
        "student": 4, "fake_score": 7, "discriminator": 7}
    trainer.train()
    lr = {r: trainer.optimizers[r].param_groups[0]["lr"] for r in ("student", "fake_score", "discriminator")}
    assert lr["student"] < 1e-3 * 0.2 and lr["fake_score"] < 1e-3 * 0.2 and lr["discriminator"] == 1e-3



def test_the_student_ema_moves_only_when_the_student_does(tmp_path):
    """``ema_decay`` is per student update: with the student updating every 2nd step the EMA does too (else its
    effective decay per update would be decay ** 2)."""
    import stepdistill.train as loop

    trainer = _trainer(tmp_path, **{"train.ema_decay": 0.5, "train.max_steps": 4})
    calls, update = [], loop.update_ema
    loop.update_ema = lambda ema, source, decay: (calls.append((trainer.step, decay)), update(ema, source, decay))
    try:
        trainer.train()
    finally:
        loop.update_ema = update
    assert calls == [(0, 0.5), (2, 0.5)] and trainer.ema_updates == {"student_ema": 2}


@pytest.mark.parametrize("density", ["uniform", "karras"])
def test_gan_noise_levels_stop_short_of_gan_t_max_as_dmd2_draws_them(density):
    # DMD2: randint(0, diffusion_gan_max_timestep) for the GAN, randint(min, max + 1) for the DM loss
    # the Karras grid's sigma range (0.002..80) is EDM's; on SD's schedule its ends would clamp
    sch = VPDiscrete.from_scheduler_config(SD_SCHEDULER) if density == "uniform" else EDM()
    method = DMD(student_steps=1, gan_weight=1e-2, gan_t_max=0.5, t_min=0.02, t_max=0.98, time_density=density)
    t = method.times.draw(sch, 20000, 0.0, method.gan.t_max, torch.Generator().manual_seed(0), closed=False)
    dm = method.times.draw(sch, 20000, method.t_min, method.t_max, torch.Generator().manual_seed(0))
    if density == "uniform":  # the teacher's own timesteps, 1000 of them
        gan_idx, dm_idx = sch.model_time(t), sch.model_time(dm)
        assert (gan_idx.min().item(), gan_idx.max().item()) == (0, 499)
        assert (dm_idx.min().item(), dm_idx.max().item()) == (20, 980)
    else:  # positions of the 1000-point Karras grid counted from the clean end
        ascending = KarrasGrid(num_points=1000).sigmas().flip(0)

        def positions(times):
            sigma = sch.sigma(times) / sch.alpha(times)
            return (torch.log(sigma)[:, None] - torch.log(ascending)[None]).abs().argmin(dim=1)

        gan_pos, dm_pos = positions(t), positions(dm)
        assert gan_pos.max().item() == 499 and (dm_pos.min().item(), dm_pos.max().item()) == (20, 980)


def test_a_gan_range_without_a_timestep_is_refused(tmp_path):
    # 0.0005 of 1000 timesteps: DMD2's randint(0, 0) would fail on the first GAN draw
    method = DMD(student_steps=1, gan_weight=1e-2, gan_t_max=0.0005)
    with pytest.raises(ValueError, match="gan_t_max: 0.0005 x 1000 timesteps"):
        method._check_ranges(VPDiscrete.from_scheduler_config(SD_SCHEDULER))
    DMD(student_steps=1, gan_weight=1e-2, gan_t_max=0.001)._check_ranges(
        VPDiscrete.from_scheduler_config(SD_SCHEDULER))


def test_a_gan_range_without_a_timestep_is_refused_before_the_run_starts(tmp_path):
    with pytest.raises(ConfigError, match="gan_t_max: 0.0005 x 1024 timesteps leaves no GAN noise level"):
        _trainer(tmp_path, **{"method.gan_t_max": 0.0005})
    assert not (tmp_path / "run").exists()


def test_the_critic_trains_on_the_student_phases_own_samples(tmp_path):
    """DMD2's ``train_one_step`` makes one generator pass per iteration and gives the guidance loss its ``.detach()``:
    on steps where the student phase runs, the critic's fakes are exactly its samples (no second student forward);
    on critic-only steps (two-time-scale rule) the critic draws its own."""
    trainer = _trainer(tmp_path, **{"train.update_every": {"student": 2}, "train.max_steps": 4,
                                    "train.grad_accum": 2})
    calls, stashed = [], []
    trainer.nets.student.register_forward_hook(lambda m, i, o: calls.append((trainer.step, torch.is_grad_enabled())))
    fake_score_loss = trainer.method.fake_score_loss

    def critic(nets, batch):  # what the critic is handed: the student phase's samples, one per micro-batch
        stashed.append([x for x, _, _ in trainer.method.fakes])
        yield from fake_score_loss(nets, batch)

    trainer.run.method.fake_score_loss = critic
    trainer.train()
    assert [len(s) for s in stashed] == [2, 1, 0, 0, 2, 1, 0, 0]
    # student steps 0 and 2: two micro-batches, each one student forward with gradient and none in the critic;
    # critic-only steps 1 and 3: one no-grad student forward per micro-batch
    assert calls[:8] == [(0, True), (0, True), (1, False), (1, False), (2, True), (2, True), (3, False), (3, False)]
    assert calls[8:] == [(4, False)]  # the final sample grid


def test_regression_warmup_trains_the_student_on_pairs_alone_every_step_then_matches_afresh(tmp_path):
    """DMD2's ODE pretraining of a one-step student: during ``regression_warmup`` steps the student phase is the
    regression alone and runs every step (the two-time-scale rule waits), the critic tracks the student; distribution
    matching then starts with the student's Adam state afresh and the usual update ratio."""
    over = {"method.regression_warmup": 3, "method.num_pairs": 32, "method.pair_steps": 8,
            "method.pair_cache": str(tmp_path / "pairs.safetensors"), "train.update_every": {"student": 2},
            "train.max_steps": 7, "train.log_every": 1}
    trainer = _trainer(tmp_path, **over)
    seen, method = [], trainer.method
    warmup_loss, student_loss = method.warmup_loss, method.student_loss

    def spy(loss):
        def call(nets, batch):
            out = loss(nets, batch)
            seen.append((trainer.step, sorted(k for k in out.logs if k != "loss")))
            return out
        return call

    method.warmup_loss, method.student_loss = spy(warmup_loss), spy(student_loss)
    trainer.train()
    assert seen == [(0, ["loss_reg"]), (1, ["loss_reg"]), (2, ["loss_reg"]),
                    (4, ["dm_grad_norm", "loss_dm", "loss_gan"]), (6, ["dm_grad_norm", "loss_dm", "loss_gan"])]
    assert [method.active_phases(s, {"student": 2}) for s in (2, 3, 4)] == [
        ("regression", "fake_score"), ("fake_score",), ("student", "fake_score")]
    moments = trainer.optimizers["student"].state[next(iter(trainer.optimizers["student"].state))]
    assert moments["step"] == 2  # cleared at step 3, then the DM updates of steps 4 and 6
    critic = trainer.optimizers["fake_score"].state[next(iter(trainer.optimizers["fake_score"].state))]
    assert critic["step"] == 7
