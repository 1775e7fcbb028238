"""``crd``: Contrastive Representation Distillation (Tian et al., ICLR 2020).

Student and teacher states at ``h`` (pooled to one vector per example) are embedded by
linear heads into a shared space of width ``feat_dim`` and L2-normalised. Each embedding
must pick out the other model's embedding of the same example among ``nce_k`` others drawn
from a memory bank of the whole training split (NCE loss, both directions). The bank holds
one momentum-averaged embedding per training example and model.

The bank is indexed by ``batch.index`` (the examples' rows in the training split). A
method does not see the split, so unless ``bank_size`` is given the bank grows to the
largest row seen: new rows start as in the official code (uniform, unnormalised) and
negatives are drawn from the rows so far; after the first few batches of the first
epoch that is the whole split. The loss does not depend on the bank size (see
``losses.crd_nce``). The bank, the normalising constants and the state of the method's
own random generator are buffers: a checkpoint restores them, and two runs with one seed
draw the same negatives. Defaults: the official code's (128, T 0.07, momentum 0.5, weight
0.8, CRD + task loss without logit KD), with 4096 negatives instead of 16384 for small
training sets (never more than the bank's other rows; drawn with replacement among the rows
other than the example's own). Single process: under DDP each process would update its own
bank.

Per-example negatives make a step cost O(batch x K x feat_dim) in gathered bank rows: on a
small, fast student with a large split (MovieLens: 256 x 4096 x 128 per step) that is
hundreds of times the student's own step. ``shared_negatives`` draws one set of K rows for
the whole batch instead (as MoCo's queue), a matrix product against K rows: each example's
negatives are still K uniform draws, so the NCE estimate is unchanged in expectation, but
the examples of a batch share them, and a shared row may be an example's own (with
probability K / n per example, as in the official sampler).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.errors import UserError
from talkingmodels.methods.logit_kd import LogitKD, LogitKDConfig
from talkingmodels.methods.registry import register

BANKS = ("student_bank", "teacher_bank")


class CRDConfig(LogitKDConfig):
    weight: float = Field(0.0, ge=0, description="w0: logit-KD term, off by default (the "
                          "paper's CRD is CRD + task loss; CRD + KD is its variant)")
    crd_weight: float = Field(0.8, ge=0, description="weight of the contrastive term")
    feat_dim: int = Field(128, ge=1, description="width of the embedding space")
    nce_k: int = Field(4096, ge=1, description="negatives per example (paper 16384); at most "
                       "the bank's other rows")
    nce_t: float = Field(0.07, gt=0, description="temperature of the scores")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the bank's updates")
    bank_size: int | None = Field(None, ge=1, description="rows of the bank (training examples); "
                                  "None: grows to the largest example row seen")
    shared_negatives: bool = Field(False, description="one set of K negatives for the whole batch "
                                   "(fast) instead of K per example (the paper's)")


def sampled_scores(anchor: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                   negatives: torch.Tensor) -> torch.Tensor:
    """(batch, 1 + K): ``anchor[b] . bank[index[b]]`` (the positive) first, then
    ``anchor[b] . bank[negatives[b, k]]``, or ``bank[negatives[k]]`` for shared negatives."""
    positive = (anchor * bank[index]).sum(1, keepdim=True)
    if negatives.dim() == 1:
        return torch.cat([positive, anchor @ bank[negatives].T], dim=1)
    if len(bank) <= negatives.numel():  # a small bank: one matmul, then pick the sampled columns
        return torch.cat([positive, (anchor @ bank.T).gather(1, negatives)], dim=1)
    return torch.cat([positive, torch.einsum("bd,bkd->bk", anchor, bank[negatives])], dim=1)


@register("crd")
class CRD(LogitKD):
    """Contrastive Representation Distillation (Tian et al. 2020): NCE against a memory bank."""

    Config = CRDConfig
    outputs = ("regression", "classification")  # (a bank of one vector per example)

    needs_layers = True

    def build(self, batch: Batch) -> None:
        super().build(batch)
        config = self.config
        s_dim = self.state_dims(batch, "student")["h"]
        t_dim = self.state_dims(batch, "teacher")["h"]
        self.embed_student = nn.Linear(s_dim, config.feat_dim)
        self.embed_teacher = nn.Linear(t_dim, config.feat_dim)
        # The method's own generator (seeded from the run's seed): the negatives and new bank
        # rows do not shift the global random stream, and its state is saved with the bank.
        seed = int(torch.randint(2**62, ()))
        self.register_buffer("rng", torch.Generator().manual_seed(seed).get_state())
        for name in BANKS:
            self.register_buffer(name, torch.empty(0, config.feat_dim))
        # log Z per direction (student anchors, teacher anchors), fixed on the first step
        self.register_buffer("log_z", torch.full((2,), math.nan))
        if config.bank_size is not None:
            with self.random() as generator:
                self.grow(config.bank_size, generator)

    @contextlib.contextmanager
    def random(self):
        """The method's generator, continued from the ``rng`` buffer and saved back into it."""
        generator = torch.Generator()
        generator.set_state(self.rng.cpu())
        yield generator
        self.rng.copy_(generator.get_state())

    def grow(self, rows: int, generator: torch.Generator) -> None:
        """Extend both banks to ``rows`` rows; new rows uniform in +-1/sqrt(feat_dim / 3)."""
        extra = rows - len(self.student_bank)
        if extra <= 0:
            return
        stdv = 1.0 / math.sqrt(self.config.feat_dim / 3)
        for name in BANKS:
            bank = getattr(self, name)
            new = torch.rand(extra, bank.shape[1], generator=generator) * 2 * stdv - stdv
            setattr(self, name, torch.cat([bank, new.to(bank)]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A grown bank is larger than a fresh one: take the saved size before loading into it.
        for name in BANKS:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward_train(self, batch: Batch):
        cfg = self.config
        if batch.index is None:
            raise UserError("method 'crd' needs the examples' rows in the training split "
                            "(Batch.index) for its memory bank")
        prediction, student, teacher_h, teacher = self.pooled_states(batch)
        terms = {"task": self.pair.task_loss(prediction, batch.target)}
        if cfg.weight > 0:
            terms["kd"] = self.logit_term(prediction, teacher["output"], batch.target)
        v_s = F.normalize(self.embed_student(student), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher_h), dim=1)
        index = batch.index  # on the CPU, like the generator
        rows = int(index.max()) + 1
        if cfg.bank_size is not None and rows > cfg.bank_size:
            raise UserError(f"crd: example row {rows - 1} is beyond bank_size {cfg.bank_size}")
        with self.random() as generator:
            self.grow(max(rows, 2), generator)
            # K negatives per example, uniform over the bank's other rows: the official sampler
            # may draw the positive itself, harmless among 50k rows but not when K ~ n.
            others = len(self.student_bank) - 1
            k = min(cfg.nce_k, others)
            if cfg.shared_negatives:
                negatives = torch.randint(others + 1, (k,), generator=generator)
            else:
                negatives = torch.randint(others, (len(index), k), generator=generator)
                negatives += negatives >= index[:, None]  # skip each example's own row
        index = index.to(self.student_bank.device)
        negatives = negatives.to(index.device)
        # Each model's embedding against the other model's bank: the student's anchors learn
        # to find the teacher's view of the same example, and the teacher head's the reverse.
        scores = (sampled_scores(v_s, self.teacher_bank, index, negatives),
                  sampled_scores(v_t, self.student_bank, index, negatives))
        # Z from the first batch, then fixed (as the official code); no host sync to ask
        first = torch.stack([torch.logsumexp(s.detach().flatten() / cfg.nce_t, 0)
                             - math.log(s.numel()) for s in scores])
        self.log_z.copy_(torch.where(torch.isnan(self.log_z), first, self.log_z))
        terms["crd"] = cfg.crd_weight * sum(losses.crd_nce(s, cfg.nce_t, z)
                                            for s, z in zip(scores, self.log_z, strict=True))
        with torch.no_grad():  # momentum update of this batch's rows, after they were used
            for name, v in (("student_bank", v_s), ("teacher_bank", v_t)):
                bank = getattr(self, name)
                mixed = cfg.nce_m * bank[index] + (1 - cfg.nce_m) * v.detach()
                # out of place: the scores' backward pass still needs the bank they saw
                setattr(self, name, bank.index_copy(0, index, F.normalize(mixed, dim=1)))
        return prediction, terms
