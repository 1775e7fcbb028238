"""Every registered method trains one step on the fixture task; TD's gradients go where they must."""

from __future__ import annotations

import math

import pytest
import torch

from talkingmodels import runner, taps
from talkingmodels.methods import METHODS, Distiller, supports

# Loss terms per (method, stage). A method missing here is still trained and checked for
# finite terms; add it here to pin its terms down.
EXPECTED_TERMS = {
    ("scratch", "main"): {"task"},
    ("logit-kd", "main"): {"task", "kd"},
    ("feature-kd", "main"): {"task", "feature"},
    ("fitnet", "hint"): {"hint"},
    ("fitnet", "main"): {"task", "kd"},
    ("hybrid", "main"): {"task", "kd", "feature"},
    ("td", "main"): {"task", "kd", "interact", "mc", "sc"},
    ("dkd", "main"): {"task", "tckd", "nckd"},
    ("dist", "main"): {"task", "inter", "intra"},
    ("rkd", "main"): {"task", "distance", "angle"},
    ("pkt", "main"): {"task", "pkt"},
    ("crd", "main"): {"task", "crd"},
    ("kd-modules", "main"): {"task", "kd", "feature", "mc", "sc"},
}


def build(prepared, name: str, seed: int = 0, **options) -> Distiller:
    cls = METHODS[name]
    return runner.build_method(prepared, cls, cls.Config(**options), seed)


@pytest.fixture(scope="module")
def batch(dense):
    return dense.splits.train.batch(slice(0, 64))


def skip_unless_supported(prepared, name: str) -> None:
    """Classification-only methods (dkd, dist) have no meaning on the rating fixture."""
    if not supports(METHODS[name], prepared.output):
        pytest.skip(f"{name} does not apply to {prepared.output} outputs")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def test_all_methods_are_registered():
    assert {"scratch", "logit-kd", "feature-kd", "fitnet", "hybrid", "td",
            "dkd", "dist", "rkd", "pkt", "crd", "kd-modules"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and issubclass(cls, Distiller)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_training_step(dense, batch, name):
    skip_unless_supported(dense, name)
    method = build(dense, name)
    teacher_before = snapshot(method.teacher)
    method.train()
    assert not method.teacher.training
    for stage in method.stages():
        method.stage = stage
        params = method.learnable_parameters()
        teacher_ids = {id(p) for p in method.teacher.parameters()}
        assert not teacher_ids & {id(p) for p in params}
        optimizer = torch.optim.Adam(params, lr=1e-2)
        student_before = snapshot(method.student)

        prediction, terms = method.forward_train(batch)

        assert prediction.shape == batch.target.shape
        expected = EXPECTED_TERMS.get((name, stage.name))
        if expected is not None:
            assert set(terms) == expected, (name, stage.name)
        assert terms
        for term, value in terms.items():
            assert value.dim() == 0 and math.isfinite(float(value.detach())), (name, term)
            assert float(value.detach()) >= 0, (name, term)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        assert not same(student_before, snapshot(method.student)), f"{name}: student did not learn"
    assert same(teacher_before, snapshot(method.teacher))
    assert all(p.grad is None for p in method.teacher.parameters())


@pytest.mark.parametrize("name", ["scratch", "logit-kd"])
def test_no_extra_parameters(dense, name):
    assert build(dense, name).extra_parameter_count() == 0


def test_extra_parameters_are_the_added_modules(dense):
    feature = build(dense, "feature-kd")
    assert feature.extra_parameter_count() == sum(p.numel() for p in feature.regressor.parameters()) > 0
    td = build(dense, "td")
    channel = sum(p.numel() for side in (td.student_side, td.teacher_side) for p in side.parameters())
    assert td.extra_parameter_count() == channel > 0


# ------------------------------------------------------------------------------ fitnet
def test_fitnet_hint_stage_trains_up_to_the_guided_layer(dense, batch):
    method = build(dense, "fitnet")
    assert [s.name for s in method.stages()] == ["hint", "main"]
    assert not method.stages()[0].select
    method.train()
    method.stage = method.stages()[0]  # hint
    _, terms = method.forward_train(batch)
    terms["hint"].backward()
    g = grads(method.student)
    assert nonzero(g["mlp.0.weight"]) and nonzero(g["mlp.3.weight"])
    assert g["head.weight"] is None  # after the guided layer (mlp.4): untouched
    assert all(nonzero(p.grad) for p in method.regressor.parameters())
    # the regressor only serves the hint stage
    regressor = {id(p) for p in method.regressor.parameters()}
    assert regressor <= {id(p) for p in method.learnable_parameters()}
    method.stage = method.stages()[1]  # main
    assert not regressor & {id(p) for p in method.learnable_parameters()}


# ------------------------------------------------------------------------------ td
def td_step(dense, batch, **options) -> Distiller:
    method = build(dense, "td", **options)
    method.train()
    _, terms = method.forward_train(batch)
    optimizer = torch.optim.Adam(method.learnable_parameters(), lr=1e-2)
    optimizer.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    optimizer.step()
    return method


@pytest.mark.parametrize("channel", ["linear", "dense-relu-dense"])
def test_td_teacher_is_frozen(dense, batch, channel):
    before = snapshot(dense.teacher)
    method = build(dense, "td", channel=channel)
    assert method.teacher is dense.teacher  # frozen: shared, not copied
    method.train()
    assert method.training and method.student.training
    assert not any(m.training for m in method.teacher.modules())  # dropout stays off
    method = td_step(dense, batch, channel=channel)
    assert not method.teacher.training
    assert same(before, snapshot(method.teacher))
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    # the student is trained through every one of its parameters
    assert all(nonzero(p.grad) for p in method.student.parameters())


@pytest.mark.parametrize("channel", ["linear", "dense-relu-dense"])
def test_td_every_channel_parameter_gets_a_gradient(dense, batch, channel):
    method = td_step(dense, batch, channel=channel)
    missing = [f"{side}.{n}" for side in ("student_side", "teacher_side")
               for n, p in getattr(method, side).named_parameters() if not nonzero(p.grad)]
    assert not missing


def test_td_channel_gradients_of_the_used_modules(dense, batch):
    """The encoders on both roles and the decoders TD listens with all learn."""
    method = td_step(dense, batch)
    for module in (method.student_side.encoder, method.teacher_side.encoder,
                   method.student_side.decoder.outputs["h"], method.teacher_side.decoder.outputs["l"]):
        assert all(nonzero(p.grad) for p in module.parameters())


def test_td_unfrozen_teacher_is_a_trained_copy(dense, batch):
    before = snapshot(dense.teacher)
    method = build(dense, "td", unfreeze_teacher=True)
    assert method.teacher is not dense.teacher
    method.train()
    assert method.teacher.training
    teacher_ids = {id(p) for p in method.teacher.parameters()}
    assert teacher_ids <= {id(p) for p in method.learnable_parameters()}
    _, terms = method.forward_train(batch)
    sum(terms.values()).backward()
    assert any(nonzero(p.grad) for p in method.teacher.parameters())
    assert same(before, snapshot(dense.teacher))
    assert not dense.teacher.training


def terms_of(dense, batch, **options) -> dict[str, float]:
    method = build(dense, "td", **options)
    method.train()
    return {name: float(value.detach()) for name, value in method.forward_train(batch)[1].items()}


def test_td_rounds(dense, batch):
    zero = terms_of(dense, batch, rounds=0)
    assert set(zero) == {"task", "kd", "mc", "sc"}
    one, two = terms_of(dense, batch, rounds=1), terms_of(dense, batch, rounds=2)
    assert math.isfinite(two["interact"])
    assert two["interact"] != pytest.approx(one["interact"])
    # the other terms do not depend on the number of rounds
    for term in ("task", "kd", "mc", "sc"):
        assert zero[term] == one[term] == two[term]


@pytest.mark.parametrize("rounds", [1, 2])
def test_td_follow_up_rounds_ask_from_the_answer(dense, batch, rounds):
    """Round r+1 asks with E_S(s'_h(r)): only then does E_S's h-input learn from L_interact."""
    method = build(dense, "td", rounds=rounds)
    method.train()
    method.forward_train(batch)[1]["interact"].backward()
    h_input = method.student_side.encoder.inputs["h"].weight.grad
    assert nonzero(method.student_side.encoder.inputs["l"].weight.grad)
    assert nonzero(h_input) == (rounds > 1)


def test_td_options_switch_terms(dense, batch):
    assert "kd" not in terms_of(dense, batch, weight=0.0)
    assert "mc" not in terms_of(dense, batch, message_consistency=False)
    assert "sc" not in terms_of(dense, batch, w3=0.0)
    cosine = terms_of(dense, batch, distance="cosine")
    assert all(math.isfinite(v) for v in cosine.values())
    extra = terms_of(dense, batch, answer_kd=0.5, answer_task=0.5)
    assert {"answer_kd", "answer_task"} <= set(extra)
    assert all(math.isfinite(v) for v in extra.values())
    # weights scale their terms
    plain = terms_of(dense, batch)
    double = terms_of(dense, batch, w1=2.0, w2=2.0)
    assert double["interact"] == pytest.approx(2 * plain["interact"])
    assert double["mc"] == pytest.approx(2 * plain["mc"])


def interact_grads(dense, batch, stop: list[str]):
    """Gradients of L_interact alone, for student and channel parameters."""
    method = build(dense, "td", stop_gradient=stop)
    method.train()
    method.forward_train(batch)[1]["interact"].backward()
    channel = {f"{side}.{n}": p.grad for side in ("student_side", "teacher_side")
               for n, p in getattr(method, side).named_parameters()}
    return grads(method.student), channel


def test_td_stop_gradient_question_and_student_state(dense, batch):
    student, channel = interact_grads(dense, batch, ["question", "student_state"])
    assert all(g is None for g in student.values())  # the student gets nothing from L_interact
    assert nonzero(channel["student_side.encoder.inputs.l.weight"])  # the channel still learns
    assert nonzero(channel["teacher_side.decoder.outputs.l.weight"])


def test_td_stop_gradient_answer(dense, batch):
    student, channel = interact_grads(dense, batch, ["answer"])
    assert all(g is None for g in channel.values())  # s'_h is a fixed target
    assert nonzero(student["mlp.0.weight"])  # s_h moves towards it


def test_td_stop_gradient_question_only_blocks_the_question_path(dense, batch):
    """With the question detached, the student's first layer learns only through s_h; the
    gradient it gets is exactly the one it gets when the whole answer is detached."""
    full, _ = interact_grads(dense, batch, [])
    no_question, channel = interact_grads(dense, batch, ["question"])
    no_answer, _ = interact_grads(dense, batch, ["answer"])
    via_question, _ = interact_grads(dense, batch, ["student_state"])
    assert nonzero(channel["student_side.encoder.inputs.l.weight"])
    assert nonzero(via_question["mlp.0.weight"])  # the question path reaches the first layer
    assert via_question["mlp.3.weight"] is None  # ... and nothing above l
    for name in ("mlp.0.weight", "mlp.3.weight", "users.weight"):
        assert torch.allclose(no_question[name], no_answer[name], atol=1e-7)
        # the two paths add up to the full gradient
        total = no_answer[name] + (via_question[name] if via_question[name] is not None else 0)
        assert torch.allclose(full[name], total, atol=1e-6)
    assert not torch.allclose(full["mlp.0.weight"], no_question["mlp.0.weight"])


# ------------------------------------------------------------------------------ teacher cache
def with_cache(batch, cache: dict[str, torch.Tensor]):
    return type(batch)(batch.student_inputs, batch.teacher_inputs, batch.target, cache, batch.index)


def teacher_cache(prepared, batch) -> dict[str, torch.Tensor]:
    """What a task may precompute: the frozen teacher's states by layer name and "output"."""
    with torch.no_grad(), taps.capture(prepared.teacher, prepared.teacher_layers) as states:
        output = prepared.teacher(*batch.teacher_inputs)
    return {**states, "output": output}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cached_teacher_gives_the_same_terms(dense, batch, name):
    skip_unless_supported(dense, name)
    cached = with_cache(batch, teacher_cache(dense, batch))
    for stage in build(dense, name).stages():
        plain, served = build(dense, name), build(dense, name)
        for method in (plain, served):
            method.train()
            method.stage = stage
        a = plain.forward_train(batch)[1]
        b = served.forward_train(cached)[1]
        assert a.keys() == b.keys()
        for term in a:
            assert torch.allclose(a[term], b[term], atol=1e-6), (name, stage.name, term)


def test_frozen_teacher_is_served_from_the_cache_an_unfrozen_one_is_not(dense, batch):
    bogus = {key: torch.zeros_like(value) for key, value in teacher_cache(dense, batch).items()}
    plain = float(build(dense, "logit-kd").forward_train(batch)[1]["kd"].detach())
    # frozen: the teacher's "prediction" is the cached zeros, so kd = mse(prediction, 0)
    prediction, terms = build(dense, "logit-kd").forward_train(with_cache(batch, bogus))
    assert float(terms["kd"].detach()) == pytest.approx(float(prediction.detach().pow(2).mean()))
    # unfrozen: the teacher changes every step, so it runs itself (dropout off to compare)
    unfrozen = build(dense, "logit-kd", unfreeze_teacher=True)
    unfrozen.teacher.eval()
    live = float(unfrozen.forward_train(with_cache(batch, bogus))[1]["kd"].detach())
    assert live == pytest.approx(plain, abs=1e-6)
    assert live != pytest.approx(float(terms["kd"].detach()))


def test_td_interpretation_of_its_own_state_is_its_own_state(dense, batch):
    """With listen='add' and a silent decoder, the teacher interprets its own state at l:
    t'_h must equal its own t_h. With listen='replace' and a decoder that outputs t_l
    exactly, the same holds. Both pin down what `interpret` feeds the teacher."""
    method = build(dense, "td", listen="add")
    t_low, t_high = dense.teacher_layers
    own = method.teacher_states(batch, (t_low, t_high))
    decoder = method.teacher_side.decoder.outputs["l"]
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.zero_()
    question = torch.randn(len(batch.target), method.config.message_dim)
    assert torch.allclose(method.interpret(question, own[t_low], batch), own[t_high], atol=1e-6)

    method = build(dense, "td", listen="replace")
    heard = method.interpret(torch.zeros(len(batch.target), method.config.message_dim),
                             own[t_low], batch)
    # a zero question decodes to the decoder's bias alone: the interpretation of that state
    bias_state = method.teacher_side.decoder(torch.zeros(1, method.config.message_dim), "l")
    expected = taps.run_between(method.teacher, t_low, t_high, bias_state.expand_as(own[t_low]))
    assert torch.allclose(heard, expected, atol=1e-6)


# ------------------------------------------------------- td: a cheaper interaction
def test_td_interact_fraction_is_the_exchange_on_evenly_spread_rows(dense, batch):
    """interact_fraction: L_interact is the full exchange on the chosen rows only (every other
    term still on the whole batch), and the rows spread over the batch."""
    part = build(dense, "td", interact_fraction=0.25)
    whole = build(dense, "td")  # same seed: same channel
    rows = part._interaction_rows(len(batch))
    assert rows.tolist() == list(range(0, 64, 4))
    part.train(), whole.train()
    terms = part.forward_train(batch)[1]
    on_rows = whole.forward_train(batch.rows(rows))[1]
    full = whole.forward_train(batch)[1]
    terms, on_rows, full = ({k: float(v.detach()) for k, v in t.items()} for t in (terms, on_rows, full))
    assert terms["interact"] == pytest.approx(on_rows["interact"], rel=1e-6)
    assert terms["interact"] != pytest.approx(full["interact"], rel=1e-3)
    for term in ("task", "kd", "mc", "sc"):
        assert terms[term] == full[term]
    assert build(dense, "td", interact_fraction=0.999)._interaction_rows(64) is None


def test_td_interact_every_skips_steps_and_resumes_its_cadence(dense, batch):
    method = build(dense, "td", interact_every=3)
    method.train()
    seen = ["interact" in method.forward_train(batch)[1] for _ in range(4)]
    assert seen == [True, False, False, True]
    # the step count is part of the method's state: a resumed run keeps the cadence
    resumed = build(dense, "td", interact_every=3)
    resumed.train()
    resumed.load_state_dict(method.state_dict())
    assert ["interact" in resumed.forward_train(batch)[1] for _ in range(3)] == [False, False, True]
    # evaluation never counts as a step
    method.eval()
    method.forward_train(batch)
    assert int(method.steps_trained) == 4
    assert "steps_trained" not in dict(build(dense, "td").named_buffers())


def test_td_interact_precision_bf16_runs_only_the_teachers_segment_in_bf16(dense, batch):
    dtypes = {}

    def record(name):
        def hook(_module, _inputs, output):
            dtypes.setdefault(name, set()).add(output.dtype)
        return hook

    results = {}
    for precision in ("fp32", "bf16"):
        dtypes.clear()
        method = build(dense, "td", interact_precision=precision)
        method.train()
        handles = [m.register_forward_hook(record(n)) for n, m in method.teacher.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        handles += [m.register_forward_hook(record("student." + n))
                    for n, m in method.student.named_modules() if isinstance(m, torch.nn.Linear)]
        terms = method.forward_train(batch)[1]
        for handle in handles:
            handle.remove()
        results[precision] = {k: float(v.detach()) for k, v in terms.items()}
        teacher = set().union(*(v for k, v in dtypes.items() if not k.startswith("student.")))
        student = set().union(*(v for k, v in dtypes.items() if k.startswith("student.")))
        assert student == {torch.float32}
        # (the teacher's own forward pass, when not cached, stays in float32)
        assert (torch.bfloat16 in teacher) == (precision == "bf16")
        assert terms["interact"].dtype == torch.float32
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16["interact"] == pytest.approx(fp32["interact"], rel=2e-2)
    assert bf16["interact"] != fp32["interact"]
    for term in ("task", "kd", "mc", "sc"):
        assert bf16[term] == fp32[term]
