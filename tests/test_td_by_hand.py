"""TD's loss terms on a tiny model whose every value is worked out by hand.

Both models are chains of 1 -> 1 linear layers without bias, so every state is a multiple
of the input x; the batch is x = (1, 2), so mean(x^2) = (1 + 4) / 2 = 2.5.

student: s_l = 1 x (layer "0"), s_h = 2 x ("1"), prediction 1 s_h = 2 x ("2")
teacher: t_l = 1 x ("0"),       t_h = 3 t_l = 3 x ("1"), output 1 t_h = 3 x ("2")
channel (message width 1): E_S at l 1, E_S at h 0.5, D_S at h 1; E_T at l 2, E_T at h 0.5,
D_T at l 2.

One exchange: question q = E_S(s_l) = x; the teacher hears D_T(q) = 2 x, interprets it with
its layer "1": t'_h = 3 * 2 x = 6 x; answers E_T(t'_h) = 3 x; the student reads
s'_h = D_S(3 x) = 3 x. Hence (d = MSE):
  L_interact = mean((3x - 2x)^2)            = 2.5
  L_MC at h  = mean((0.5*2x - 0.5*3x)^2)    = 0.25 * 2.5 = 0.625
  L_MC at l  = mean((1*x - 2*x)^2)          = 2.5
  L_SC       = mean((2*2x - x)^2) + mean((1*0.5*2x - 2x)^2) = 9 * 2.5 + 2.5 = 25
  L_task     = mean((2x - 1)^2) = (1 + 9) / 2 = 5      (targets 1, 1)
  L_kd       = mean((2x - 3x)^2) = 2.5                  (a regression output: MSE)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from talkingmodels.data import Batch
from talkingmodels.methods import METHODS
from talkingmodels.states import ModelPair

X = torch.tensor([[1.0], [2.0]])


def chain(*weights: float) -> nn.Sequential:
    layers = [nn.Linear(1, 1, bias=False) for _ in weights]
    with torch.no_grad():
        for layer, weight in zip(layers, weights, strict=True):
            layer.weight.fill_(weight)
    return nn.Sequential(*layers)


def set_channel(method, **weights) -> None:
    """Every channel projection to its hand-set weight, biases to zero."""
    roles = {"es_l": (method.student_side.encoder.inputs, "l"),
             "es_h": (method.student_side.encoder.inputs, "h"),
             "ds_h": (method.student_side.decoder.outputs, "h"),
             "et_l": (method.teacher_side.encoder.inputs, "l"),
             "et_h": (method.teacher_side.encoder.inputs, "h"),
             "dt_l": (method.teacher_side.decoder.outputs, "l")}
    values = {"es_l": 1.0, "es_h": 0.5, "ds_h": 1.0, "et_l": 2.0, "et_h": 0.5, "dt_l": 2.0, **weights}
    with torch.no_grad():
        for name, (modules, role) in roles.items():
            modules[role].weight.fill_(values[name])
            modules[role].bias.zero_()


def build(output="regression", teacher_head=1.0, classes=1, target=None, **options):
    torch.manual_seed(0)
    student = chain(1.0, 2.0, 1.0)
    teacher = chain(1.0, 3.0, teacher_head)
    if classes > 1:  # two logits per example: the head maps h to (h, -h)
        student[2], teacher[2] = nn.Linear(1, 2, bias=False), nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            student[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
            teacher[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    loss = nn.functional.mse_loss if output == "regression" else nn.functional.cross_entropy
    pair = ModelPair(student, teacher, ("0", "1"), ("0", "1"), output, loss)
    cls = METHODS["td"]
    method = cls(pair, cls.Config(**{"message_dim": 1, **options}))
    target = torch.ones(2, 1) if target is None else target
    batch = Batch((X,), (X,), target)
    method.setup(batch)
    set_channel(method)
    method.train()
    return method, batch


def terms(**options) -> dict[str, float]:
    method, batch = build(**options)
    return {k: float(v.detach()) for k, v in method.forward_train(batch)[1].items()}


def test_every_term_of_one_round():
    assert terms() == pytest.approx({"task": 5.0, "kd": 2.5, "interact": 2.5, "mc": 0.625, "sc": 25.0})


def test_message_consistency_at_l_and_at_both_layers():
    assert terms(mc_layers=["l"])["mc"] == pytest.approx(2.5)
    assert terms(mc_layers=["l", "h"])["mc"] == pytest.approx((2.5 + 0.625) / 2)


def test_weights_scale_their_terms():
    weighted = terms(weight=2.0, w1=3.0, w2=4.0, w3=0.5)
    assert weighted == pytest.approx({"task": 5.0, "kd": 5.0, "interact": 7.5, "mc": 2.5, "sc": 12.5})


def test_each_round_asks_from_the_last_answer():
    """Round 2 asks E_S(s'_h) = 0.5 * 3x = 1.5x; the teacher hears 3x, interprets 9x,
    answers 4.5x: d = mean((4.5x - 2x)^2) = 6.25 * 2.5 = 15.625. L_interact is the mean over
    the rounds: (2.5 + 15.625) / 2 = 9.0625."""
    assert terms(rounds=2)["interact"] == pytest.approx(9.0625)
    # round 3: asks 0.5 * 4.5x = 2.25x, hears 4.5x, interprets 13.5x, answers 6.75x:
    # d = (6.75 - 2)^2 * 2.5 = 56.40625
    assert terms(rounds=3)["interact"] == pytest.approx((2.5 + 15.625 + 56.40625) / 3)


def test_listen_add_keeps_the_teachers_own_state():
    """listen: add hears t_l + D_T(q) = x + 2x = 3x: t'_h = 9x, answer 4.5x,
    d = (4.5 - 2)^2 * 2.5 = 15.625."""
    assert terms(listen="add")["interact"] == pytest.approx(15.625)


def test_answer_terms():
    """answer_task: the student's head on s'_h = 3x against targets 1: ((3-1)^2 + (6-1)^2) / 2
    = 14.5. answer_fit: the teacher's head (weight 1) on t'_h = 6x: ((6-1)^2 + (12-1)^2) / 2
    = 73. answer_kd on a regression output: MSE of the prediction 2x to the teacher's head on
    t'_h, 6x: 16 * 2.5 = 40."""
    values = terms(answer_task=1.0, answer_fit=1.0, answer_kd=1.0)
    assert values["answer_task"] == pytest.approx(14.5)
    assert values["answer_fit"] == pytest.approx(73.0)
    assert values["answer_kd"] == pytest.approx(40.0)


def kl_t2(student_logits, teacher_logits, temperature: float) -> float:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), the mean over examples, written out."""
    total = 0.0
    for s, t in zip(student_logits, teacher_logits, strict=True):
        ps = [math.exp(v / temperature) for v in s]
        pt = [math.exp(v / temperature) for v in t]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    return temperature**2 * total / len(student_logits)


def test_answer_kd_on_logits_is_hinton_kd_at_the_temperature():
    """Classification: the student's logits are (s_h, -s_h) = (2x, -2x); the teacher's head
    on t'_h = 6x gives (6x, -6x). answer_kd = T^2 KL at TD's temperature (4), not at 1."""
    x = X[:, 0].tolist()
    student = [(2 * v, -2 * v) for v in x]
    answer = [(6 * v, -6 * v) for v in x]
    target = torch.tensor([0, 0])
    value = terms(output="classification", classes=2, target=target, answer_kd=1.0)["answer_kd"]
    assert value == pytest.approx(kl_t2(student, answer, 4.0), rel=1e-5)
    assert value != pytest.approx(kl_t2(student, answer, 1.0), rel=1e-2)
    # and the logit-KD term itself, towards the teacher's own output (3x, -3x)
    kd = terms(output="classification", classes=2, target=target)["kd"]
    assert kd == pytest.approx(kl_t2(student, [(3 * v, -3 * v) for v in x], 4.0), rel=1e-5)


# ----------------------------------------------------------------- gradients by hand
def interact_grads(**options) -> dict[str, float]:
    """d L_interact / d (each weight), for the student's layers and the channel."""
    method, batch = build(**options)
    method.forward_train(batch)[1]["interact"].backward()
    student, teacher = method.student_side, method.teacher_side
    names = {"student0": method.student[0], "student1": method.student[1],
             "es_l": student.encoder.inputs["l"], "ds_h": student.decoder.outputs["h"],
             "et_h": teacher.encoder.inputs["h"], "dt_l": teacher.decoder.outputs["l"]}
    return {k: 0.0 if m.weight.grad is None else float(m.weight.grad) for k, m in names.items()}


def test_interact_gradients_by_hand():
    """With w0 the student's first weight and w1 its second: s_h = w1 w0 x and
    s'_h = ds_h * et_h * 3 * dt_l * es_l * w0 x = 3 w0 x, so L = mean((3 w0 x - w1 w0 x)^2)
    and (at w0 = 1, w1 = 2, residual r = s'_h - s_h = x):
      dL/dw0   = mean(2 r (3x - 2x))   = 2 * 2.5 = 5
      dL/dw1   = mean(2 r (-x))        = -5
      dL/des_l = mean(2 r * s'_h / es_l) = mean(2 x * 3x) = 15 (s'_h is linear in each
      channel weight: ds'_h / dw = s'_h / w), dL/dds_h = 15, dL/ddt_l = 15 / 2 = 7.5,
      dL/det_h = 15 / 0.5 = 30."""
    assert interact_grads() == pytest.approx(
        {"student0": 5.0, "student1": -5.0, "es_l": 15.0, "ds_h": 15.0, "et_h": 30.0, "dt_l": 7.5})


def test_stop_gradient_question_blocks_only_the_question_path():
    """The question path is what reaches w0 through s'_h (3x each): without it
    dL/dw0 = mean(2 r (-w1 x)) = -2 * 2 * 2.5 = -10; the channel still learns."""
    assert interact_grads(stop_gradient=["question"]) == pytest.approx(
        {"student0": -10.0, "student1": -5.0, "es_l": 15.0, "ds_h": 15.0, "et_h": 30.0, "dt_l": 7.5})


def test_stop_gradient_answer_makes_the_answer_a_fixed_target():
    """s'_h detached: no gradient reaches the exchange's channel weights nor w0 through it;
    s_h still moves towards it: dL/dw0 = -10, dL/dw1 = -5."""
    assert interact_grads(stop_gradient=["answer"]) == pytest.approx(
        {"student0": -10.0, "student1": -5.0, "es_l": 0.0, "ds_h": 0.0, "et_h": 0.0, "dt_l": 0.0})


def test_stop_gradient_student_state_makes_s_h_a_fixed_target():
    """s_h detached: w1 (which only s_h depends on) gets nothing; w0 only through the
    question: dL/dw0 = mean(2 r * 3x) = 15."""
    assert interact_grads(stop_gradient=["student_state"]) == pytest.approx(
        {"student0": 15.0, "student1": 0.0, "es_l": 15.0, "ds_h": 15.0, "et_h": 30.0, "dt_l": 7.5})


def test_consistency_gradients_reach_both_sides():
    """L_MC at h = mean((es_h * s_h - et_h * t_h)^2): d/des_h = mean(2 (x - 1.5x) 2x) = -2 * 2.5
    = -5, d/det_h = mean(2 (x - 1.5x)(-3x)) = 3 * 2.5 = 7.5. L_SC's teacher part
    mean((dt_l et_l t_l - t_l)^2): d/ddt_l = mean(2 (3x)(2x)) = 12 * 2.5 = 30."""
    method, batch = build(rounds=0)
    values = method.forward_train(batch)[1]
    values["mc"].backward(retain_graph=True)
    assert float(method.student_side.encoder.inputs["h"].weight.grad) == pytest.approx(-5.0)
    assert float(method.teacher_side.encoder.inputs["h"].weight.grad) == pytest.approx(7.5)
    method.zero_grad()
    values["sc"].backward()
    assert float(method.teacher_side.decoder.outputs["l"].weight.grad) == pytest.approx(30.0)
    # L_SC's student part mean((ds_h es_h s_h - s_h)^2), residual 0.5 * 2x - 2x = -x:
    # d/des_h = mean(2 (-x) ds_h s_h) = -4 * 2.5 = -10, d/dds_h = mean(2 (-x) es_h s_h) = -5,
    # d/dw1 = mean(2 (-x)(ds_h es_h - 1) x) = 2.5 (the reconstruction moves with s_h)
    assert float(method.student_side.encoder.inputs["h"].weight.grad) == pytest.approx(-10.0)
    assert float(method.student_side.decoder.outputs["h"].weight.grad) == pytest.approx(-5.0)
    assert float(method.student[1].weight.grad) == pytest.approx(2.5)
    assert all(p.grad is None for p in method.teacher.parameters())  # the teacher stays frozen


def test_shuffled_answers_pair_each_example_with_the_next_examples_answer():
    """answers: shuffled: s'_h = 3x = (3, 6) shifted by one example: (6, 3) against
    s_h = (2, 4): ((6 - 2)^2 + (3 - 4)^2) / 2 = 8.5; every other term unchanged."""
    assert terms(answers="shuffled") == pytest.approx(
        {"task": 5.0, "kd": 2.5, "interact": 8.5, "mc": 0.625, "sc": 25.0})


def test_random_interpreter_is_a_frozen_reinitialised_twin():
    """interpreter: random interprets with the twin's layer "1" (weight w): t'_h = 2wx, the
    answer 0.5 * 2wx = wx, s'_h = wx: L_interact = (w - 2)^2 * 2.5. The pre-trained teacher
    still gives logit KD and L_MC; the twin never trains and is the same on every build."""
    method, batch = build(interpreter="random")
    w = float(method.random_teacher[1].weight)
    assert w != 3.0 and float(method.teacher[1].weight) == 3.0
    got = {k: float(v.detach()) for k, v in method.forward_train(batch)[1].items()}
    assert got == pytest.approx({"task": 5.0, "kd": 2.5, "interact": (w - 2) ** 2 * 2.5,
                                 "mc": 0.625, "sc": 25.0})
    twin = {id(p) for p in method.random_teacher.parameters()}
    assert not twin & {id(p) for p in method.learnable_parameters()}
    assert all(not p.requires_grad for p in method.random_teacher.parameters())
    assert "random_teacher" in method.frozen_modules()  # left out of checkpoints
    assert method.extra_parameter_count() == build()[0].extra_parameter_count()
    again, _ = build(interpreter="random")
    assert float(again.random_teacher[1].weight) == w


def test_listen_gate_starts_half_own_view_half_question():
    """listen: gate with g = sigmoid(0) = 0.5 hears 0.5 x + 0.5 * 2x = 1.5x: t'_h = 4.5x,
    answer and s'_h 2.25x: d = (2.25 - 2)^2 * 2.5 = 0.15625; the gate learns."""
    assert terms(listen="gate")["interact"] == pytest.approx(0.15625)
    method, batch = build(listen="gate")
    method.forward_train(batch)[1]["interact"].backward()
    assert method.listen_gate.grad is not None and float(method.listen_gate.grad.abs()) > 0
    assert any(p is method.listen_gate for p in method.learnable_parameters())


def test_consistency_in_every_round_by_hand():
    """round_consistency, one round: the decoded question D_T(q) = 2x against t_l = x:
    2.5; the question x against the answer message 3x: 4 * 2.5 = 10. Two rounds weighted
    1:3: round 2 asks 1.5x, hears 3x (against x: 10), interprets 9x and answers 4.5x
    (against 1.5x: 22.5); its L_interact is 15.625 (see above)."""
    got = terms(round_consistency=True)
    assert got == pytest.approx({"task": 5.0, "kd": 2.5, "interact": 2.5, "mc": 0.625, "sc": 25.0,
                                 "round_mc": 10.0, "round_sc": 2.5})
    got = terms(rounds=2, round_weights=[1.0, 3.0], round_consistency=True, w2=2.0)
    assert got["interact"] == pytest.approx((2.5 + 3 * 15.625) / 4)
    assert got["round_sc"] == pytest.approx((2.5 + 3 * 10.0) / 4)
    assert got["round_mc"] == pytest.approx(2.0 * (10.0 + 3 * 22.5) / 4)
    assert "round_mc" not in terms()


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0]])
def test_round_weights_one_per_round(weights):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="one weight >= 0 per round"):
        METHODS["td"].Config(rounds=2, round_weights=weights)
