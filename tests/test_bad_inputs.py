"""The bad-input catalog: every user mistake gives one ``error:`` line naming the bad value
(and the valid choices where there are some), exit code 2, no traceback, and leaves every
folder it could write to byte for byte as it was (the runs store with its results, students,
checkpoints and report; the file or folder a case points ``--out`` or ``--tensorboard`` at).

Each case is a function ``(config, tmp_path, store) -> (argv, names)``: it may change the
valid experiment ``config`` or add files to ``store`` (a finished runs store) before the
command ``argv`` runs; ``names`` must all appear in the error line.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from talkingmodels import cli


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def finished_store(task_options, tmp_path_factory) -> Path:
    """A runs store with one finished run (results row, curves, student, report) and the
    checkpoint of an unrelated interrupted run."""
    folder = tmp_path_factory.mktemp("store")
    config = write(folder / "done.yaml", {
        "task": "movielens", "settings": ["dense"], "seeds": 1, "methods": [{"name": "scratch"}],
        "train": {"epochs": 1}, "task_options": task_options})
    assert cli.main(["run", str(config), "--out", str(folder / "out")]) == 0
    (folder / "out" / "checkpoints").mkdir(exist_ok=True)
    (folder / "out" / "checkpoints" / "sparse__other__3.pt").write_bytes(b"not in this grid")
    return folder / "out"


@pytest.fixture
def config(task_options) -> dict:
    return {"task": "movielens", "settings": ["dense"], "seeds": 1,
            "methods": [{"name": "scratch"}, {"name": "td"}],
            "train": {"epochs": 2, "batch_size": 64}, "task_options": copy.deepcopy(task_options)}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the cases
def run_with(change=None, extra=(), names=()):
    """A case running ``talkingmodels run`` on the config after ``change(config, tmp_path)``
    (which returns the names the message must hold, else ``names``)."""
    def case(config, tmp_path, store):
        named = change(config, tmp_path) if change else list(names)
        return ["run", write(tmp_path / "exp.yaml", config), "--out", store, *extra], named
    return case


def setting(path: str, value, *names: str):
    """Set the value at a dotted path of the config (list indices as numbers)."""
    def change(config, _tmp_path):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
        return list(names)
    return run_with(change)


def config_text(text: str, *names: str):
    def case(_config, tmp_path, store):
        return ["run", write(tmp_path / "exp.yaml", text), "--out", store], list(names)
    return case


def data_files(u_data: str | None, u_item: str | None, *names: str):
    """MovieLens files of the user's own, some malformed."""
    def change(config, tmp_path):
        folder = tmp_path / "ml"
        shutil.copytree(config["task_options"]["data_dir"], folder)
        for name, text in (("u.data", u_data), ("u.item", u_item)):
            if text is not None:
                (folder / name).write_text(text)
        config["task_options"]["data_dir"] = str(folder)
        return [*names, str(folder)]
    return run_with(change)


def missing_data(config, tmp_path):
    (tmp_path / "empty").mkdir()
    config["task_options"].update(data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"),
                                  download=False)
    return ["data_dir", str(tmp_path / "empty"), "does not hold u.data and u.item"]


def custom_task(**options):
    """A custom-task config with a teacher and student from torch and ``options`` over them."""
    def change(config, _tmp_path):
        named, linear = options.pop("_names"), {"in_features": 3, "out_features": 2}
        config.clear()
        config.update({"task": "custom", "seeds": 1, "methods": [{"name": "scratch"}],
                       "train": {"epochs": 1}, "task_options": {
                           "teacher": {"class": "torch.nn:Linear", "args": linear},
                           "student": {"class": "torch.nn:Linear", "args": linear},
                           "data": {"function": "builtins:tuple"}, **options}})
        return named
    return run_with(change)


def absent_data_dir(config, tmp_path):
    config["task_options"].update(data_dir=str(tmp_path / "absent"), cache_dir=str(tmp_path / "c"))
    return ["data_dir", str(tmp_path / "absent"), "does not exist"]


def out_is_a_file(config, tmp_path, store):
    (tmp_path / "file").write_text("x")
    return ["run", write(tmp_path / "exp.yaml", config), "--out", tmp_path / "file"], [
        "is a file", str(tmp_path / "file")]


def out_under_a_file(config, tmp_path, store):
    (tmp_path / "file").write_text("x")
    return ["run", write(tmp_path / "exp.yaml", config), "--out", tmp_path / "file" / "out"], [
        "cannot create output directory", str(tmp_path / "file" / "out")]


def tensorboard_is_a_file(config, tmp_path, store):
    (tmp_path / "tb").write_text("x")
    return ["run", write(tmp_path / "exp.yaml", config), "--out", store, "--tensorboard",
            tmp_path / "tb"], ["TensorBoard", "is a file", str(tmp_path / "tb")]


def checkpoint(name: str, content: bytes | dict):
    def case(config, tmp_path, store):
        path = store / "checkpoints" / name
        if isinstance(content, dict):
            torch.save(content, path)
        else:
            path.write_bytes(content)
        return None
    return case


def interrupted_without_resume(config, tmp_path, store):
    checkpoint("dense__td__0.pt", b"x")(config, tmp_path, store)
    return run_with()(config, tmp_path, store)[0], ["1 interrupted run", "dense__td__0.pt", "--resume",
                                                    "--force"]


def corrupt_checkpoint(config, tmp_path, store):
    checkpoint("dense__td__0.pt", b"\x80truncated")(config, tmp_path, store)
    return run_with(extra=["--resume"])(config, tmp_path, store)[0], [
        "dense__td__0.pt", "unreadable", "delete it"]


def checkpoint_of_other_settings(config, tmp_path, store):
    checkpoint("dense__td__0.pt", {"fingerprint": {"train": {"lr": 0.5}}})(config, tmp_path, store)
    return run_with(extra=["--resume"])(config, tmp_path, store)[0], [
        "dense__td__0.pt", "other settings", "train.", "--force"]


def argv(*words: str, names=()):
    def case(_config, _tmp_path, store):
        return [*words, "--out", store], list(names)
    return case


UDATA_OK = "1\t1\t5\t881250949\n2\t3\t3\t881250950\n"
CASES = {
    # config: keys, types, values
    "unknown top-level key": setting("epochs", 3, "'epochs'", "valid keys", "train"),
    "unknown train key": setting("train.epoch", 3, "'epoch'", "epochs"),
    "unknown task option": setting("task_options.data_dri", "x", "'data_dri'", "data_dir"),
    "unknown method option": setting("methods.1.roundz", 2, "'roundz'", "rounds"),
    "seeds not a number": setting("seeds", "five", "seeds", "'five'"),
    "negative seeds": setting("seeds", -1, "seeds", "-1"),
    "no seeds": setting("seeds", [], "seeds", "[]"),
    "epochs of the wrong type": setting("train.epochs", "ten", "epochs", "'ten'"),
    "zero epochs": setting("train.epochs", 0, "epochs", "0"),
    "negative batch size": setting("train.batch_size", -64, "batch_size", "-64"),
    "zero learning rate": setting("train.lr", 0, "lr", "0"),
    "unknown optimizer": setting("train.optimizer", "sgd", "optimizer", "'sgd'", "adam"),
    "negative rounds": setting("methods.1.rounds", -1, "rounds", "-1"),
    "message width 0": setting("methods.1.message_dim", 0, "message_dim", "0"),
    "unknown channel kind": setting("methods.1.channel", "mlp", "channel", "'mlp'", "linear"),
    "unknown stop_gradient": setting("methods.1.stop_gradient", ["questions"], "stop_gradient",
                                     "questions"),
    "unknown distance": setting("methods.1.distance", "l1", "distance", "'l1'", "mse"),
    "negative loss weight": setting("methods.1.w1", -1.0, "w1", "-1"),
    "teacher dropout above 1": setting("task_options.teacher.dropout", 1.5, "dropout", "1.5"),
    "student width 0": setting("task_options.student.hidden", [16, 0], "hidden", "0"),
    "student embedding 0": setting("task_options.student.embedding", 0, "embedding", "0"),
    "unknown method": setting("methods.1.name", "tdd", "'tdd'", "td", "scratch"),
    "unknown task": setting("task", "movielenz", "'movielenz'", "movielens"),
    "unknown setting": setting("settings", ["Drma"], "'Drma'", "dense", "Drama"),
    "unknown genre": setting("settings", ["dense", "Sci-fy"], "'Sci-fy'", "Sci-Fi"),
    "duplicate label": setting("methods.0.name", "td", "'td'", "label"),
    # config files
    "config that is not YAML": config_text("task: [movielens\nseeds: 1\n", "not valid YAML"),
    "config that is a YAML list": config_text("- task\n- movielens\n", "YAML mapping", "'task'"),
    "empty config": config_text("", "YAML mapping"),
    "missing config": lambda c, t, store: (["run", t / "nope.yaml", "--out", store],
                                           ["cannot read config", "nope.yaml"]),
    "config that is a folder": lambda c, t, store: (["run", t, "--out", store],
                                                    ["cannot read config", str(t)]),
    # layers
    "unknown student layer": setting("task_options.student_layers", ["mlp.1", "mlp.99"],
                                     "'mlp.99'", "mlp.1"),
    "unknown teacher layer": setting("task_options.teacher_layers", ["mlp.1", "mlp.44"],
                                     "'mlp.44'", "mlp.4"),
    "teacher layer l after h": setting("task_options.teacher_layers", ["mlp.4", "mlp.1"],
                                       "'mlp.4' must run before", "'mlp.1'"),
    # data
    "missing data": run_with(missing_data),
    "data_dir that does not exist": run_with(absent_data_dir),
    "method import path of a missing module": setting(
        "methods.1.name", "nowhere.mod:Thing", "'nowhere.mod:Thing'", "no module named 'nowhere'"),
    "method import path of a missing class": setting(
        "methods.1.name", "talkingmodels.losses:Nothing", "has no attribute 'Nothing'"),
    "method import path of something not a Distiller": setting(
        "methods.1.name", "talkingmodels.losses:mse", "not a talkingmodels.methods.Distiller"),
    "method that is not an import path": setting("methods.1.name", "td.py", "'td.py'", "valid methods"),
    "custom teacher class that does not exist": custom_task(
        teacher={"class": "torch.nn:Nope"}, _names=["teacher 'torch.nn:Nope'", "no attribute 'Nope'"]),
    "custom student that is not a model": custom_task(
        student={"class": "collections:OrderedDict"}, _names=["student", "not a torch nn.Module"]),
    "custom data function with a bad return": custom_task(
        _names=["data function 'builtins:tuple'", "must return (train, val, test)"]),
    "custom data function called with bad args": custom_task(
        data={"function": "builtins:len", "args": {"size": 3}}, _names=["'builtins:len'", "args"]),
    "custom task without data": custom_task(data={}, _names=["'function' or 'hf_dataset'"]),
    "unknown device": run_with(extra=("--device", "gpu"), names=("'gpu'", "auto, cpu, cuda, cuda:N")),
    "CUDA device that does not exist": run_with(extra=("--device", "cuda:3"), names=("'cuda:3'",)),
    "fp16 on the CPU": run_with(extra=("--device", "cpu", "--mixed-precision", "fp16"),
                                names=("'fp16'", "no, bf16")),
    "unknown device in the config": setting("train.device", "tpu", "'tpu'", "auto, cpu, cuda, cuda:N"),
    "u.data with text in a column": data_files("1\t1\tfive\t881250949\n", None, "malformed", "u.data"),
    "u.data with 2 columns": data_files("1\t1\n2\t3\n", None, "malformed", "u.data"),
    "u.item without genre flags": data_files(None, "1|Film|01-Jan-1995||http://x|0|1\n",
                                             "malformed", "u.item"),
    "u.data naming an unlisted item": data_files(UDATA_OK + "1\t999\t4\t881250951\n", None,
                                                 "item 999", "u.item"),
    "u.data with a rating of 9": data_files(UDATA_OK + "1\t2\t9\t881250951\n", None, "rating 9",
                                            "1..5"),
    # output folder and run state
    "output folder that is a file": out_is_a_file,
    "output folder under a file": out_under_a_file,
    "TensorBoard folder that is a file": tensorboard_is_a_file,
    "interrupted run without --resume": interrupted_without_resume,
    "corrupt checkpoint": corrupt_checkpoint,
    "checkpoint of other settings": checkpoint_of_other_settings,
    # bench
    "bench: unknown task": argv("bench", "movielenz", names=["'movielenz'", "movielens"]),
    "bench: unknown method": argv("bench", "movielens", "--methods", "scratch,tdd", names=["'tdd'", "td"]),
    "bench: unknown setting": argv("bench", "movielens", "--settings", "Drma", names=["'Drma'"]),
    "bench: zero seeds": argv("bench", "movielens", "--seeds", "0", names=["seeds", "0"]),
    "bench: zero epochs": argv("bench", "movielens", "--epochs", "0", names=["epochs", "0"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, config, finished_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(finished_store, store)
    argv, names = CASES[case](config, tmp_path, store)
    # everything the command could write to: the store, and whatever a case points --out,
    # --tensorboard or the config at (all under tmp_path), and the working directory's runs/
    before, runs = snapshot(tmp_path), snapshot(Path("runs")) if Path("runs").is_dir() else None
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    assert snapshot(tmp_path) == before
    assert (snapshot(Path("runs")) if Path("runs").is_dir() else None) == runs


def test_the_catalog_is_large_enough():
    assert len(CASES) >= 25
