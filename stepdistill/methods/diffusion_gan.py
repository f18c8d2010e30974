"""DMD2's diffusion GAN (Yin et al., NeurIPS 2024, §4.3; tianweiy/DMD2 ``main/sd_guidance.py`` ``compute_cls_logits``,
``compute_generator_clean_cls_loss``, ``compute_guidance_clean_cls_loss``): a classification head on the fake score's
bottleneck (``nets/gan_head.py``) tells diffusion-noised generator samples from noised reals, with non-saturating
losses (``terms.gan_generator_loss``, ``terms.gan_critic_loss``). The head trains with the fake score in the critic
phase; the generator's term joins its DM loss (DMD2) or SiD loss (SiDA). ``DMD`` holds one, and SiD/SiDA and rCM
reach it through ``DMD``. The adversarial family's discriminators (``nets/discriminator.py``) are another design.
"""

from __future__ import annotations

import torch

from ..nets.gan_head import GANHead
from ..pairs import CleanSamples
from ..types import noise_like
from .bands import StepTimes
from .base import Batch, LossOutput, Nets
from .terms import gan_critic_loss, gan_generator_loss


def gan_head(nets: Nets) -> GANHead:
    """The head on the fake score's bottleneck (a ``RoleSpec.build``)."""
    return GANHead.for_denoiser(nets["fake_score"])


class DiffusionGAN:
    """DMD2's GAN term (module docstring).

    Args:
        weight: the generator's GAN loss weight (DMD2 ``gen_cls_loss_weight``; 0: no generator term, the head then
            only serves f-distill's density ratio).
        critic_weight: the head's classification loss weight in the critic phase (DMD2 ``guidance_cls_loss_weight``).
        t_max: end of the noised inputs' times, itself left out (DMD2 ``diffusion_gan_max_timestep`` / N).
        reals: the real samples (the run's data, DMD2, or the teacher's cached ODE samples: data-free).
        times: where step ``k``'s inputs are noised (DMD's ``multistep_matching``).
    """

    def __init__(self, *, weight: float, critic_weight: float, t_max: float, reals: CleanSamples, times: StepTimes):
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"method.gan_t_max must be in (0, 1], got {t_max}")
        self.weight, self.critic_weight, self.t_max = weight, critic_weight, t_max
        self.reals, self.times = reals, times

    def check_range(self, schedule, density: str) -> None:
        """The half-open ``[0, int(t_max N))`` must hold at least one timestep (grid position) to draw: DMD2's
        ``randint(0, 0)`` would fail on the first draw."""
        n = 1000 if density == "karras" else getattr(schedule, "num_train_timesteps", None)
        if n is not None and int(self.t_max * n) < 1:
            raise ValueError(f"method.gan_t_max: {self.t_max} x {n} timesteps leaves no GAN noise level to draw "
                             f"(the draw stops short of int(gan_t_max N)); use at least {1 / n:g}")

    def noised(self, x: torch.Tensor, schedule, k: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` noised at ``t ~ U[0, t_max)`` (step ``k``'s share of it with bands), and ``t``."""
        t = self.times.draw(schedule, x.shape[0], 0.0, self.t_max, gen, k, closed=False)
        return schedule.add_noise(x, noise_like(x, gen), t.to(x.device)), t

    def generator_loss(self, x: torch.Tensor, nets: Nets, cond, gen, k: int = 0) -> torch.Tensor:
        """The generator's loss of step ``k``'s output ``x`` (graph kept), per sample: the head on the fake score's
        features of a noised copy."""
        head = nets["discriminator"]
        x_gan, t_gan = self.noised(x, nets.teacher.schedule, k, gen)
        return gan_generator_loss(head(nets["fake_score"].features(x_gan, t_gan, cond, head.layers)))

    def critic_loss(self, x: torch.Tensor, k: int, cond, batch: Batch, nets: Nets, gen) -> LossOutput:
        """The head's classification loss (weighted): noised fakes ``x`` of step ``k`` against reals noised in the same
        band, each with its own condition (DMD2: a fake's prompt, a real image's caption; a teacher sample's prompt).
        The inputs go only as far as the head's feature block of the fake score."""
        head, fake_net = nets["discriminator"], nets["fake_score"]
        real, real_cond = self.reals.draw(batch)
        x_fake, t_fake = self.noised(x, fake_net.schedule, k, gen)
        x_real, t_real = self.noised(real, fake_net.schedule, k, gen)
        both = None if cond is None else {key: torch.cat([v, real_cond[key]]) for key, v in cond.items()}
        feats = fake_net.features(torch.cat([x_fake, x_real]), torch.cat([t_fake, t_real]), both, head.layers)
        logits_fake, logits_real = head(feats).chunk(2)
        cls = gan_critic_loss(logits_fake, logits_real)
        loss = self.critic_weight * cls
        return LossOutput(loss, {"loss_cls": cls.detach().mean(), "d_real": logits_real.detach().mean(),
                                 "d_fake": logits_fake.detach().mean(), "loss": loss.detach().mean()})
