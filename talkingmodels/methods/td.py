"""``td``: Talking-model Distillation (Zhao et al. 2023); see docs/method.md.

One round: the student asks ``q = E_S(s_l)``; the teacher reads the question into its
lower layer ``t'_l = D_T(q)``, interprets it with its own frozen layers
``t'_h = T[l -> h](t'_l)`` and answers ``a = E_T(t'_h)``; the student reads the answer
``s'_h = D_S(a)``. ``L_interact = d(s_h, s'_h)``. Round ``r+1`` asks with ``E_S(s'_h(r))``.

Consistency: ``L_MC = d(E_S(s_h), E_T(t_h))`` (also or instead at ``l``: ``mc_layers``) and
``L_SC = d(D_T(E_T(t_l)), t_l) + d(D_S(E_S(s_h)), s_h)``.
Objective: ``L_task + w0 L_kd + w1 L_interact + w2 L_MC + w3 L_SC`` plus two optional
"answer" terms of ours (see ``answer_kd`` and ``answer_task``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from talkingmodels import losses, taps
from talkingmodels.channel import ChannelKind, Speaker, to_grid
from talkingmodels.data import Batch
from talkingmodels.methods.base import MethodConfig
from talkingmodels.methods.logit_kd import LogitKD, LogitKDConfig, output_kd
from talkingmodels.methods.registry import register
from talkingmodels.states import token_mask

Detachable = Literal["question", "answer", "student_state"]


class ChannelConfig(MethodConfig):
    """TD's channel and consistency terms (shared with the ``kd-modules`` control)."""

    message_dim: int = Field(16, ge=1, description="m: width of the message space")
    channel: ChannelKind = "linear"
    channel_hidden: int = Field(64, ge=1, description="hidden width of dense-relu-dense")
    distance: Literal["mse", "cosine"] = "mse"
    w2: float = Field(1.0, ge=0, description="weight of L_MC (message consistency)")
    w3: float = Field(1.0, ge=0, description="weight of L_SC (state consistency)")
    message_consistency: bool = True
    mc_layers: list[Literal["l", "h"]] = Field(
        default_factory=lambda: ["h"], min_length=1,
        description="(ours) layer pairs whose messages L_MC aligns; 'l' grounds the question "
        "in the teacher's own view of the input")
    state_consistency: bool = True


class TDConfig(LogitKDConfig, ChannelConfig):
    rounds: int = Field(1, ge=0, description="rounds of interaction; 0 = no interaction")
    # `weight` (inherited) is w0, the logit-KD term; 0 gives pure communication.
    w1: float = Field(1.0, ge=0, description="weight of L_interact")
    stop_gradient: list[Detachable] = Field(
        default_factory=list,
        description="question: the student's lower layers do not learn through its question; "
        "answer: s'_h is a fixed target for s_h; student_state: s_h is a fixed target for s'_h",
    )
    listen: Literal["replace", "add", "gate"] = Field(
        "replace", description="how the teacher reads a question into its layer l: 'replace' its "
        "state by D_T(q) (the paper), or (ours, after the patent's question that describes the "
        "input) 'add' D_T(q) to its own state t_l of the same input, or 'gate': g * t_l + "
        "(1 - g) * D_T(q) with g = sigmoid of a learned per-feature vector (starts at 0.5)")
    round_consistency: bool = Field(
        False, description="(reviews) consistency in every exchange: L_SC on the decoded question, "
        "d(D_T(q), t_l), and L_MC between the question q and the answer E_T(t'_h) of the same "
        "exchange, weighted by w3 and w2 and averaged over the rounds like L_interact")
    round_weights: list[float] | None = Field(
        None, description="(ours) one weight >= 0 per round for L_interact and the per-round "
        "consistency (normalised to sum 1); default: equal weights")
    answer_kd: float = Field(
        0.0, ge=0, description="(ours) weight of KD towards the teacher's head applied to t'_h")
    answer_task: float = Field(
        0.0, ge=0, description="(ours) weight of the task loss of the student's head on s'_h")
    answer_fit: float = Field(
        0.0, ge=0, description="(ours) weight of the task loss of the teacher's head on t'_h: "
        "the student must ask questions from which the teacher can answer the task")
    # Cheaper interaction (ours; off by default): the interpretation step, the teacher's
    # layers l -> h run forward and backward, is most of TD's cost. Measured in
    # benchmarks/README.md ("A cheaper interpretation step").
    interact_fraction: float = Field(
        1.0, gt=0, le=1, description="(ours) share of each batch that interacts: the exchange "
        "runs on ceil(f * batch) examples spread evenly over the batch")
    interact_every: int = Field(
        1, ge=1, description="(ours) interact on every k-th training step only; the other steps "
        "train on the remaining terms")
    interact_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="(ours) bf16: the teacher's layers l -> h run under bfloat16 "
        "autocast in the interaction (the rest of the step keeps its precision)")
    # Diagnostics (ours): does the exchange carry what this teacher knows? Each breaks one
    # link and keeps everything else; if TD is no better than a diagnostic, it does not.
    interpreter: Literal["teacher", "random"] = Field(
        "teacher", description="(diagnostic) random: the question is interpreted by a frozen copy "
        "of the teacher re-initialised (each layer's PyTorch default initialisation, seeded by "
        "the run); logit KD, t_l and t_h still come from the pre-trained teacher")
    answers: Literal["matched", "shuffled"] = Field(
        "matched", description="(diagnostic) shuffled: each example receives the answer to the "
        "next example's question in its batch (a cyclic shift: never its own)")

    @model_validator(mode="after")
    def _one_weight_per_round(self):
        weights = self.round_weights
        if weights is not None and (len(weights) != self.rounds or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"round_weights {weights} must give one weight >= 0 per round "
                             f"(rounds: {self.rounds}), not all 0")
        return self


class Consistency:
    """Mixin: the channel (one Speaker per model) and its consistency terms L_MC and L_SC."""

    needs_layers = True

    def build(self, batch: Batch) -> None:
        super().build(batch)  # (kd-modules: hybrid's regressor first)
        config = self.config
        s_dims = self.state_dims(batch, "student")
        t_dims = self.state_dims(batch, "teacher")
        args = (config.message_dim, config.channel, config.channel_hidden)
        # The student listens at h (answers, L_SC); the teacher listens at l (questions, L_SC).
        self.student_side = Speaker(s_dims, {"h": s_dims["h"]}, *args)
        self.teacher_side = Speaker(t_dims, {"l": t_dims["l"]}, *args)
        self.distance = losses.DISTANCES[config.distance]

    def consistency_terms(self, s_l: torch.Tensor, s_h: torch.Tensor, t_l: torch.Tensor,
                          t_h: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The weighted L_MC ("mc") and L_SC ("sc") terms that are switched on; over the real
        tokens of ``mask`` for batches of sentences (both models see the same tokens)."""
        cfg, terms = self.config, {}
        E_S, D_S = self.student_side.encoder, self.student_side.decoder
        E_T, D_T = self.teacher_side.encoder, self.teacher_side.decoder
        if cfg.message_consistency and cfg.w2 > 0:
            pairs = {"l": (s_l, t_l), "h": (s_h, t_h)}
            terms["mc"] = losses.scaled(losses.total(
                # (the teacher's message laid out on the student's grid)
                self.distance(E_S(pairs[role][0], role),
                              to_grid(E_T(pairs[role][1], role), pairs[role][0]), mask)
                for role in cfg.mc_layers), cfg.w2, len(cfg.mc_layers))
        if cfg.state_consistency and cfg.w3 > 0:
            terms["sc"] = losses.scaled(self.distance(D_T(E_T(t_l, "l"), "l"), t_l, mask)
                                        + self.distance(D_S(E_S(s_h, "h"), "h"), s_h, mask), cfg.w3)
        return terms


@register("td")
class TalkingDistillation(Consistency, LogitKD):
    """Talking-model Distillation: the student asks, the frozen teacher interprets and answers."""

    Config = TDConfig

    @classmethod
    def reads_teacher_output(cls, config: TDConfig) -> bool:
        return config.weight > 0 or config.answer_kd > 0

    def build(self, batch: Batch) -> None:
        super().build(batch)
        if self.config.interpreter == "random":
            self.random_teacher = _reinitialised(self.teacher)
        if self.config.listen == "gate":  # g = sigmoid(0) = 0.5: half own view, half question
            self.listen_gate = torch.nn.Parameter(torch.zeros(self.state_dims(batch, "teacher")["l"]))
        if self.config.interact_every > 1:
            # counts training steps; a buffer, so that a checkpoint resumes the cadence
            self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))
        self._step = None  # (read from steps_trained at the first step)

    # The diagnostic's twin (interpreter: random, built with the method) is frozen like the
    # teacher: never trained, left out of checkpoints and of the parameter count.
    def frozen_modules(self):
        frozen = super().frozen_modules()
        if (twin := self._modules.get("random_teacher")) is not None:
            frozen["random_teacher"] = twin
        return frozen

    def _twin_parameters(self) -> list[torch.nn.Parameter]:
        twin = self._modules.get("random_teacher")
        return [] if twin is None else list(twin.parameters())

    def learnable_parameters(self):
        twin = {id(p) for p in self._twin_parameters()}
        return [p for p in super().learnable_parameters() if id(p) not in twin]

    def extra_parameter_count(self) -> int:
        return super().extra_parameter_count() - sum(p.numel() for p in self._twin_parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if (twin := self._modules.get("random_teacher")) is not None:
            twin.eval()
        return self

    def _interacts_now(self) -> bool:
        """Whether this training step runs the interaction (``interact_every``). The count is
        read from the buffer once (it may come from a checkpoint), then kept in Python too:
        no device sync per step."""
        if self.config.interact_every == 1:
            return True
        if self._step is None:
            self._step = int(self.steps_trained)
        step, self._step = self._step, self._step + 1
        self.steps_trained.fill_(self._step)
        return step % self.config.interact_every == 0

    def _interaction_rows(self, size: int) -> torch.Tensor | None:
        """The examples that interact (``interact_fraction``), spread evenly over the batch
        (a text batch is sorted by length: its first rows would be its longest); None: all."""
        count = math.ceil(self.config.interact_fraction * size)
        return None if count >= size else torch.arange(count) * size // count

    def hear(self, question: torch.Tensor, t_l: torch.Tensor) -> torch.Tensor:
        """The decoded question D_T(q) on the teacher's grid at l."""
        return self.teacher_side.decoder(to_grid(question, t_l), "l")

    def interpret(self, question: torch.Tensor, t_l: torch.Tensor, batch: Batch,
                  heard: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher side of one exchange: question -> t'_h (the teacher's interpretation);
        ``heard``: D_T(q) when the caller has it already."""
        t_low, t_high = self.pair.teacher_layers
        heard = self.hear(question, t_l) if heard is None else heard
        if self.config.listen == "add":
            heard = t_l + heard
        elif self.config.listen == "gate":  # (per feature: the last dim of a token or a vector)
            gate = torch.sigmoid(self.listen_gate)
            if heard.dim() == 4:  # image maps (B, C, H, W): per channel
                gate = gate[:, None, None]
            heard = gate * t_l + (1 - gate) * heard
        # (entered only when asked: a disabled autocast still costs a context per step)
        with (torch.autocast(heard.device.type, torch.bfloat16)
              if self.config.interact_precision == "bf16" else contextlib.nullcontext()):
            # (interpreter: random: the re-initialised twin; else None, the teacher itself)
            return self.teacher_between(t_low, t_high, heard, batch, self._modules.get("random_teacher"))

    def forward_train(self, batch: Batch):
        cfg = self.config
        s_low, s_high = self.pair.student_layers
        t_low, t_high = self.pair.teacher_layers
        prediction, states = self.student_states(batch, (s_low, s_high))
        s_l, s_h = states[s_low], states[s_high]
        teacher = self.teacher_states(batch, (t_low, t_high))

        terms = {"task": self.pair.task_loss(prediction, batch.target)}
        if cfg.weight > 0:
            terms["kd"] = self.logit_term(prediction, teacher["output"], batch.target)

        if cfg.rounds > 0 and (not self.training or self._interacts_now()):
            terms.update(self.interaction_terms(prediction, s_l, s_h, teacher[t_low], batch))
        terms.update(self.consistency_terms(s_l, s_h, teacher[t_low], teacher[t_high],
                                            token_mask(batch, s_h)))
        return prediction, terms

    def interaction_terms(self, prediction: torch.Tensor, s_l: torch.Tensor, s_h: torch.Tensor,
                          t_l: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The weighted L_interact ("interact") and the answer terms that are switched on."""
        cfg, terms = self.config, {}
        s_high, t_high = self.pair.student_layers[1], self.pair.teacher_layers[1]
        E_S, D_S = self.student_side.encoder, self.student_side.decoder
        E_T = self.teacher_side.encoder
        rows = self._interaction_rows(len(batch))
        if rows is not None:  # the interacting examples only
            rows = rows.to(s_l.device)
            prediction, s_l, s_h, t_l = prediction[rows], s_l[rows], s_h[rows], t_l[rows]
            batch = batch.rows(rows)
        mask = token_mask(batch, s_h)  # real tokens (None: not sentences)
        asked = s_l.detach() if "question" in cfg.stop_gradient else s_l
        # a weighted mean over the rounds (x * 1.0 is exact: equal weights compute what the
        # plain mean always did; losses.scaled skips such factors)
        weights = cfg.round_weights or [1.0] * cfg.rounds
        interact, round_mc, round_sc = [], [], []
        s_high_answer = None
        for r, weight in enumerate(weights):
            # Round 1 asks from s_l; each follow-up asks from the last answer s'_h.
            question = E_S(asked, "l") if r == 0 else E_S(s_high_answer, "h")
            heard = self.hear(question, t_l)
            t_high_answer = self.interpret(question, t_l, batch, heard)
            if cfg.answers == "shuffled":  # example i hears the answer to question i + 1
                t_high_answer = t_high_answer.roll(-1, 0)
            answer_message = E_T(t_high_answer, "h")
            s_high_answer = D_S(to_grid(answer_message, s_h), "h")
            target = s_h.detach() if "student_state" in cfg.stop_gradient else s_h
            answer = s_high_answer.detach() if "answer" in cfg.stop_gradient else s_high_answer
            interact.append(losses.scaled(self.distance(answer, target, mask), weight))
            if cfg.round_consistency:
                # the decoded question must look like a state the teacher could have for this
                # input, and question and answer of one exchange must agree as messages
                said = to_grid(answer_message, question)
                round_sc.append(losses.scaled(self.distance(heard, t_l, mask), weight))
                round_mc.append(losses.scaled(self.distance(question, said, mask), weight))
        terms["interact"] = losses.scaled(losses.total(interact), cfg.w1, sum(weights))
        if cfg.round_consistency:
            terms["round_mc"] = losses.scaled(losses.total(round_mc), cfg.w2, sum(weights))
            terms["round_sc"] = losses.scaled(losses.total(round_sc), cfg.w3, sum(weights))
        if cfg.answer_kd > 0 or cfg.answer_fit > 0:
            # The teacher's own head reads its interpretation: an answer in output space.
            answer_output = self.teacher_between(t_high, None, t_high_answer, batch)
            if cfg.answer_kd > 0:
                terms["answer_kd"] = cfg.answer_kd * output_kd(
                    prediction, answer_output.detach(), self.pair.output, cfg.temperature, batch.target)
            if cfg.answer_fit > 0:
                terms["answer_fit"] = cfg.answer_fit * self.pair.task_loss(
                    answer_output, batch.target)
        if cfg.answer_task > 0:
            # The student's own head must solve the task from the answer it was given.
            answer_prediction = taps.run_between(self.student, s_high, None, s_high_answer,
                                                 *batch.student_inputs, **batch.student_kwargs)
            terms["answer_task"] = cfg.answer_task * self.pair.task_loss(
                answer_prediction, batch.target)
        return terms


def _reinitialised(teacher: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``teacher`` with every layer re-initialised (its own
    ``reset_parameters``: PyTorch's default initialisation, normalisation statistics reset).
    The global random stream is forked and seeded from the run's seed, so the copy is the
    same on every run of a seed and the rest of the run draws the numbers it would without it."""
    twin = copy.deepcopy(teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed())
        for module in twin.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            if callable(getattr(module, "reset_running_stats", None)):
                module.reset_running_stats()
    return twin.requires_grad_(False).eval()
