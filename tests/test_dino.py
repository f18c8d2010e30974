"""The frozen DINOv2 feature network of ADD's discriminator (``nets/dino.py``), on the random tiny network (no
pretrained weights exist offline): shapes, frozen-but-differentiable, layer selection against the model's own hidden
states, seeding, and the one-line error for missing weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.nets.dino import DinoFeatures, default_layers, load_dino, tiny_dinov2_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dino() -> DinoFeatures:
    return load_dino(tiny=True)


def test_tiny_defaults(dino):
    config = tiny_dinov2_config()
    assert dino.resolution == config.image_size == 32
    assert dino.layers == (0, 1, 2, 3) == default_layers(4)
    assert dino.hidden_size == 32 and dino.channels == [32] * 4
    assert default_layers(12) == (2, 5, 8, 11)  # StyleGAN-T's hooks on ViT-S
    assert default_layers(2) == (0, 1) and default_layers(1) == (0,)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 32, 32), (1, 3, 17, 45), (3, 1, 9, 9)])
def test_shapes(dino, shape):
    feats, cls = dino(torch.rand(shape) * 2 - 1)
    assert [tuple(f.shape) for f in feats] == [(shape[0], 32, 8, 8)] * 4
    assert tuple(cls.shape) == (shape[0], 32)
    assert all(torch.isfinite(f).all() for f in feats) and torch.isfinite(cls).all()


def test_greyscale_is_repeated(dino):
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    (a, ca), (b, cb) = dino(grey), dino(grey.repeat(1, 3, 1, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(ca, cb)


@pytest.mark.parametrize("channels", [2, 4])
def test_bad_channels(dino, channels):
    with pytest.raises(ValueError, match="1 or 3") as err:
        dino(torch.zeros(1, channels, 32, 32))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("size", [32, 20])  # at the network's resolution, and resized (bilinear) from another
def test_frozen_but_differentiable(dino, size):
    images = (torch.rand(2, 3, size, size) * 2 - 1).requires_grad_(True)
    feats, cls = dino(images)
    (sum(f.sum() for f in feats) + cls.sum()).backward()
    assert all(not p.requires_grad and p.grad is None for p in dino.parameters())
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_stays_in_eval(dino):
    parent = nn.ModuleDict({"dino": dino, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in dino.modules())
    dino.train(True)
    assert not any(m.training for m in dino.modules())


def test_seeded():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_dino(tiny=True).state_dict()
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is untouched
    b = load_dino(tiny=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reference(dino, images):
    """The model run by hand: [-1, 1] -> [0, 1], bilinear resize, ImageNet normalisation, all hidden states."""
    x = F.interpolate((images + 1) / 2, size=(dino.resolution,) * 2, mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean[:, None, None]) / std[:, None, None]
    return dino.model(pixel_values=x, output_hidden_states=True)


@pytest.mark.parametrize("layers, picked", [(None, (0, 1, 2, 3)), ((3, 1), (1, 3)), ((2, 2, 9, -1), (2, 3))])
def test_layers_read_the_right_hidden_states(dino, layers, picked):
    net = DinoFeatures(dino.model, layers=layers)
    assert net.layers == picked and net.channels == [32] * len(picked)
    images = torch.rand(2, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        feats, cls = net(images)
        ref = _reference(net, images)
    assert len(ref.hidden_states) == 5  # the embedding output, then one per block
    for i, f in zip(picked, feats):
        tokens = ref.hidden_states[i + 1]  # the output of block i
        assert torch.allclose(f.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5)
        assert torch.allclose(f[:, :, 1, 2], tokens[:, 1 + 1 * 8 + 2], atol=1e-5)  # row by row on the 8 x 8 grid
    assert torch.allclose(cls, ref.last_hidden_state[:, 0], atol=1e-5)
    assert torch.allclose(cls, net.model.layernorm(ref.hidden_states[-1])[:, 0], atol=1e-5)


def test_resolution():
    net = load_dino(tiny=True, resolution=16)
    feats, _ = net(torch.zeros(1, 3, 32, 32))
    assert tuple(feats[0].shape) == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="patch size"):
        load_dino(tiny=True, resolution=18)


def test_missing_weights(tmp_path):
    with pytest.raises(ValueError) as err:
        load_dino(tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message and message.startswith("method.dino_weights:")
    assert "nowhere" in message and "method.dino_tiny" in message


def test_folder_without_model(tmp_path):
    with pytest.raises(ValueError) as err:
        load_dino(tmp_path)
    assert "\n" not in str(err.value) and str(err.value).startswith("method.dino_weights:")


def test_hub_id_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as err:
        load_dino("no-such-owner/no-such-dinov2")
    message = str(err.value)
    assert "\n" not in message and "method.dino_weights" in message and "hub unreachable" in message


def test_saved_folder_round_trip(dino, tmp_path):
    dino.model.save_pretrained(tmp_path)
    loaded = load_dino(tmp_path, layers=(1,))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        (a,), ca = loaded(images)
        b, cb = dino(images)
    assert torch.allclose(a, b[1]) and torch.allclose(ca, cb)


def test_register_tokens_are_dropped():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no Dinov2WithRegistersModel")
    config = transformers.Dinov2WithRegistersConfig(**{**tiny_dinov2_config().to_dict(), "num_register_tokens": 4})
    torch.manual_seed(0)
    net = DinoFeatures(transformers.Dinov2WithRegistersModel(config), layers=(2,))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        (f,), cls = net(images)
        ref = _reference(net, images)
    tokens = ref.hidden_states[3]
    assert tokens.shape[1] == 1 + 4 + 64  # CLS, registers, patches
    assert torch.allclose(f.flatten(2).transpose(1, 2), tokens[:, 5:], atol=1e-5)
    assert torch.allclose(cls, ref.last_hidden_state[:, 0], atol=1e-5)
