"""Encoders and decoders of the channel: shapes for vectors, sequences and images, per role."""

from __future__ import annotations

import pytest
import torch

from talkingmodels.channel import Decoder, Encoder, Speaker

KINDS = ["linear", "dense-relu-dense"]
DIMS = {"l": 6, "h": 4}  # the two tapped layers of one model differ in width
M = 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("kind", KINDS)
def test_vector_shapes_per_role(kind):
    encoder, decoder = Encoder(DIMS, M, kind, hidden=5), Decoder(DIMS, M, kind, hidden=5)
    for role, dim in DIMS.items():
        message = encoder(torch.randn(2, dim), role)
        assert message.shape == (2, M)
        assert decoder(message, role).shape == (2, dim)
    with pytest.raises(RuntimeError):  # a state of the wrong width for its role
        encoder(torch.randn(2, DIMS["h"]), "l")


@pytest.mark.parametrize("kind", KINDS)
def test_sequences_are_handled_per_token(kind):
    encoder, decoder = Encoder(DIMS, M, kind, hidden=5), Decoder(DIMS, M, kind, hidden=5)
    states = torch.randn(2, 7, DIMS["l"])  # (batch, tokens, dim)
    messages = encoder(states, "l")
    assert messages.shape == (2, 7, M)
    decoded = decoder(messages, "h")
    assert decoded.shape == (2, 7, DIMS["h"])
    for t in range(7):
        assert torch.allclose(messages[:, t], encoder(states[:, t], "l"), atol=1e-6)
        assert torch.allclose(decoded[:, t], decoder(messages[:, t], "h"), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_images_are_handled_per_position(kind):
    encoder, decoder = Encoder(DIMS, M, kind, hidden=5), Decoder(DIMS, M, kind, hidden=5)
    states = torch.randn(2, DIMS["h"], 3, 5)  # (batch, channels, height, width)
    messages = encoder(states, "h")
    assert messages.shape == (2, M, 3, 5)
    decoded = decoder(messages, "l")
    assert decoded.shape == (2, DIMS["l"], 3, 5)
    for i in range(3):
        for j in range(5):
            assert torch.allclose(messages[:, :, i, j], encoder(states[:, :, i, j], "h"), atol=1e-6)
            assert torch.allclose(decoded[:, :, i, j], decoder(messages[:, :, i, j], "l"), atol=1e-6)


def test_linear_kind_is_one_affine_map_per_role():
    encoder, decoder = Encoder(DIMS, M, "linear"), Decoder(DIMS, M, "linear")
    x = torch.randn(4, DIMS["l"])
    layer = encoder.inputs["l"]
    assert torch.allclose(encoder(x, "l"), x @ layer.weight.T + layer.bias)
    # per role: its own input width, the shared message width
    assert {r: tuple(m.weight.shape) for r, m in encoder.inputs.items()} == {"l": (M, 6), "h": (M, 4)}
    assert {r: tuple(m.weight.shape) for r, m in decoder.outputs.items()} == {"l": (6, M), "h": (4, M)}
    # linear: a linear map (up to the bias), so it commutes with sums
    a, b = torch.randn(4, M), torch.randn(4, M)
    bias = decoder.outputs["h"].bias
    assert torch.allclose(decoder(a + b, "h") - bias, (decoder(a, "h") - bias) + (decoder(b, "h") - bias),
                          atol=1e-5)


def test_dense_relu_dense_kind_by_hand():
    encoder = Encoder(DIMS, M, "dense-relu-dense", hidden=5)
    decoder = Decoder(DIMS, M, "dense-relu-dense", hidden=5)
    x = torch.randn(4, DIMS["h"])
    first, second = encoder.inputs["h"], encoder.trunk[1]
    expected = torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    assert torch.allclose(encoder(x, "h"), expected, atol=1e-6)
    message = torch.randn(4, M)
    first, second = decoder.trunk[0], decoder.outputs["l"]
    expected = torch.relu(message @ first.weight.T + first.bias) @ second.weight.T + second.bias
    assert torch.allclose(decoder(message, "l"), expected, atol=1e-6)
    # per role: the input projection goes into the shared hidden width
    assert tuple(encoder.inputs["l"].weight.shape) == (5, 6)
    assert tuple(decoder.outputs["h"].weight.shape) == (4, 5)


def test_speaker_holds_an_encoder_and_a_decoder():
    speaker = Speaker({"l": 10, "h": 2}, {"h": 2}, 4, "dense-relu-dense", 8)
    assert isinstance(speaker.encoder, Encoder) and isinstance(speaker.decoder, Decoder)
    assert speaker.decoder(speaker.encoder(torch.randn(3, 10), "l"), "h").shape == (3, 2)
    # it decodes only at the layers it listens at
    assert set(speaker.encoder.inputs) == {"l", "h"} and set(speaker.decoder.outputs) == {"h"}


def test_to_grid_resizes_messages_to_the_listener():
    from talkingmodels.channel import to_grid

    message = torch.arange(16.0).view(1, 1, 4, 4)
    pooled = to_grid(message, torch.zeros(1, 7, 2, 2))
    assert torch.equal(pooled, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))  # 2x2 means
    assert to_grid(message, torch.zeros(1, 3, 8, 8)).shape == (1, 1, 8, 8)  # upsampled
    assert to_grid(message, torch.zeros(1, 3, 4, 4)) is message
    assert torch.equal(to_grid(message, torch.zeros(1, 5)), torch.tensor([[7.5]]))  # grid -> vector
    vector = torch.tensor([[1.0, 2.0]])
    assert torch.equal(to_grid(vector, torch.zeros(1, 9, 3, 3)),
                       vector[:, :, None, None].expand(1, 2, 3, 3))  # vector -> grid
    assert to_grid(vector, torch.zeros(1, 4)) is vector
