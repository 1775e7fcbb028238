"""The modern KD baselines (dkd, dist, rkd, pkt, crd) and the parameter-matched control
(kd-modules): each loss against a separate numpy computation of its paper's formula, where
gradients go, CRD's memory bank, and a few dozen steps of learning on toy pairs.

The toy pairs are tiny MLP, CNN (image states on different grids) and token models, so the
whole file runs in a few seconds; the rating fixture is covered by tests/test_methods.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from talkingmodels import losses
from talkingmodels.data import Batch
from talkingmodels.errors import UserError
from talkingmodels.methods import METHODS, supports
from talkingmodels.splits import Split
from talkingmodels.states import ModelPair, pooled

NEW = ["dkd", "dist", "rkd", "pkt", "crd", "kd-modules"]
CLASSIFICATION_ONLY = {"dkd", "dist"}


def close(value: torch.Tensor, expected: float, tol: float = 1e-5) -> bool:
    """Equal to a relative ``tol`` (the PKT values are small) or 1e-7 absolute."""
    return value.dim() == 0 and abs(float(value.detach()) - expected) <= tol * abs(expected) + 1e-7


# ------------------------------------------------------------------------------ numpy references
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row."""
    return (p * np.log(p / q)).sum(axis=-1)


def huber(x: np.ndarray) -> np.ndarray:
    """Smooth L1 with delta 1, elementwise."""
    return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


S_LOGITS = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.5, -0.5]])
T_LOGITS = np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.5, -1.0, 0.2]])
TARGET = np.array([0, 2, 1])


def tensor(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------------------ dkd
def test_dkd_by_hand():
    # TCKD: KL between (p_target, 1 - p_target); NCKD: KL between the non-target classes'
    # probabilities renormalised to sum 1. Both times T^2, mean over the batch.
    temperature = 2.0
    p_s, p_t = softmax(S_LOGITS / temperature), softmax(T_LOGITS / temperature)
    rows = np.arange(len(TARGET))
    b_s = np.stack([p_s[rows, TARGET], 1 - p_s[rows, TARGET]], axis=1)
    b_t = np.stack([p_t[rows, TARGET], 1 - p_t[rows, TARGET]], axis=1)
    others = np.ones_like(p_s, dtype=bool)
    others[rows, TARGET] = False
    n_s = p_s[others].reshape(3, 2) / b_s[:, 1:]
    n_t = p_t[others].reshape(3, 2) / b_t[:, 1:]
    tckd = kl(b_t, b_s).mean() * temperature**2
    nckd = kl(n_t, n_s).mean() * temperature**2
    got = losses.dkd(tensor(S_LOGITS), tensor(T_LOGITS), torch.tensor(TARGET), temperature)
    assert close(got[0], tckd) and close(got[1], nckd)


@pytest.mark.parametrize("row", [0, 1, 2])
def test_dkd_recombines_into_kd(row):
    """The paper's Eq. (1): KD = TCKD + (1 - p_target^teacher) NCKD, for one example."""
    temperature = 4.0
    s, t, y = tensor(S_LOGITS[row:row + 1]), tensor(T_LOGITS[row:row + 1]), torch.tensor(TARGET[row:row + 1])
    tckd, nckd = losses.dkd(s, t, y, temperature)
    p_target = softmax(T_LOGITS[row] / temperature)[TARGET[row]]
    assert close(tckd + (1 - p_target) * nckd, float(losses.kd_kl(s, t, temperature)))


def test_dkd_is_finite_for_a_saturated_target():
    # the student's target probability underflows to 0 in float32: no log 0
    tckd, nckd = losses.dkd(torch.tensor([[-200.0, 200.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]),
                            torch.tensor([0]), 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)


# ------------------------------------------------------------------------------ dist
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_by_hand(tau):
    # inter: 1 - mean over examples of corr(p_s[i], p_t[i]); intra: 1 - mean over classes of
    # corr(p_s[:, c], p_t[:, c]); each times tau^2.
    y_s, y_t = softmax(S_LOGITS / tau), softmax(T_LOGITS / tau)
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(3)])
    intra = 1 - np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(3)])
    got = losses.dist(tensor(S_LOGITS), tensor(T_LOGITS), tau)
    assert close(got[0], tau**2 * inter) and close(got[1], tau**2 * intra)


def test_dist_is_zero_for_the_teacher_itself():
    inter, intra = losses.dist(tensor(T_LOGITS), tensor(T_LOGITS))
    assert abs(float(inter)) < 1e-5 and abs(float(intra)) < 1e-5  # (eps 1e-8 in the denominators)


# ------------------------------------------------------------------------------ rkd
STUDENT_POINTS = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
TEACHER_POINTS = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [5.0, 0.0, 2.0]])


def rkd_distance_reference(s: np.ndarray, t: np.ndarray) -> float:
    def normalised(x):
        n = len(x)
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))  # the mean over the n(n-1) pairs i != j

    diff = normalised(s) - normalised(t)
    assert np.abs(diff).max() > 1  # both branches of the Huber loss are used
    return float(huber(diff).mean())


def rkd_angle_reference(s: np.ndarray, t: np.ndarray) -> float:
    def cosines(x):
        n = len(x)
        c = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i not in (j, k):  # the angle at x_i between x_j and x_k
                        a, b = x[j] - x[i], x[k] - x[i]
                        c[i, j, k] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        return c

    diff = cosines(s) - cosines(t)
    assert np.abs(diff).max() > 1
    return float(huber(diff).mean())


def test_rkd_distance_by_hand():
    got = losses.rkd_distance(tensor(STUDENT_POINTS), tensor(TEACHER_POINTS))
    assert close(got, rkd_distance_reference(STUDENT_POINTS, TEACHER_POINTS))


def test_rkd_angle_by_hand():
    got = losses.rkd_angle(tensor(STUDENT_POINTS), tensor(TEACHER_POINTS))
    assert close(got, rkd_angle_reference(STUDENT_POINTS, TEACHER_POINTS))


def test_rkd_terms_ignore_scale_and_translation():
    """Both potentials are relational: scaling and shifting one side's states changes nothing."""
    s, t = tensor(STUDENT_POINTS), tensor(TEACHER_POINTS)
    moved = 7.0 * t + torch.tensor([1.0, -2.0, 3.0])
    assert close(losses.rkd_distance(s, moved), float(losses.rkd_distance(s, t)))
    assert close(losses.rkd_angle(s, moved), float(losses.rkd_angle(s, t)))
    assert close(losses.rkd_distance(t, 3 * t), 0.0) and close(losses.rkd_angle(t, 3 * t), 0.0)


def test_relational_losses_on_a_batch_of_one():
    one = torch.ones(1, 3, requires_grad=True)
    for loss in (losses.rkd_distance, losses.rkd_angle, losses.pkt):
        value = loss(one, torch.ones(1, 2)).detach()
        assert torch.isfinite(value) and close(value, 0.0, 1e-6)


# ------------------------------------------------------------------------------ pkt
def test_pkt_by_hand():
    # kernel K_ij = (cos(x_i, x_j) + 1) / 2, rows normalised to conditional probabilities
    # p_{j|i}; loss = mean over i, j of p_t log(p_t / p_s) (the authors' code: the mean over
    # all n^2 entries, self-similarities included).
    def conditional(x):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        kernel = (unit @ unit.T + 1) / 2
        return kernel / kernel.sum(axis=1, keepdims=True)

    p_s, p_t = conditional(STUDENT_POINTS + 0.5), conditional(TEACHER_POINTS + 0.5)
    expected = float((p_t * np.log(p_t / p_s)).mean())
    got = losses.pkt(tensor(STUDENT_POINTS + 0.5), tensor(TEACHER_POINTS + 0.5))
    assert close(got, expected, 1e-4) and expected > 0


# ------------------------------------------------------------------------------ crd nce
@pytest.mark.parametrize("n_data", [50, 5000])
def test_crd_nce_equals_the_official_formula(n_data):
    """The official ContrastLoss: P = exp(s / T) / Z with Z = mean(exp(s / T)) * n_data,
    noise m * Pn = K / n_data, loss = -(sum log D1 + sum log D0) / batch; for any n_data.
    (The official code adds 1e-7 to each denominator for safety; the paper's h has none.)"""
    rng = np.random.default_rng(0)
    scores = np.tanh(rng.normal(size=(3, 1 + 4)))  # cosines: positive first, K = 4 negatives
    temperature, k = 0.5, 4
    z = np.exp(scores / temperature).mean() * n_data
    p = np.exp(scores / temperature) / z
    noise = k / n_data
    log_d1 = np.log(p[:, 0] / (p[:, 0] + noise))
    log_d0 = np.log(noise / (p[:, 1:] + noise))
    expected = -(log_d1.sum() + log_d0.sum()) / len(scores)
    log_z = torch.tensor(np.log(np.exp(scores / temperature).mean()), dtype=torch.float32)
    assert close(losses.crd_nce(tensor(scores), temperature, log_z), expected)


def test_pooled_states():
    assert pooled(torch.ones(2, 3, 4, 5)).shape == (2, 3)
    tokens = torch.arange(12.0).view(1, 4, 3)
    assert torch.equal(pooled(tokens), tokens.mean(1))
    assert pooled(torch.ones(2, 7)).shape == (2, 7)


# ------------------------------------------------------------------------------ toy pairs
N = 32


class Tokens(nn.Module):
    """A token model: states (batch, tokens, width) at `mix` and `out`."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.mix = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        return self.head(self.out(self.mix(self.embed(ids))).mean(1))


def mlp(width: int, outputs: int) -> nn.Module:
    layers = [nn.Linear(5, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs)]
    return nn.Sequential(*layers, *([nn.Flatten(0)] if outputs == 1 else []))


def cnn(width: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1, stride=stride), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def model(kind: str, teacher: bool) -> nn.Module:
    if kind == "tokens":
        return Tokens(12 if teacher else 6)
    if kind == "cnn":  # the teacher's state at h is on a coarser grid than the student's
        return cnn(8, stride=2) if teacher else cnn(4, stride=1)
    return mlp(12 if teacher else 6, 1 if kind == "regression" else 3)


def toy(kind: str, seed: int = 0):
    """(pair, batch) of one toy problem; the teacher is fixed, the student seeded by `seed`."""
    data = torch.Generator().manual_seed(1)
    if kind == "tokens":
        x = torch.randint(10, (N, 4), generator=data)
    elif kind == "cnn":
        x = torch.rand(N, 1, 6, 6, generator=data)
    else:
        x = torch.randn(N, 5, generator=data)
    layers = ("mix", "out") if kind == "tokens" else ("1", "3")
    torch.manual_seed(100)
    teacher = model(kind, teacher=True).eval()
    torch.manual_seed(seed)
    student = model(kind, teacher=False)
    if kind == "regression":
        target, output, task_loss = torch.randn(N, generator=data), "regression", F.mse_loss
    else:
        target, output, task_loss = torch.randint(3, (N,), generator=data), "classification", F.cross_entropy
    pair = ModelPair(student, teacher, layers, layers, output, task_loss)
    return pair, Batch((x,), (x,), target, {}, torch.arange(N))


def build(name: str, kind: str = "mlp", seed: int = 0, **options):
    pair, batch = toy(kind, seed)
    cls = METHODS[name]
    torch.manual_seed(seed)
    method = cls(pair, cls.Config(**options))
    method.setup(batch)
    return method, batch


def test_relational_methods_pool_over_real_tokens_only():
    """A sentence's pooled state (and so the relational losses) must not depend on the
    padding its batch adds: the same sentences padded to 4 or 7 tokens give the same."""
    method, batch = build("rkd", "tokens")
    ids = batch.student_inputs[0][:8]
    lengths = torch.tensor([4, 3, 2, 4, 1, 3, 4, 2])
    ids = ids.masked_fill(torch.arange(4) >= lengths[:, None], 0)  # id 0 pads
    short = Split((ids,), batch.target[:8], lengths=lengths).batch(torch.arange(8))
    long = Split((F.pad(ids, (0, 3)),), batch.target[:8], lengths=lengths).batch(torch.arange(8))
    assert torch.equal(short.lengths, lengths) and long.student_inputs[0].shape[1] == 4  # trimmed
    padded = Batch((F.pad(ids, (0, 3)),), (F.pad(ids, (0, 3)),), short.target, {}, short.index, lengths)
    for name in ("rkd", "pkt", "crd"):
        method, _ = build(name, "tokens")
        method.eval()
        _, student, teacher, _ = method.pooled_states(short)
        _, student_padded, teacher_padded, _ = method.pooled_states(padded)
        assert torch.allclose(student, student_padded, atol=1e-6)
        assert torch.allclose(teacher, teacher_padded, atol=1e-6)
        if name == "crd":
            continue  # it draws new negatives on every call: its pooled states are checked above
        with torch.no_grad():  # the toy model's own head pools over padding: its task term differs
            terms, terms_padded = method.forward_train(short)[1], method.forward_train(padded)[1]
        for term in terms.keys() - {"task"}:
            assert torch.allclose(terms[term], terms_padded[term], atol=1e-5), (name, term)
    no_lengths = Batch(padded.student_inputs, padded.teacher_inputs, padded.target)
    _, student_all, _, _ = method.pooled_states(no_lengths)
    assert not torch.allclose(student_all, student)  # without lengths, padding counts


def kinds_for(name: str) -> list[str]:
    return ["mlp", "cnn", "tokens"] + ([] if name in CLASSIFICATION_ONLY else ["regression"])


CASES = [(name, kind) for name in NEW for kind in kinds_for(name)]


# ------------------------------------------------------------------------------ applicability
def test_outputs_and_supports():
    for name in CLASSIFICATION_ONLY:
        assert METHODS[name].outputs == ("classification",)
        assert supports(METHODS[name], "classification") and not supports(METHODS[name], "regression")
    assert METHODS["gkd"].outputs == ("causal-lm",)  # a divergence between next-token distributions
    for name in set(METHODS) - CLASSIFICATION_ONLY - {"gkd"}:
        assert supports(METHODS[name], "regression") and supports(METHODS[name], "classification")
    # per token on a causal LM: the paper's methods and the KD controls; not the relational ones
    # (one vector per example) nor the class-distribution ones
    lm = {name for name in METHODS if supports(METHODS[name], "causal-lm")}
    assert lm == {"scratch", "logit-kd", "gkd", "feature-kd", "fitnet", "hybrid", "td", "kd-modules"}


@pytest.mark.parametrize("name", sorted(CLASSIFICATION_ONLY))
def test_classification_only_methods_refuse_a_regression_pair(name):
    with pytest.raises(UserError) as error:
        build(name, "regression")
    message = str(error.value)
    assert "\n" not in message and repr(name) in message and "regression" in message


# ------------------------------------------------------------------------------ gradients
def own_modules(method) -> dict[str, nn.Parameter]:
    """The method's parameters that are neither the student's nor the teacher's."""
    model = {id(p) for p in method.student.parameters()} | {id(p) for p in method.teacher.parameters()}
    return {n: p for n, p in method.named_parameters() if id(p) not in model}


# kd-modules has TD's channel, but without the question nothing reads the student's
# encoder at l (TD's default L_MC is at h only): it stays as initialised.
IDLE = {"kd-modules": {"student_side.encoder.inputs.l.weight", "student_side.encoder.inputs.l.bias"}}


@pytest.mark.parametrize("name,kind", CASES)
def test_gradients_reach_the_student_and_the_method_never_the_teacher(name, kind):
    method, batch = build(name, kind)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    learnable = {id(p) for p in method.learnable_parameters()}
    own = {id(p) for p in own_modules(method).values()}
    assert learnable == {id(p) for p in method.student.parameters()} | own
    method.train()
    _, terms = method.forward_train(batch)
    assert "task" in terms
    assert all(v.dim() == 0 and torch.isfinite(v) and v >= 0 for v in terms.values())
    # the distillation terms alone: they reach the student's first layer (below l and h)...
    sum(v for k, v in terms.items() if k != "task").backward()
    first = next(method.student.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0, name
    # ... and every module of the method's own, and never the teacher
    modules = own_modules(method)
    missing = [n for n, p in modules.items()
               if n not in IDLE.get(name, set()) and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, (name, missing)
    assert all(modules[n].grad is None for n in IDLE.get(name, set()))
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    optimizer = torch.optim.Adam(method.learnable_parameters(), lr=1e-2)
    optimizer.step()
    after = method.teacher.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in teacher_before.items())


@pytest.mark.parametrize("name", ["rkd", "pkt", "crd"])
def test_relational_terms_do_not_train_the_head(name):
    """They act on the states at h: the student's head (after h) learns from the task only."""
    method, batch = build(name)
    _, terms = method.forward_train(batch)
    sum(v for k, v in terms.items() if k != "task").backward()
    assert all(p.grad is None for p in method.student[4].parameters())


def test_kd_modules_has_hybrid_plus_td_extra_parameters():
    for kind in ("mlp", "cnn", "tokens", "regression"):
        counts = {name: build(name, kind)[0].extra_parameter_count()
                  for name in ("hybrid", "td", "kd-modules")}
        assert counts["kd-modules"] == counts["hybrid"] + counts["td"] > counts["td"] > 0, kind
    for options in ({"message_dim": 8}, {"channel": "dense-relu-dense", "channel_hidden": 16}):
        counts = {name: build(name, **options)[0].extra_parameter_count() for name in ("td", "kd-modules")}
        assert counts["kd-modules"] == build("hybrid")[0].extra_parameter_count() + counts["td"]


def test_kd_modules_terms_are_hybrids_plus_tds_consistency():
    method, batch = build("kd-modules")
    _, terms = method.forward_train(batch)
    assert set(terms) == {"task", "kd", "feature", "mc", "sc"}
    hybrid, _ = build("hybrid")
    hybrid.load_state_dict(method.state_dict(), strict=False)  # same student and regressor
    _, plain = hybrid.forward_train(batch)
    for term in ("task", "kd", "feature"):
        assert torch.allclose(terms[term], plain[term])


def test_crd_and_rkd_pkt_extra_parameters():
    crd, _ = build("crd")
    assert crd.extra_parameter_count() == (12 + 1) * 128 + (6 + 1) * 128  # two linear heads
    assert build("rkd")[0].extra_parameter_count() == build("pkt")[0].extra_parameter_count() == 0


# ------------------------------------------------------------------------------ dkd warm-up
def test_dkd_warm_up_is_linear_in_steps_and_resumes():
    plain, batch = build("dkd")
    warm, _ = build("dkd", warmup_steps=4)
    full = plain.forward_train(batch)[1]
    for step in (1, 2):
        terms = warm.forward_train(batch)[1]
        for term in ("tckd", "nckd"):
            assert torch.allclose(terms[term], full[term] * step / 4)
    resumed, _ = build("dkd", warmup_steps=4)
    resumed.load_state_dict(warm.state_dict())
    assert int(resumed.steps) == 2
    assert torch.allclose(resumed.forward_train(batch)[1]["tckd"], full["tckd"] * 3 / 4)


# ------------------------------------------------------------------------------ crd memory bank
def steps(method, batch, count: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.Adam(method.learnable_parameters(), lr=lr)
    out = []
    for _ in range(count):
        _, terms = method.forward_train(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        out.append(float(sum(terms.values()).detach()))
    return out


def half(batch: Batch, part: int) -> Batch:
    rows = slice(part * N // 2, (part + 1) * N // 2)
    return Batch(tuple(x[rows] for x in batch.student_inputs), tuple(x[rows] for x in batch.teacher_inputs),
                 batch.target[rows], {}, batch.index[rows])


def test_crd_bank_is_a_buffer_that_grows_and_is_updated_with_momentum():
    method, batch = build("crd", nce_k=8)
    buffers = dict(method.named_buffers())
    assert {"student_bank", "teacher_bank", "log_z", "rng"} <= set(buffers)
    assert not {id(b) for b in buffers.values()} & {id(p) for p in method.parameters()}
    assert len(method.student_bank) == 0
    first = half(batch, 0)  # rows 0-15
    method.forward_train(first)
    assert method.student_bank.shape == method.teacher_bank.shape == (16, 128)
    method.forward_train(half(batch, 1))  # rows 16-31: the bank grows
    assert method.student_bank.shape == method.teacher_bank.shape == (N, 128)
    assert torch.isfinite(method.log_z).all()

    method, batch = build("crd", bank_size=N)
    before = {name: getattr(method, name).clone() for name in ("student_bank", "teacher_bank")}
    _, student, teacher, _ = method.pooled_states(first)
    method.forward_train(first)
    v = {"student_bank": F.normalize(method.embed_student(student), dim=1).detach(),
         "teacher_bank": F.normalize(method.embed_teacher(teacher), dim=1).detach()}
    for name, old in before.items():  # momentum 0.5, renormalised; the other rows are kept
        bank = getattr(method, name)
        assert torch.allclose(bank[:16], F.normalize(0.5 * old[:16] + 0.5 * v[name], dim=1), atol=1e-6)
        assert torch.equal(bank[16:], old[16:])


def test_crd_two_seeded_runs_are_identical_and_other_seeds_differ():
    def run(seed: int) -> list[float]:
        method, batch = build("crd", seed=seed, nce_k=16)
        return steps(method, half(batch, 0), 3) + steps(method, batch, 3)

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_crd_negatives_do_not_touch_the_global_random_stream():
    method, batch = build("crd")
    torch.manual_seed(5)
    method.forward_train(batch)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after)


def test_crd_state_dict_round_trip_restores_the_bank():
    method, batch = build("crd", nce_k=16)
    steps(method, half(batch, 0), 2)
    steps(method, batch, 1)
    saved = copy.deepcopy(method.state_dict())
    continued = method.forward_train(batch)[1]["crd"]
    fresh, _ = build("crd", seed=3, nce_k=16)  # another seed, an empty bank
    assert len(fresh.student_bank) == 0
    fresh.load_state_dict(saved)
    for name in ("student_bank", "teacher_bank", "log_z", "rng"):
        assert torch.equal(getattr(fresh, name), saved[name])
    assert torch.equal(fresh.forward_train(batch)[1]["crd"], continued)


class Killed(Exception):
    """Stands in for a process killed right after an epoch's checkpoint was written."""


def test_crd_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """Through the engine: its checkpoints hold the method's state dict, bank included."""
    from talkingmodels.engine import TrainConfig, fit
    from talkingmodels.losses import Metric
    from talkingmodels.splits import Split, Splits

    data = torch.Generator().manual_seed(3)
    x, y = torch.randn(120, 5, generator=data), torch.randint(3, (120,), generator=data)
    splits = Splits(Split((x[:80],), y[:80]), Split((x[80:100],), y[80:100]), Split((x[100:],), y[100:]))

    def run(checkpoint=None, kill_after=None):
        method, _ = build("crd", nce_k=50)

        def on_epoch(row):
            if row["epoch"] == kill_after:
                raise Killed

        fit(method, splits, Metric("accuracy", losses.accuracy, True),
            TrainConfig(epochs=3, batch_size=32, lr=1e-2), seed=7, on_epoch=on_epoch,
            checkpoint=checkpoint)
        return method.state_dict()

    whole = run()
    with pytest.raises(Killed):
        run(tmp_path / "run.pt", kill_after=1)
    resumed = run(tmp_path / "run.pt")
    assert whole["student_bank"].shape == (80, 128)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_crd_bank_size_negatives_and_errors():
    method, batch = build("crd", bank_size=40)
    assert method.student_bank.shape == (40, 128)
    method.forward_train(batch)  # nce_k 4096 is clamped to the 40 rows
    with pytest.raises(UserError, match="beyond bank_size"):
        build("crd", bank_size=10)[0].forward_train(batch)
    no_index = Batch(batch.student_inputs, batch.teacher_inputs, batch.target)
    with pytest.raises(UserError, match="Batch.index"):
        method.forward_train(no_index)


def test_crd_sampled_scores_by_hand():
    from talkingmodels.methods.crd import sampled_scores

    anchor, bank = torch.randn(3, 4), torch.randn(6, 4)
    index = torch.tensor([0, 2, 5])
    each = torch.tensor([[1, 3], [4, 4], [0, 1]])  # per example
    expected = torch.stack([torch.stack([anchor[b] @ bank[r] for r in (index[b], *each[b])])
                            for b in range(3)])
    assert torch.allclose(sampled_scores(anchor, bank, index, each), expected, atol=1e-6)
    big = torch.randn(100, 4)  # many rows: the gathering path instead of the full product
    assert torch.allclose(sampled_scores(anchor, big, index, each),
                          torch.stack([anchor[b] @ big[torch.cat([index[b:b + 1], each[b]])].T
                                       for b in range(3)]), atol=1e-6)
    shared = torch.tensor([1, 3])  # one set for the batch
    positive = (anchor * bank[index]).sum(1, keepdim=True)
    assert torch.allclose(sampled_scores(anchor, bank, index, shared),
                          torch.cat([positive, anchor @ bank[shared].T], 1), atol=1e-6)


def test_crd_shared_negatives_draw_one_set_per_batch(monkeypatch):
    method, batch = build("crd", shared_negatives=True, nce_k=8)
    seen, original = [], torch.randint

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "randint", spy)
    _, terms = method.forward_train(batch)
    assert seen[-1] == (8,) and torch.isfinite(terms["crd"])
    terms["crd"].backward()
    assert method.embed_student.weight.grad.abs().sum() > 0


def test_rkd_angle_examples_limits_the_angle_term_to_the_first_examples():
    method, batch = build("rkd", angle_examples=5)
    with torch.no_grad():
        _, student, teacher, _ = method.pooled_states(batch)
    _, terms = method.forward_train(batch)
    assert close(terms["angle"], 50 * float(losses.rkd_angle(student[:5], teacher[:5])))
    assert close(terms["distance"], 25 * float(losses.rkd_distance(student, teacher)))


def test_crd_optional_logit_kd_term():
    method, batch = build("crd", weight=1.0)
    assert set(method.forward_train(batch)[1]) == {"task", "kd", "crd"}


# ------------------------------------------------------------------------------ learning
LEARNING = [(name, "mlp") for name in NEW] + [("crd", "regression"), ("rkd", "cnn")]


@pytest.mark.parametrize("name,kind", LEARNING)
def test_each_method_learns_on_a_toy_problem(name, kind):
    """40 steps on one batch: the method's distillation terms (all but the task loss) fall.
    (CRD falls least: its toy students have 6 units, too few to separate 32 examples.)"""
    method, batch = build(name, kind)
    method.train()
    optimizer = torch.optim.Adam(method.learnable_parameters(), lr=3e-3)
    seen = []
    for _ in range(40):
        _, terms = method.forward_train(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        seen.append(float(sum(v for k, v in terms.items() if k != "task").detach()))
    assert np.mean(seen[-5:]) < 0.85 * seen[0], (name, seen[0], seen[-5:])


def test_dkd_on_two_classes_is_logit_kd_and_is_reported_as_such():
    """With two classes NCKD (among the other classes: one) is exactly 0 and TCKD is the whole
    KL, so DKD with logit-kd's weight and temperature is logit-kd: a grid records it as n/a
    with that reason instead of a duplicate run."""
    from talkingmodels import losses
    from talkingmodels.methods import METHODS, not_applicable

    torch.manual_seed(0)
    student, teacher = torch.randn(16, 2), torch.randn(16, 2)
    target = torch.randint(0, 2, (16,))
    tckd, nckd = losses.dkd(student, teacher, target, 4.0)
    assert float(nckd) == 0.0
    assert float(tckd) == pytest.approx(float(losses.kd_kl(student, teacher, 4.0)), rel=1e-5)

    dkd = METHODS["dkd"]
    reason = not_applicable(dkd, dkd.Config(), "classification", 2)
    assert reason.startswith("identical to logit-kd on two classes")
    assert not_applicable(dkd, dkd.Config(beta=0.5), "classification", 2) == reason  # NCKD is 0 anyway
    assert not_applicable(dkd, dkd.Config(), "classification", 10) is None
    assert not_applicable(dkd, dkd.Config(alpha=2.0), "classification", 2) is None
    assert not_applicable(dkd, dkd.Config(warmup_steps=10), "classification", 2) is None
    assert not_applicable(dkd, dkd.Config(), "regression", None) == "needs classification outputs"
    assert not_applicable(METHODS["logit-kd"], METHODS["logit-kd"].Config(), "classification", 2) is None
