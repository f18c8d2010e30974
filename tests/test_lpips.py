"""LPIPS (``nets/lpips.py``) against the reference ``lpips`` package on the same weights, and DMD (v1)'s regression
with it. No pretrained weights exist offline: both implementations load the same random weights, written in the
layouts torchvision and LPIPS publish (the reference runs against a stand-in ``torchvision.models`` that builds the
features from that file)."""

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.config import ConfigError, build_recipe
from stepdistill.nets.lpips import LPIPS, NETS, _layer, load_lpips
from stepdistill.train import Trainer

from ._recipes import dmd_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchvision_features(net: str) -> nn.Sequential:
    """torchvision's whole ``features`` stack (beyond the last LPIPS tap), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(*(_layer(s) for s in NETS[net].layers))


def _weights(folder, net: str) -> None:
    """A backbone checkpoint (features plus a classifier LPIPS ignores) and positive heads, in the published keys."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"features.{k}": v for k, v in _torchvision_features(net).state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 4)
    torch.save(state, folder / NETS[net].backbone_file)
    g = torch.Generator().manual_seed(1)
    heads = LPIPS(net).heads
    torch.save({f"lin{k}.model.1.weight": torch.rand(h.weight.shape, generator=g) for k, h in enumerate(heads)},
               folder / f"{net}.pth")


@pytest.fixture
def reference_lpips(monkeypatch):
    """The ``lpips`` package (installed with --no-deps) importing a stand-in torchvision."""
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the lpips reference is installed by the README's test command (pip install --no-deps lpips)")
    models = types.SimpleNamespace(
        vgg16=lambda pretrained=False, **_: types.SimpleNamespace(features=_torchvision_features("vgg")),
        alexnet=lambda pretrained=False, **_: types.SimpleNamespace(features=_torchvision_features("alex")))
    fake = types.ModuleType("torchvision")
    fake.models = models
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("lpips")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_the_reference_package(tmp_path, reference_lpips, net):
    _weights(tmp_path, net)
    ours = load_lpips(net, tmp_path)
    ref = reference_lpips.LPIPS(net=net, model_path=str(tmp_path / f"{net}.pth"), verbose=False).eval()
    g = torch.Generator().manual_seed(2)
    x, y = (torch.rand(3, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
    ours.upsample_below = 0  # the reference never resizes; resizing is tested below
    with torch.no_grad():
        expected = ref(x, y).flatten()
        torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    assert (expected > 0).all()


def test_lpips_properties_resize_and_greyscale(tmp_path):
    _weights(tmp_path, "alex")
    d = load_lpips("alex", tmp_path)
    g = torch.Generator().manual_seed(3)
    x, y = (torch.rand(2, 1, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        assert torch.equal(d(x, x), torch.zeros(2))
        torch.testing.assert_close(d(x, y), d(y, x))
        # 8x8 greyscale = the same image in three channels, bilinearly upsampled to 224 (consistency models' LPIPS)
        up = [F.interpolate(v.expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear", align_corners=False)
              for v in (x, y)]
        d.upsample_below = 0
        expected = d(*up)
        d.upsample_below = 256
        torch.testing.assert_close(d(x, y), expected)
    x.requires_grad_(True)
    d(x, y).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in d.parameters())


def test_missing_weights_name_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*vgg.pth"):
        load_lpips("vgg", tmp_path / "nowhere")


def _lpips_trainer(tmp_path, name, **over):
    recipe = dmd_recipe(**{"teacher": {"tiny": "unet2d"}, "student": {"init": "teacher"}, "method.gan_weight": 0.0,
                           "method.regression_weight": 0.25, "method.regression_loss": "lpips",
                           "method.lpips_net": "alex", "method.num_pairs": 4, "method.pair_steps": 2,
                           "data.batch_size": 2, "train.max_steps": 2, "train.checkpoint_every": 0,
                           "eval.num_samples": 4, "eval.teacher_full_steps": 2, **over})
    return Trainer(build_recipe(recipe), tmp_path / name, show_progress=False).setup()


def test_dmd_regression_with_lpips_trains_and_missing_weights_are_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    _weights(tmp_path / "w", "alex")
    trainer = _lpips_trainer(tmp_path, "a", **{"method.lpips_weights": str(tmp_path / "w")})
    lpips = trainer.method.ode.lpips
    assert isinstance(lpips, LPIPS) and not any(p.requires_grad for p in lpips.parameters())
    logs = trainer.train()
    assert "loss_reg/student" in logs and torch.isfinite(torch.tensor(logs["loss_reg/student"]))
    with pytest.raises(ConfigError, match="regression_loss: LPIPS needs local weights"):
        _lpips_trainer(tmp_path, "b", **{"method.lpips_weights": str(tmp_path / "empty")})
    assert not (tmp_path / "b").exists()
