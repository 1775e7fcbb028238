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

# What a student predicts: one real value per target, class logits (batch, classes), or a
# causal LM's next-token logits (batch, seq, vocabulary) for labels (batch, seq).
OutputKind = Literal["regression", "classification", "causal-lm"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("regression", "classification", "causal-lm")


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
    lengths, else from its ``attention_mask`` (left-padded batches of a causal LM); None
    for states that are not token sequences or batches that mark no padding."""
    if state.dim() != 3:
        return None
    if batch.lengths is not None:
        return torch.arange(state.shape[1], device=state.device) < batch.lengths.to(state.device)[:, None]
    mask = batch.student_kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(state.shape[:2]):
        return mask.to(state.device).bool()
    return None


def vocabulary(model: nn.Module) -> int | None:
    """The size of a language model's output vocabulary, read off its output embeddings
    (Hugging Face's ``get_output_embeddings``) without running it; None for other models."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


TAILS = ("renormalise", "other")


@dataclass(frozen=True)
class TopK:
    """A teacher's next-token distribution kept to its ``k`` most likely tokens per position:
    ``log_probs`` (batch, seq, k), log-probabilities under the full softmax at temperature 1,
    and their token ``indices`` (batch, seq, k); the tail's mass is ``1 - sum(exp(log_probs))``.
    What a top-k teacher cache holds instead of the full logits (k = 100 of SmolLM2's 49,152
    words is 0.2% of their size). ``tail``: how the losses treat the mass past the k tokens
    (``losses.bucket_log_probs``). It moves and is cut like the tensors of a batch
    (``to``, indexing), so the batches carry it where they would carry logits."""

    log_probs: torch.Tensor
    indices: torch.Tensor
    tail: str = "renormalise"

    def __post_init__(self):
        if self.tail not in TAILS:
            raise ValueError(f"unknown tail {self.tail!r}; valid: {', '.join(TAILS)}")

    @classmethod
    def of(cls, logits: torch.Tensor, k: int, tail: str = "renormalise") -> TopK:
        """The top ``k`` of ``logits`` (..., vocabulary)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        values, indices = log_probs.topk(k, dim=-1)
        return cls(values, indices, tail)

    @property
    def shape(self) -> torch.Size:
        return self.log_probs.shape

    @property
    def device(self) -> torch.device:
        return self.log_probs.device

    def dim(self) -> int:
        return self.log_probs.dim()

    def __len__(self) -> int:
        return len(self.log_probs)

    def is_floating_point(self) -> bool:
        return False  # (kept as it is where a float tensor would be cast to float32)

    def rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TopK:
        """Both tensors through ``fn`` (a cut or a move)."""
        return TopK(fn(self.log_probs), fn(self.indices), self.tail)

    def to(self, device: torch.device | str) -> TopK:
        return self.rows(lambda x: x.to(device))

    def __getitem__(self, index) -> TopK:
        return self.rows(lambda x: x[index])
