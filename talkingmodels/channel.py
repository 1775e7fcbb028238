"""The channel: encoders (hidden state -> message) and decoders (message -> hidden state).

Each model of a talking pair gets one encoder and one decoder. A model's tapped layers
may differ in width, so an encoder holds one input projection per layer it speaks from
and a decoder one output projection per layer it listens at; layers are named by their
role (``"l"`` or ``"h"``). Modules act on the feature dimension only, so sequence states
``(batch, tokens, dim)`` are handled per token and spatial states ``(batch, channels,
height, width)`` per position (a 1x1 map). Where the speaker's grid differs from the
listener's, :func:`to_grid` resizes the message to the listener's grid.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ChannelKind = Literal["linear", "dense-relu-dense"]


def _features_last(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` over the feature dimension: last for vectors/sequences, 1 for images."""
    if x.dim() == 4:
        return fn(x.movedim(1, -1)).movedim(-1, 1)
    return fn(x)


def _then(trunk: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``trunk(x)``; a linear channel has no trunk (None: no module call per message, which
    a model of tiny layers feels)."""
    return x if trunk is None else trunk(x)


def to_grid(message: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``message`` laid out on the spatial grid of the state ``like``.

    Images: a larger grid is average-pooled down (each listener position hears the mean of
    the speaker positions it covers), a smaller one is bilinearly upsampled. A vector
    message is broadcast over a grid; a grid message is averaged for a vector listener.
    """
    if like.dim() == 4:
        if message.dim() == 2:
            return message[:, :, None, None].expand(-1, -1, *like.shape[-2:])
        size, grid = tuple(like.shape[-2:]), tuple(message.shape[-2:])
        if grid == size:
            return message
        if grid[0] >= size[0] and grid[1] >= size[1]:
            return F.adaptive_avg_pool2d(message, size)
        return F.interpolate(message, size=size, mode="bilinear", align_corners=False)
    if message.dim() == 4:
        return message.mean(dim=(2, 3))
    return message


class Encoder(nn.Module):
    """Hidden state of one of its model's layers -> message of width ``message_dim``.

    ``linear``: one Linear per layer. ``dense-relu-dense``: a Linear per layer into a
    shared hidden width, then ReLU and a shared Linear into the message space.
    """

    def __init__(self, dims: dict[str, int], message_dim: int, kind: ChannelKind = "linear",
                 hidden: int = 64):
        super().__init__()
        width = message_dim if kind == "linear" else hidden
        self.inputs = nn.ModuleDict({role: nn.Linear(dim, width) for role, dim in dims.items()})
        self.trunk = None if kind == "linear" else nn.Sequential(nn.ReLU(), nn.Linear(hidden, message_dim))

    def forward(self, state: torch.Tensor, role: str) -> torch.Tensor:
        """``state`` (batch, ..., dim of layer ``role``) -> message (batch, ..., m)."""
        return _features_last(lambda x: _then(self.trunk, self.inputs[role](x)), state)


class Decoder(nn.Module):
    """Message -> hidden state of the layer ``role`` of its model (mirror of Encoder)."""

    def __init__(self, dims: dict[str, int], message_dim: int, kind: ChannelKind = "linear",
                 hidden: int = 64):
        super().__init__()
        width = message_dim if kind == "linear" else hidden
        self.trunk = None if kind == "linear" else nn.Sequential(nn.Linear(message_dim, hidden), nn.ReLU())
        self.outputs = nn.ModuleDict({role: nn.Linear(width, dim) for role, dim in dims.items()})

    def forward(self, message: torch.Tensor, role: str) -> torch.Tensor:
        """``message`` (batch, ..., m) -> state (batch, ..., dim of layer ``role``)."""
        return _features_last(lambda x: self.outputs[role](_then(self.trunk, x)), message)


class Speaker(nn.Module):
    """One model's side of the channel: an encoder for the layers it speaks from and a
    decoder for the layers it listens at (only those, so no parameter stays untrained)."""

    def __init__(self, speaks: dict[str, int], listens: dict[str, int], message_dim: int,
                 kind: ChannelKind = "linear", hidden: int = 64):
        super().__init__()
        self.encoder = Encoder(speaks, message_dim, kind, hidden)
        self.decoder = Decoder(listens, message_dim, kind, hidden)
