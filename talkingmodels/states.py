"""Vocabulary shared below the methods: what a hidden state looks like, how it is pooled to
one vector per example, which of its tokens are real, and what a task hands a method.

Tasks, the analysis and the methods all speak it; none of them needs the others for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

OutputKind = Literal["regression", "classification"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("regression", "classification")


@dataclass
class ModelPair:
    """What a method trains: the two models, their tapped layers, the task loss.

    ``student_layers`` / ``teacher_layers`` are ``(l, h)`` (``l`` runs before ``h``), or
    None for methods that read no hidden state (``scratch``, ``logit-kd``, ``dkd``, ``dist``).
    """

    student: nn.Module
    teacher: nn.Module
    student_layers: tuple[str, str] | None
    teacher_layers: tuple[str, str] | None
    output: OutputKind
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def feature_dim(state: torch.Tensor) -> int:
    """Width of a hidden state: channels for images (batch, C, H, W), else the last dim."""
    return state.shape[1] if state.dim() == 4 else state.shape[-1]


def pooled(state: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per example: the mean over the positions of an image state (batch, C, H, W)
    or over the tokens of a sequence state (batch, tokens, dim), only the real ones when a
    ``mask`` (batch, tokens) is given (:func:`token_mask` builds it from the batch's
    lengths); other states are flattened. Differentiable: the text models pool with it too."""
    if state.dim() == 4:
        return state.mean(dim=(2, 3))
    if state.dim() == 3:
        if mask is None:
            return state.mean(dim=1)
        weights = mask.unsqueeze(-1).to(state.dtype)
        return (state * weights).sum(1) / weights.sum(1).clamp(min=1)
    return state.flatten(1)


def token_mask(batch, state: torch.Tensor) -> torch.Tensor | None:
    """(batch, tokens) mask of the real tokens of a sequence state, from the batch's
    lengths; None for states that are not token sequences or batches without lengths."""
    if batch.lengths is None or state.dim() != 3:
        return None
    return torch.arange(state.shape[1], device=state.device) < batch.lengths.to(state.device)[:, None]
