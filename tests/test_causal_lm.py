"""Causal LMs through the one-call API: task="causal-lm" on Hugging Face decoder models
(small random configs) with dict batches and -100 labels; token-level KD, GKD, feature
methods and TD per token; the decoder fast path of taps.run_between against the generic
path; padding that no per-token loss reads; the frozen teacher; and every mistake as one
clear error before the teacher runs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from talkingmodels import UserError, distill, load_student, losses, taps
from talkingmodels.api import _check_output
from talkingmodels.data import iterate, to_batch
from talkingmodels.inference import evaluate
from talkingmodels.methods import get_method
from talkingmodels.splits import Split
from talkingmodels.states import ModelPair
from tests.lm_models import VOCAB, llama, rows, texts

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

QUIET = {"progress": False, "device": "cpu", "task": "causal-lm"}
LAYERS = {"student_layers": ("model.layers.0", "model.layers.1"),
          "teacher_layers": ("model.layers.1", "model.layers.3")}


@pytest.fixture(scope="module")
def data():
    ids, mask, labels = texts(600)
    return rows(ids, mask, labels)


def loaders(data):
    return (DataLoader(data[:400], 32, shuffle=True), DataLoader(data[400:500], 50),
            DataLoader(data[500:], 50))


@pytest.fixture(scope="module")
def teacher(data):
    """A 4-layer Llama trained a little on the bigram language (a stand-in for pre-training)."""
    model = llama(64, 4, seed=1)
    batch = torch.utils.data.default_collate(data[:400])
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(120):
        rows_ = slice(step * 32 % 384, step * 32 % 384 + 32)
        loss = model(input_ids=batch["input_ids"][rows_], attention_mask=batch["attention_mask"][rows_],
                     labels=batch["labels"][rows_]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def test_a_student_learns_with_token_kd_and_the_teacher_never_changes(data, teacher):
    before = copy.deepcopy(teacher.state_dict())
    student = llama()
    untrained = distill(copy.deepcopy(student), teacher, *loaders(data), method="scratch", epochs=1,
                        lr=1e-9, **QUIET).test
    result = distill(student, teacher, *loaders(data), method="logit-kd", temperature=1.0, epochs=4,
                     lr=3e-3, **QUIET)
    assert result.metric == "perplexity"
    assert result.test < 0.35 * untrained  # uniform over 64 tokens is a perplexity of ~64
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("method, options", [
    ("gkd", {}), ("gkd", {"beta": 0.0}), ("feature-kd", {}), ("fitnet", {"hint_epochs": 1}),
    ("hybrid", {}), ("td", {}), ("td", {"answer_kd": 1.0}), ("gkd", {"lmbda": 1.0, "prompt_tokens": 4})])
def test_every_causal_lm_method_trains_the_student_and_only_it(data, teacher, method, options):
    before = copy.deepcopy(teacher.state_dict())
    student = llama()
    start = copy.deepcopy(student.state_dict())
    result = distill(student, teacher, *loaders(data), method=method, epochs=2, lr=3e-3, **LAYERS,
                     **QUIET, **options)
    assert result.test < 40  # learned something of the bigram language (uniform: ~64)
    assert any(not torch.equal(start[k], v) for k, v in result.student.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_evaluation_streams_the_split_and_equals_the_metric_on_all_of_it(data, teacher):
    batch = torch.utils.data.default_collate(data[400:500])
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for metric in (losses.PERPLEXITY, losses.NEXT_TOKEN_ACCURACY):
        whole = float(metric.fn(logits, batch["labels"]))
        streamed = evaluate(teacher, DataLoader(data[400:500], 30), metric)  # 4 batches, the last short
        assert abs(streamed - whole) < 1e-4 * whole


def build(method: str, student, teacher, batch, **options):
    cls = get_method(method)
    pair = ModelPair(student, teacher, LAYERS["student_layers"], LAYERS["teacher_layers"], "causal-lm",
                     losses.causal_lm_loss)
    distiller = cls(pair, cls.Config(**options))
    distiller.setup(batch)
    return distiller


@pytest.mark.parametrize("method", ["logit-kd", "gkd", "feature-kd", "hybrid", "td", "kd-modules"])
def test_no_per_token_loss_reads_the_padding(data, teacher, method):
    """Right-padded texts: what the padding positions hold (their token ids) must change no
    loss term; every term is averaged over real tokens only."""
    batch = to_batch(torch.utils.data.default_collate(data[:12]))
    assert batch.lengths is not None and int(batch.lengths.min()) < 16
    other = to_batch(torch.utils.data.default_collate(data[:12]))
    padding = other.student_kwargs["attention_mask"] == 0
    other.student_kwargs["input_ids"][padding] = 5  # (same dict for the teacher's inputs)
    distiller = build(method, llama(), teacher, batch)
    torch.manual_seed(0)
    _, terms = distiller.forward_train(batch)
    torch.manual_seed(0)
    _, again = distiller.forward_train(other)
    assert terms.keys() == again.keys()
    for name in terms:
        assert torch.allclose(terms[name], again[name], atol=1e-6), name


def decoder_models():
    small = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    return [LlamaForCausalLM(LlamaConfig(**small)).eval(),
            # a window of 3 tokens on the last three layers: the sliding mask is not the causal one
            Qwen2ForCausalLM(Qwen2Config(**small, use_sliding_window=True, sliding_window=3,
                                         max_window_layers=2)).eval(),
            MistralForCausalLM(MistralConfig(**small, sliding_window=3)).eval()]


@pytest.mark.parametrize("model", decoder_models(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("low, high", [("model.layers.0", "model.layers.3"),
                                       ("model.layers.1", "model.layers.2"), ("model.layers.2", None)])
def test_the_decoder_fast_path_equals_the_generic_path(model, low, high):
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    state = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert taps._decoder_stack(model, low, high) is not None  # the fast path applies
    fast = taps.run_between(model, low, high, state, input_ids=ids, attention_mask=mask)
    slow = taps.run_between(model, low, high, state, input_ids=ids, attention_mask=mask, fast=False)
    assert fast.shape == slow.shape == ((3, 9, 50) if high is None else (3, 9, 32))
    assert torch.allclose(fast, slow, atol=1e-5)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), state)
    (grad_slow,) = torch.autograd.grad(slow.square().sum(), state)
    assert torch.allclose(grad_fast, grad_slow, atol=1e-5)


def test_the_decoder_fast_path_runs_only_the_layers_in_between():
    model = decoder_models()[0]
    ran = []
    handles = [layer.register_forward_hook(lambda *_a, _i=i: ran.append(_i))
               for i, layer in enumerate(model.model.layers)]
    ids = torch.randint(1, 50, (2, 5))
    taps.run_between(model, "model.layers.1", "model.layers.3", torch.randn(2, 5, 32), input_ids=ids)
    for handle in handles:
        handle.remove()
    assert ran == [2, 3]
    with pytest.raises(UserError, match="must run before"):
        taps.run_between(model, "model.layers.3", "model.layers.1", torch.randn(2, 5, 32), input_ids=ids)


def test_a_loss_callable_is_called_on_the_first_batch_and_its_errors_name_it(data, teacher):
    def my_lm_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    result = distill(llama(), teacher, *loaders(data), method="logit-kd", task=my_lm_loss, epochs=1,
                     **{k: v for k, v in QUIET.items() if k != "task"})
    assert result.metric == "loss" and result.test > 0
    # what the loss accepts decides the output kind: next-token logits, so KD per token
    assert _check_output(llama(), to_batch(torch.utils.data.default_collate(data[:4])), None,
                         my_lm_loss) == "causal-lm"

    def broken_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels)  # (batch, seq, vocab) is wrong here

    failed = r"your loss \(task=.*broken_loss\) failed on the first batch"
    with pytest.raises(UserError, match=failed) as error:
        distill(llama(), teacher, *loaders(data), method="logit-kd", task=broken_loss, progress=False)
    assert "regression" not in str(error.value) and "classification" not in str(error.value)
    with pytest.raises(UserError, match="must return a scalar"):
        distill(llama(), teacher, *loaders(data), task=lambda p, t: p.sum(-1), progress=False)


def bad(data, **change):
    """A copy of the first 64 rows with ``change`` applied to every row."""
    return [{**row, **{k: f(row) for k, f in change.items()}} for row in data[:64]]


@pytest.mark.parametrize("case, match", [
    ("float labels", "task 'causal-lm' needs .* integer labels"),
    ("labels per text", "task 'causal-lm' needs"),
    ("label outside the vocabulary", r"labels must lie in 0\.\.63"),
    ("longer than the positions", "longer than the student's 8 positions"),
    ("classification of logits", "use task='causal-lm'"),
])
def test_bad_causal_lm_input_is_one_clear_error_before_the_teacher_runs(data, case, match):
    teacher = llama(seed=3)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    student, options = llama(), dict(QUIET)
    train = data[:64]
    if case == "float labels":
        train = bad(data, labels=lambda r: r["labels"].float())
    elif case == "labels per text":
        train = bad(data, labels=lambda r: r["labels"][0])
    elif case == "label outside the vocabulary":
        train = bad(data, labels=lambda r: r["labels"].clamp(min=0) + 60)
    elif case == "longer than the positions":
        student = llama(positions=8)
    else:
        options["task"] = "classification"
    with pytest.raises(UserError, match=match):
        distill(student, teacher, DataLoader(train, 32), DataLoader(data[400:450], 50), method="logit-kd",
                **options)
    assert not calls


def test_a_vocabulary_mismatch_names_both_sizes_for_logit_methods_only(data, teacher):
    student = llama(vocab=80)
    for method, options in (("logit-kd", {}), ("gkd", {}), ("td", {}), ("hybrid", {})):
        with pytest.raises(UserError, match="student's vocabulary has 80 tokens and the teacher's 64"):
            distill(student, teacher, *loaders(data), method=method, **LAYERS, **QUIET, **options)
    for method, options in (("feature-kd", {}), ("td", {"weight": 0.0})):
        result = distill(llama(vocab=80), teacher, *loaders(data), method=method, epochs=1, **LAYERS,
                         **QUIET, **options)
        assert result.test > 0


def test_the_student_saves_loads_and_generates(data, teacher, tmp_path):
    result = distill(llama(), teacher, *loaders(data), method="gkd", epochs=1, out=tmp_path / "run", **QUIET)
    student = load_student(tmp_path / "run", llama(seed=5))
    prompt = torch.tensor([[3, 4, 5]])
    assert torch.equal(student.generate(prompt, max_new_tokens=5, do_sample=False),
                       result.student.generate(prompt, max_new_tokens=5, do_sample=False))


def first_losses(result) -> dict:
    return {k: v for k, v in result.history[0].items() if k.startswith("loss_")}


def train_split(data):
    """The training texts as a Split: its batches come in the run's seeded order, cached
    or not, so two runs see the same batches."""
    return Split.from_batches(iterate(DataLoader(data[:400], 32), 32))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_top_k_cache_of_the_whole_vocabulary_trains_as_the_live_teacher(data, teacher, mode, tmp_path):
    """k = the vocabulary: the cached top-k is the teacher's whole distribution, so the KD
    terms equal those of the live teacher (to rounding); the teacher runs once per example."""
    calls = []
    handle = teacher.register_forward_hook(lambda _m, inputs, _o: calls.append(1))
    _, val, test = loaders(data)
    try:
        options = {"method": "hybrid", "epochs": 2, "lr": 3e-3, "batch_size": 32, **LAYERS, **QUIET}
        live = distill(llama(), teacher, train_split(data), val, test, **options)
        live_calls = len(calls)
        calls.clear()
        cached = distill(llama(), teacher, train_split(data), val, test, cache_teacher=mode, top_k=VOCAB,
                         out=tmp_path / "run", **options)
    finally:
        handle.remove()
    # 13 batches of 32 texts an epoch, and two probe passes of the layers (state_dims); the
    # cache in one pass, in batches of 32
    assert live_calls == 2 + 2 * 13 and len(calls) == 2 + 13
    for name, value in first_losses(live).items():
        assert abs(first_losses(cached)[name] - value) < 1e-5, name
    assert abs(cached.test - live.test) < 1e-4 * live.test
    assert (tmp_path / "run" / "teacher_cache.safetensors").is_file() == (mode == "disk")


@pytest.mark.parametrize("tail", ["renormalise", "other"])
def test_a_small_top_k_cache_trains_and_gets_closer_to_full_kd_as_k_grows(data, teacher, tail, tmp_path):
    options = {"method": "logit-kd", "temperature": 1.0, "epochs": 1, "lr": 3e-3, "batch_size": 32,
               **QUIET}
    _, val, test = loaders(data)
    full = first_losses(distill(llama(), teacher, train_split(data), val, test, **options))["loss_kd"]
    gaps = []
    for k in (2, 16, 48):
        run = distill(llama(), teacher, train_split(data), val, test, cache_teacher="disk", top_k=k,
                      top_k_tail=tail, out=tmp_path / f"k{k}", **options)
        gaps.append(abs(first_losses(run)["loss_kd"] - full))
    # (measured: renormalise 1.98, 0.95, 0.23 of 2.14; at k = 64 the same, tested above)
    assert gaps[2] < gaps[1] < gaps[0] and gaps[2] < 0.15 * full


def test_a_full_vocabulary_cache_prints_its_size_and_refuses_more_than_the_free_disk(
        data, teacher, tmp_path, capsys, monkeypatch):
    options = {"method": "logit-kd", "epochs": 1, **QUIET}
    distill(llama(), teacher, *loaders(data), cache_teacher="memory", **options)
    # 400 texts, 2/3 of 16 tokens and 1/3 of 12: 5,868 tokens x 64 words x 4 bytes
    assert "full next-token logits in memory: 0.00 GiB" in capsys.readouterr().err
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda _p: shutil_module._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(UserError, match="does not fit the 0.00 GiB free"):
        distill(llama(), teacher, *loaders(data), cache_teacher="disk", out=tmp_path / "run", **options)
    assert not (tmp_path / "run" / "teacher_cache.safetensors").exists()


@pytest.mark.parametrize("options, match", [
    ({"cache_teacher": "memory", "top_k": 65}, r"top_k 65 is larger than the vocabulary of 64 tokens"),
    ({"top_k": 8}, "top_k applies to a cached causal-LM teacher"),
    ({"cache_teacher": "memory", "top_k": 8, "top_k_tail": "drop"}, "unknown top_k_tail 'drop'"),
    ({"cache_teacher": "memory", "top_k": 0}, "top_k must be a whole number >= 1"),
])
def test_bad_top_k_options_are_one_clear_error_before_the_teacher_runs(data, options, match):
    teacher = llama(seed=3)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(UserError, match=match):
        distill(llama(), teacher, *loaders(data), method="logit-kd", **QUIET, **options)
    assert not calls


def test_bf16_autocast_and_a_bf16_teacher_train_a_causal_lm_on_the_cpu(data, teacher):
    for method in ("logit-kd", "td"):
        result = distill(llama(), copy.deepcopy(teacher), *loaders(data), method=method, epochs=2, lr=3e-3,
                         mixed_precision="bf16", train_options={"teacher_dtype": "bfloat16"}, **LAYERS,
                         **QUIET)
        assert 1 < result.test < 40


def test_a_methods_own_layers_replace_the_tasks_and_its_target_stays_the_cached_one(data, teacher):
    """teacher_layers / student_layers of a method: TD interprets between its own teacher
    layers and reads the teacher's states there (computed: a task caches only its own
    layers'), while the KD target stays the cache's (a causal LM's top-k), so that the layers
    are all a grid over layer pairs changes. A method that reads no state refuses them."""
    from dataclasses import replace

    from talkingmodels.states import TopK

    batch = to_batch(torch.utils.data.default_collate(data[:12]))
    own = ("model.layers.0", "model.layers.2")
    td = build("td", llama(), teacher, batch, teacher_layers=own)
    assert td.pair.teacher_layers == own and td.pair.student_layers == LAYERS["student_layers"]
    with torch.no_grad(), taps.capture(teacher, (*LAYERS["teacher_layers"], *own)) as states:
        logits = teacher(**batch.teacher_kwargs).logits
    target = TopK.of(logits, 5)
    cached = replace(batch, teacher_cache={**{n: states[n] for n in LAYERS["teacher_layers"]},
                                           "output": target})
    later = []  # (the teacher runs up to its last own layer only: 3 and the head never run)
    hook = teacher.model.layers[3].register_forward_hook(lambda *_: later.append(1))
    seen = td.teacher_states(cached, own)
    hook.remove()
    assert not later
    for name in own:
        assert torch.equal(seen[name], states[name])
    assert torch.equal(seen["output"].log_probs, target.log_probs)
    calls = []
    between = td.teacher_between
    td.teacher_between = lambda low, high, *rest: calls.append((low, high)) or between(low, high, *rest)
    td.forward_train(cached)
    assert calls and set(calls) == {own}
    with pytest.raises(UserError, match="'logit-kd' reads no hidden states: teacher_layers do not apply"):
        build("logit-kd", llama(), teacher, batch, teacher_layers=own)
