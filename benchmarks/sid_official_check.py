"""Our SiD generator loss (``terms.sid_loss``) against the official one on the same inputs.

    python benchmarks/sid_official_check.py --repo PATH_TO_A_CHECKOUT_OF_mingyuanzhou/SiD [--alpha 1.2]

Runs the official ``training/sid_loss.py`` (``SID_EDMLoss.generator_loss``, Apache-2.0; loaded from the checkout, not
copied here; its ``torch_utils.persistence`` decorator is replaced by the identity) with two analytic EDM denoisers
standing in for the teacher and the fake score (Gaussian data with different means and scales, so ``y_r != y_f``), a
generator output ``images`` that requires grad, and a seeded RNG. Hooks record the noised input and both scores'
outputs; ``terms.sid_loss`` is then evaluated on that same ``images``, ``y_real``, ``y_fake``. Printed: the largest
difference of the per-sample losses (official: the per-element loss summed over a sample's elements; ours: averaged,
so multiplied back by the element count) and of the gradients with respect to ``images`` (through both scores'
inputs), and a row with a NaN planted in the teacher's output (both drop it).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepdistill.methods.terms import sid_loss  # noqa: E402


def official_loss_class(repo: Path):
    """``SID_EDMLoss`` from the checkout, with ``torch_utils.persistence`` stubbed (it only pickles source code)."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    sys.modules.setdefault("torch_utils", package)
    sys.modules.setdefault("torch_utils.persistence", persistence)
    namespace: dict = {}
    source = (repo / "training" / "sid_loss.py").read_text()
    exec(compile(source, str(repo / "training" / "sid_loss.py"), "exec"), namespace)  # noqa: S102 - the reference
    return namespace["SID_EDMLoss"]


class GaussianScore:
    """The EDM denoiser of ``N(mean, std^2 I)`` data: ``D(x, sigma) = mean + std^2 / (std^2 + sigma^2) (x - mean)``,
    recording its inputs and outputs."""

    def __init__(self, mean: float, std: float, poison_row: int | None = None):
        self.mean, self.std, self.poison_row = mean, std, poison_row
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        out = self.mean + self.std**2 / (self.std**2 + sigma**2) * (x - self.mean)
        if self.poison_row is not None:
            out = out.clone()
            out[self.poison_row] = float("nan")
        self.seen.append((x, out))
        return out


def compare(loss_cls, alpha: float, poison: bool) -> dict:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    real, fake = GaussianScore(0.2, 0.6, 3 if poison else None), GaussianScore(-0.1, 0.9)
    official = loss_cls().generator_loss(real, fake, images, alpha=alpha)
    per_sample = official.sum(dim=(1, 2, 3))
    (g_official,) = torch.autograd.grad(per_sample.sum(), images, retain_graph=True)  # the scores are reused
    y_real, y_fake = real.seen[0][1], fake.seen[0][1]
    ours, logs = sid_loss(images, y_real, y_fake, alpha)
    ours = ours * images[0].numel()  # the official sums a sample's elements; ours averages them
    (g_ours,) = torch.autograd.grad(ours.sum(), images)
    return {"alpha": alpha, "nan_row": poison, "rows": [len(per_sample), len(ours)],
            "nan_rows_counted": int(logs["nan_rows"]),
            "max_loss_diff": float((per_sample - ours).detach().abs().max()),
            "loss_scale": float(per_sample.detach().abs().max()),
            "max_grad_diff": float((g_official - g_ours).abs().max()),
            "grad_scale": float(g_official.abs().max())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repo", type=Path, required=True, help="a checkout of github.com/mingyuanzhou/SiD")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.2, 1.0])
    args = p.parse_args()
    if not (args.repo / "training" / "sid_loss.py").is_file():
        sys.exit(f"sid_official_check: {args.repo} has no training/sid_loss.py (a checkout of mingyuanzhou/SiD?)")
    loss_cls = official_loss_class(args.repo)
    for alpha in args.alpha:
        for poison in (False, True):
            print(json.dumps(compare(loss_cls, alpha, poison)), flush=True)


if __name__ == "__main__":
    main()
