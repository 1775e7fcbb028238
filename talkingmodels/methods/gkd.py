"""``gkd``: generalized knowledge distillation for causal LMs (Agarwal et al. 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes").

Per token, the student matches the teacher's next-token distribution under the generalized
Jensen-Shannon divergence ``JSD(beta)`` (``losses.generalized_jsd``): ``beta = 0`` is the
forward KL of plain token-level KD, ``beta = 1`` the reverse (mode-seeking) KL, ``0.5`` the
symmetric JSD. The values equal TRL's ``GKDTrainer.generalized_jsd_loss`` (a test checks it).

On-policy data (``lmbda``): on that share of the training steps the student first samples
its own continuations of the batch's prompts (its first ``prompt_tokens`` tokens) and the
divergence is taken on those samples, so the student learns from its own mistakes. Its cost:
the student generates ``seq - prompt_tokens`` tokens one by one (a forward per token with its
KV cache, no gradient), and the teacher runs live on the samples (a teacher cache cannot hold
states of text that does not exist yet). ``lmbda = 0`` (the default) is off-policy: the
batch's own text, and the teacher may be cached.
"""

from __future__ import annotations

import torch
from pydantic import Field

from talkingmodels import losses, taps
from talkingmodels.data import Batch
from talkingmodels.errors import UserError
from talkingmodels.methods.base import Distiller, MethodConfig
from talkingmodels.methods.registry import register


class GKDConfig(MethodConfig):
    weight: float = Field(1.0, ge=0, description="weight of the divergence term")
    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL(teacher || student), 1: "
                        "reverse KL(student || teacher), between: the generalized JSD")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions")
    supervised: bool = Field(True, description="also the task's next-token cross-entropy on the "
                             "labels (TRL's GKDTrainer trains on the divergence alone: false)")
    lmbda: float = Field(0.0, ge=0, le=1, description="share of the steps trained on the "
                         "student's own samples (on-policy); 0: the batch's text only")
    prompt_tokens: int = Field(8, ge=1, description="on-policy: tokens of each text kept as the "
                               "prompt the student continues (at most the batch's shortest text)")
    sample_temperature: float = Field(1.0, gt=0, description="on-policy: the student's sampling "
                                      "temperature")


@register("gkd")
class GKD(Distiller):
    """Task loss (optional) + w * JSD(beta) between the teacher's and the student's next-token
    distributions, on the batch's text or, on a share ``lmbda`` of the steps, the student's own."""

    Config = GKDConfig
    outputs = ("causal-lm",)

    @classmethod
    def reads_teacher_output(cls, config: GKDConfig) -> bool:
        return config.weight > 0

    def __init__(self, pair, config: GKDConfig):
        super().__init__(pair, config)
        if config.lmbda > 0 and not callable(getattr(pair.student, "generate", None)):
            raise UserError(f"gkd with lmbda {config.lmbda} samples from the student, but "
                            f"{type(pair.student).__name__} has no generate() (a Hugging Face "
                            "causal LM has); use lmbda 0")

    def divergence(self, prediction: torch.Tensor, teacher, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return losses.scaled(losses.generalized_jsd(prediction, teacher, labels, cfg.beta, cfg.temperature),
                             cfg.weight)

    def forward_train(self, batch: Batch):
        prediction = taps.prediction(batch.run_student(self.student))
        terms = {"task": self.task_loss(prediction, batch.target)} if self.config.supervised else {}
        if self.training and self.config.lmbda > 0 and float(torch.rand(())) < self.config.lmbda:
            sampled = self.on_policy(batch)
            own = taps.prediction(sampled.run_student(self.student))
            terms["gkd"] = self.divergence(own, self.teacher_states(sampled)["output"], sampled.target)
        else:
            terms["gkd"] = self.divergence(prediction, self.teacher_states(batch)["output"], batch.target)
        return prediction, terms

    @torch.no_grad()
    def on_policy(self, batch: Batch) -> Batch:
        """The batch with its texts replaced by the student's continuations of their first
        ``prompt_tokens`` tokens (sampled, as long as the batch's texts); the prompt's
        labels are -100, so the divergence is taken on the sampled tokens only."""
        ids, mask = batch.student_kwargs.get("input_ids"), batch.student_kwargs.get("attention_mask")
        if ids is None:
            raise UserError("gkd on-policy needs dict batches with input_ids (and attention_mask)")
        shortest = int(mask.sum(1).min()) if mask is not None else ids.shape[1]
        prompt = max(1, min(self.config.prompt_tokens, shortest, ids.shape[1] - 1))
        was_training = self.student.training
        self.student.eval()
        try:
            generated = self.student.generate(
                input_ids=ids[:, :prompt], attention_mask=torch.ones_like(ids[:, :prompt]),
                max_new_tokens=ids.shape[1] - prompt, min_new_tokens=ids.shape[1] - prompt,
                do_sample=True, temperature=self.config.sample_temperature, top_k=0, top_p=1.0,
                pad_token_id=0)
        finally:
            self.student.train(was_training)
        labels = generated.clone()
        labels[:, :prompt] = losses.IGNORE
        kwargs = {"input_ids": generated, "attention_mask": torch.ones_like(generated)}
        return Batch((), (), labels, student_kwargs=kwargs, teacher_kwargs=kwargs)
