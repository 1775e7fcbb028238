"""The one-call API on a user's own models and data: DataLoaders (map-style and iterable),
Hugging Face batches and datasets, devices and precision, saving the student, exact resume
over a DataLoader, and every mistake as one clear error before any teacher computation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

from talkingmodels import UserError, distill, load_student
from talkingmodels.checkpoint import Interrupted
from talkingmodels.engine import TrainConfig, fit
from talkingmodels.losses import ACCURACY
from talkingmodels.methods import METHODS
from talkingmodels.splits import Split
from talkingmodels.states import ModelPair

LAYERS = {"student_layers": ("1", "3"), "teacher_layers": ("1", "3")}
QUIET = {"progress": False, "device": "cpu"}


def mlp(width: int, inputs: int = 20) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 2))


@pytest.fixture(scope="module")
def task():
    """(x, y, a pre-trained teacher): 2 classes from the sign of a sum of 5 features."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    torch.manual_seed(0)
    teacher = mlp(64)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(x[:400]), y[:400]).backward()
        optimizer.step()
    return x, y, teacher.eval()


def loaders(x, y, batch_size=32, **train_kwargs):
    train = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=batch_size,
                       shuffle=train_kwargs.pop("shuffle", True), **train_kwargs)
    return (train, DataLoader(TensorDataset(x[400:500], y[400:500]), batch_size=100),
            DataLoader(TensorDataset(x[500:], y[500:]), batch_size=100))


def student(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(16)


def test_distill_learns_over_dataloaders_and_returns_the_student_in_eval_mode(task, capsys):
    x, y, teacher = task
    result = distill(student(), teacher, *loaders(x, y), method="td", epochs=8, lr=1e-2,
                     device="cpu", message_dim=8, **LAYERS)
    assert result.test > 0.85 and result.val > 0.85  # chance is 0.5
    assert not result.student.training
    assert len(result.history) == result.epochs and result.best_epoch <= result.epochs
    assert {"loss_task", "loss_kd", "loss_interact", "val_accuracy"} <= set(result.history[0])
    assert "epochs" in capsys.readouterr().err  # the progress bar
    distill(student(), teacher, *loaders(x, y), method="scratch", epochs=1, **QUIET)
    assert "epochs" not in capsys.readouterr().err


class SplitOrder(Sampler):
    """The batches a Split draws for a run of seed ``seed``, as a DataLoader's batch sampler."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        for rows in torch.randperm(self.n, generator=self.generator).split(self.batch_size):
            yield rows.tolist()

    def __len__(self):
        return -(-self.n // self.batch_size)


@pytest.mark.parametrize("method", ["td", "hybrid"])
def test_a_dataloader_in_the_same_order_gives_the_split_results_bit_for_bit(task, method):
    x, y, teacher = task
    common = {"method": method, "epochs": 3, "lr": 1e-2, "seed": 5, "batch_size": 32, **LAYERS, **QUIET}
    splits = [Split((x[rows],), y[rows]) for rows in (slice(0, 400), slice(400, 500), slice(500, 600))]
    from_split = distill(student(), teacher, *splits, **common)
    train = DataLoader(TensorDataset(x[:400], y[:400]), batch_sampler=SplitOrder(400, 32, seed=5),
                       generator=torch.Generator())  # (its own generator: no global RNG draw)
    _, val, test = loaders(x, y)
    from_loader = distill(student(), teacher, train, val, test, **common)
    assert (from_loader.val, from_loader.test) == (from_split.val, from_split.test)
    for key, value in from_split.student.state_dict().items():
        assert torch.equal(value, from_loader.student.state_dict()[key]), key
    # (and another order is another run: the comparison can tell)
    other = distill(student(), teacher, *loaders(x, y), **common)
    assert any(not torch.equal(v, other.student.state_dict()[k])
               for k, v in from_split.student.state_dict().items())


class Stream(IterableDataset):
    """An iterable dataset (no length, no indexing) of (x, y) examples."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def test_an_iterable_dataset_trains(task):
    x, y, teacher = task
    train = DataLoader(Stream(x[:400], y[:400]), batch_size=32)
    _, val, _ = loaders(x, y)
    result = distill(student(), teacher, train, val, method="logit-kd", epochs=6, lr=1e-2, **QUIET)
    assert result.test is None and result.val > 0.8


class TokenStudent(nn.Module):
    """A small model that reads Hugging Face-style batches by keyword."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mix1, self.mix2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.seen: set[str] = set()

    def forward(self, input_ids, attention_mask):
        self.seen.update(("input_ids", "attention_mask"))
        h = torch.relu(self.mix2(torch.relu(self.mix1(self.embed(input_ids)))))
        weights = attention_mask.unsqueeze(-1).float()
        return self.head((h * weights).sum(1) / weights.sum(1))


@pytest.fixture(scope="module")
def tokens():
    """Token ids with right padding, labels: whether token 7 occurs; a tiny BERT teacher."""
    from transformers import BertConfig, BertForSequenceClassification

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (300, 12), generator=g)
    lengths = torch.randint(4, 13, (300,), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()
    ids = ids * mask
    labels = ((ids == 7) | (ids == 8)).any(1).long()
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=2)).eval()
    return ids, mask, labels, teacher


def test_dict_batches_and_a_hugging_face_dataset(tokens):
    datasets = pytest.importorskip("datasets")
    ids, mask, labels, teacher = tokens
    parts = [datasets.Dataset.from_dict({
        "input_ids": ids[rows].tolist(), "attention_mask": mask[rows].tolist(),
        "labels": labels[rows].tolist(), "text": ["a"] * len(labels[rows])})
        for rows in (slice(0, 200), slice(200, 250), slice(250, 300))]
    model = TokenStudent()
    result = distill(model, teacher, *parts, method="td", epochs=2, batch_size=32,
                     student_layers=("mix1", "mix2"),
                     teacher_layers=("bert.encoder.layer.0", "bert.encoder.layer.1"), **QUIET)
    assert model.seen == {"input_ids", "attention_mask"}  # by keyword; the text column dropped
    assert 0.0 <= result.test <= 1.0 and len(result.history) == 2
    # the same dict batches from a plain DataLoader, cached teacher states included
    rows = [{"input_ids": i, "attention_mask": m, "labels": t}
            for i, m, t in zip(ids, mask, labels, strict=True)]
    cached = distill(TokenStudent(), teacher, DataLoader(rows[:200], batch_size=32, shuffle=True),
                     DataLoader(rows[200:250], batch_size=50), method="feature-kd", epochs=2,
                     cache_teacher="memory", student_layers=("mix1", "mix2"),
                     teacher_layers=("bert.encoder.layer.0", "bert.encoder.layer.1"), **QUIET)
    assert len(cached.history) == 2


def test_a_disk_cache_of_token_states_is_packed_and_trains_as_the_memory_cache(tokens, tmp_path):
    """cache_teacher="disk" stores sentences' token states without their padding and hands
    back the same rows (zeros at padding) as the in-memory cache: the same training."""
    from safetensors.torch import load_file

    ids, mask, labels, teacher = tokens
    rows = [{"input_ids": i, "attention_mask": m, "labels": t}
            for i, m, t in zip(ids, mask, labels, strict=True)]
    results = {}
    for mode in ("memory", "disk"):
        torch.manual_seed(0)  # the same student
        results[mode] = distill(TokenStudent(), teacher, DataLoader(rows[:200], batch_size=32, shuffle=True),
                                DataLoader(rows[200:250], batch_size=50), method="td", epochs=2,
                                cache_teacher=mode, out=tmp_path / mode, student_layers=("mix1", "mix2"),
                                teacher_layers=("bert.encoder.layer.0", "bert.encoder.layer.1"), **QUIET)
    assert results["memory"].history == results["disk"].history
    stored = load_file(tmp_path / "disk" / "teacher_cache.safetensors")
    real = int(mask[:200].sum())
    assert stored["bert.encoder.layer.0"].shape == (real, 32)  # real tokens only
    assert stored["output"].shape == (200, 2)


def counting(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_cache_teacher_runs_the_teacher_once_per_example(task, tmp_path):
    x, y, teacher = task
    frozen = mlp(64)
    frozen.load_state_dict(teacher.state_dict())
    calls = counting(frozen)
    common = {"method": "hybrid", "epochs": 3, "lr": 1e-2, **LAYERS, **QUIET}
    memory = distill(student(), frozen, *loaders(x, y, batch_size=40), cache_teacher="memory", **common)
    # the training examples in one pass, and the method's probe of the widths (two passes
    # on 4 examples); never while training
    assert len(calls) == 1 + 2
    disk = distill(student(), frozen, *loaders(x, y, batch_size=40), cache_teacher="disk",
                   out=tmp_path / "run", **common)
    assert (tmp_path / "run" / "teacher_cache.safetensors").is_file()
    assert (memory.val, memory.test) == (disk.val, disk.test)
    # disk: written batch by batch, in the training batch size (10 batches of 40)
    assert len(calls) == 3 + 10 + 2
    online = distill(student(), frozen, *loaders(x, y, batch_size=40), **common)
    assert len(calls) == 3 + 12 + 2 + 3 * 10  # online: on each of the 10 batches of an epoch
    assert online.val > 0.8


def test_bf16_autocast_and_a_bf16_teacher_on_the_cpu(task):
    x, y, teacher = task
    frozen = mlp(64)
    frozen.load_state_dict(teacher.state_dict())
    result = distill(student(), frozen, *loaders(x, y), method="td", epochs=6, lr=1e-2,
                     mixed_precision="bf16", train_options={"teacher_dtype": "bfloat16"},
                     **LAYERS, **QUIET)
    assert frozen[0].weight.dtype == torch.bfloat16  # the frozen teacher is held in bf16
    assert all(p.dtype == torch.float32 for p in result.student.parameters())
    assert result.val > 0.8


def test_saved_student_loads_into_the_users_model(task, tmp_path):
    x, y, teacher = task
    result = distill(student(), teacher, *loaders(x, y), method="td", epochs=2, message_dim=4,
                     out=tmp_path / "run", **LAYERS, **QUIET)
    meta = json.loads((tmp_path / "run" / "talkingmodels.json").read_text())
    assert meta["method"] == "td" and meta["options"]["message_dim"] == 4
    assert meta["student_layers"] == ["1", "3"] and meta["test"] == result.test
    assert meta["version"] and (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # finished: nothing to resume
    loaded = load_student(tmp_path / "run", student(seed=9))
    assert torch.equal(loaded(x), result.student(x)) and not loaded.training
    with pytest.raises(UserError, match="does not fit"):
        load_student(tmp_path / "run", mlp(8))
    with pytest.raises(UserError, match="no saved student"):
        load_student(tmp_path / "nothing", mlp(16))


class Killed(Exception):
    pass


def test_resume_over_a_shuffled_dataloader_is_exact_and_trains_only_the_rest(task, tmp_path):
    """A DataLoader that shuffles with the global RNG: killed after an epoch, and paused by a
    signal mid-epoch; resumed runs train only what was left and end as the whole run."""
    x, y, teacher = task
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, patience=10, device="cpu")
    steps_per_epoch = 13

    def run(checkpoint=None, kill_after=None, signal_at=None, steps=None):
        torch.manual_seed(3)
        # (dropout: a draw from the global RNG every step, as the loader's shuffle)
        student = nn.Sequential(*mlp(16)[:4], nn.Dropout(0.2), mlp(16)[4])
        method = METHODS["td"](ModelPair(student, teacher, ("1", "3"), ("1", "3"),
                                         "classification", nn.functional.cross_entropy),
                               METHODS["td"].Config(message_dim=4))
        train, val, test = loaders(x, y, num_workers=0)
        plain = method.forward_train

        def forward_train(batch):
            if steps is not None:
                steps.append(1)
            if signal_at is not None and len(steps) == signal_at:
                os.kill(os.getpid(), signal.SIGINT)
            return plain(batch)

        method.forward_train = forward_train

        def on_epoch(row):
            if row["epoch"] == kill_after:
                raise Killed

        from talkingmodels.splits import Splits

        result = fit(method, Splits(train, val, test), ACCURACY, cfg, seed=3, on_epoch=on_epoch,
                     checkpoint=checkpoint)
        return result, method.student.state_dict()

    whole, whole_state = run()
    path = tmp_path / "run.pt"
    with pytest.raises(Killed):
        run(path, kill_after=2)
    after: list[int] = []
    resumed, state = run(path, steps=after)
    assert len(after) == 2 * steps_per_epoch  # epochs 3 and 4 only
    assert (resumed.val, resumed.test) == (whole.val, whole.test)
    assert all(torch.equal(v, state[k]) for k, v in whole_state.items())

    path.unlink()
    before: list[int] = []
    with pytest.raises(Interrupted):
        run(path, signal_at=steps_per_epoch + 5, steps=before)
    after = []
    resumed, state = run(path, steps=after)
    assert len(after) == 4 * steps_per_epoch - (steps_per_epoch + 5)  # the rest, not all again
    assert (resumed.val, resumed.test) == (whole.val, whole.test)
    assert all(torch.equal(v, state[k]) for k, v in whole_state.items())


BAD = {
    "unknown method option": ({"method": "td", "mesage_dim": 8}, ["'mesage_dim'", "message_dim"]),
    "unknown method": ({"method": "tdd"}, ["'tdd'", "logit-kd", "td"]),
    "unknown layer": ({"method": "td", "student_layers": ("1", "9")}, ["'9'"]),
    "no layers for a method that reads states": ({"method": "fitnet", "student_layers": None},
                                                 ["student_layers", "(l, h)"]),
    "device that does not exist": ({"device": "cuda:3"}, ["'cuda:3'"]),
    "unknown device": ({"device": "gpu"}, ["'gpu'", "auto, cpu, cuda, cuda:N"]),
    "fp16 on the CPU": ({"mixed_precision": "fp16"}, ["'fp16'", "no, bf16"]),
    "unknown precision": ({"mixed_precision": "fp8"}, ["mixed_precision", "'fp8'"]),
    "regression task on class logits": ({"task": "regression"}, ["regression", "(32, 2)", "classification"]),
    "unknown task": ({"task": "ranking"}, ["'ranking'", "classification, regression"]),
    "unknown metric": ({"metric": "f1"}, ["'f1'", "accuracy, rmse"]),
    "unknown cache": ({"cache_teacher": "ram"}, ["'ram'", "'memory', 'disk'"]),
    "classification with real-valued targets": ({"targets": "float"}, ["classification", "float32"]),
    "class targets beyond the outputs": ({"targets": "seven"}, ["0..1", "7"]),
    "a batch of one tensor": ({"batches": "inputs only"}, ["(inputs..., target)", "1 item"]),
    "a dict batch without labels": ({"batches": "dict"}, ["'labels'", "features"]),
    "a one-shot iterator": ({"batches": "iterator"}, ["re-iterable", "generator"]),
    "inputs and targets of different lengths": ({"batches": "short targets"},
                                                ["input 0 has 32 rows", "targets have 30"]),
    "inputs that do not fit the student": ({"batches": "7 features"}, ["cannot run", "Sequential"]),
    "an unknown training option": ({"train_options": {"patiense": 3}}, ["'patiense'", "patience"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_error_before_the_teacher_runs(task, case, tmp_path):
    x, y, teacher = task
    change, names = BAD[case]
    change = dict(change)
    frozen = mlp(64)
    frozen.load_state_dict(teacher.state_dict())
    calls = counting(frozen)
    targets = {"float": y.float(), "seven": y * 7}.get(change.pop("targets", None), y)
    train, val, _ = loaders(x, targets)
    batches = change.pop("batches", None)
    if batches == "inputs only":
        train = DataLoader(TensorDataset(x[:400]), batch_size=32)
    elif batches == "dict":
        train = [{"features": x[:32], "target": y[:32]}]
    elif batches == "short targets":
        train = [(x[:32], y[:30])]
    elif batches == "iterator":
        train = (b for b in train)
    elif batches == "7 features":
        train = DataLoader(TensorDataset(x[:400, :7], y[:400]), batch_size=32)
    with pytest.raises(UserError) as error:
        distill(student(), frozen, train, val, **{"method": "td", **LAYERS, "progress": False,
                                                  "out": tmp_path / "out", **change})
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert not calls  # found before any teacher computation
    assert not (tmp_path / "out").exists()  # and before anything is written


def test_a_layer_missing_from_a_hugging_face_teacher_names_the_nearest(tokens):
    ids, mask, labels, teacher = tokens
    rows = [{"input_ids": i, "attention_mask": m, "labels": t}
            for i, m, t in zip(ids, mask, labels, strict=True)]
    with pytest.raises(UserError, match=r"unknown layer 'bert.encoder.layers.1' in BertForSequence"
                                        r"Classification; nearest valid names: .*bert.encoder.layer.1"):
        distill(TokenStudent(), teacher, DataLoader(rows, batch_size=8), DataLoader(rows, batch_size=8),
                student_layers=("mix1", "mix2"),
                teacher_layers=("bert.encoder.layer.0", "bert.encoder.layers.1"), **QUIET)


def test_a_split_checks_its_rows_and_takes_a_bare_tensor():
    x, y = torch.randn(10, 3), torch.zeros(10)
    with pytest.raises(UserError, match="input 0 has 9 rows but the target has 10"):
        Split((x[:9],), y)
    assert Split(x, y).student_inputs[0] is x  # Split(x, y) means Split((x,), y)


def test_tasks_and_the_analysis_do_not_import_the_methods_nor_the_report_the_tasks():
    code = ("import sys, talkingmodels.tasks, talkingmodels.analysis, talkingmodels.report, "
            "talkingmodels.engine, talkingmodels.data\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('talkingmodels.methods'))\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
    # and the report reads the store alone: no task module either
    code = ("import sys, talkingmodels.report\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('talkingmodels.tasks', "
            "'talkingmodels.methods')))\nassert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_library_and_saving_a_student_import_none_of_the_bench_extra():
    """`pip install talkingmodels` has no pandas, matplotlib or scipy: distill, Result.save and
    load_student (which reach export's weights writer) must not import them."""
    code = ("import sys, talkingmodels.api, talkingmodels.export, talkingmodels.checkpoint, "
            "talkingmodels.inference, talkingmodels.splits\n"
            "loaded = sorted(m for m in ('pandas', 'matplotlib', 'scipy') if m in sys.modules)\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_distill_on_cuda(task, precision):
    x, y, teacher = task
    frozen = mlp(64)
    frozen.load_state_dict(teacher.state_dict())
    result = distill(student(), frozen, *loaders(x, y), method="td", epochs=6, lr=1e-2,
                     device="cuda", mixed_precision=precision, **LAYERS, progress=False)
    assert next(result.student.parameters()).device.type == "cuda"
    assert result.val > 0.8


@cuda
def test_first_step_losses_on_cuda_match_the_cpu(task):
    from talkingmodels.data import to_batch

    x, y, teacher = task
    terms = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(3)
        method = METHODS["td"](ModelPair(mlp(16), teacher, ("1", "3"), ("1", "3"), "classification",
                                         nn.functional.cross_entropy), METHODS["td"].Config())
        batch = to_batch((x[:64], y[:64]))
        method.setup(batch)
        method.to(device)
        terms[device] = {k: float(v) for k, v in method.forward_train(batch.to(device))[1].items()}
    for name, value in terms["cpu"].items():
        assert terms["cuda"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
