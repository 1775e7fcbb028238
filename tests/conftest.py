"""Shared fixtures: a tiny generated MovieLens-100K look-alike and a pre-trained teacher on it.

The data set has the real files' formats (``u.data`` tab-separated ``user item rating
timestamp`` with 1-based ids; ``u.item`` pipe-separated latin-1, five leading fields, then
19 genre flags) and a learnable structure, so a student trained on it must beat the mean.
The teacher is trained once per test session and cached in a session directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from talkingmodels.tasks.movielens import GENRES, MovieLens, MovieLensConfig

N_USERS, N_ITEMS, N_RATINGS = 60, 80, 3000
DRAMA, WESTERN, COMEDY = GENRES.index("Drama"), GENRES.index("Western"), GENRES.index("Comedy")

# A small teacher so that pre-training it takes about a second.
TEACHER = {"embedding": 8, "hidden": [32, 16, 8], "dropout": 0.1}
TEACHER_TRAIN = {"epochs": 6, "batch_size": 128, "lr": 5e-3, "weight_decay": 0.01,
                 "optimizer": "adamw", "patience": 3}
STUDENT = {"embedding": 4, "hidden": [16, 8]}

# The models are tiny: one thread is faster than two and does not fight other processes.
torch.set_num_threads(1)


def write_movielens(directory: Path, seed: int = 0) -> Path:
    """Write ``u.data`` and ``u.item`` with
    ``rating = clip(round(3 + user_bias + item_bias + dot(u, v)), 1, 5)``."""
    rng = np.random.default_rng(seed)
    user_bias = rng.normal(0, 0.6, N_USERS)
    item_bias = rng.normal(0, 0.6, N_ITEMS)
    u = rng.normal(0, 0.8, (N_USERS, 3))
    v = rng.normal(0, 0.8, (N_ITEMS, 3))
    pairs = rng.choice(N_USERS * N_ITEMS, size=N_RATINGS, replace=False)
    users, items = pairs // N_ITEMS, pairs % N_ITEMS
    ratings = np.clip(np.rint(3 + user_bias[users] + item_bias[items]
                              + (u[users] * v[items]).sum(1)), 1, 5).astype(int)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "u.data", "w") as handle:
        for user, item, rating in zip(users, items, ratings, strict=True):
            handle.write(f"{user + 1}\t{item + 1}\t{rating}\t{880000000 + int(rng.integers(10**6))}\n")
    # Items 1-40 are Drama, 61-80 Western, every third one also Comedy; a latin-1 title
    # checks the encoding.
    with open(directory / "u.item", "w", encoding="latin-1") as handle:
        for item in range(N_ITEMS):
            flags = ["0"] * len(GENRES)
            if item < 40:
                flags[DRAMA] = "1"
            if item >= 60:
                flags[WESTERN] = "1"
            if item % 3 == 0:
                flags[COMEDY] = "1"
            if not any(flag == "1" for flag in flags):
                flags[0] = "1"
            title = f"Film {item + 1} (199{item % 10})" + (" Amélie" if item == 5 else "")
            fields = [str(item + 1), title, "01-Jan-1995", "", f"http://example.org/{item + 1}"]
            handle.write("|".join(fields + flags) + "\n")
    return directory


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch, tmp_path_factory):
    """Tests never read the real data set or write to the user's cache by accident."""
    monkeypatch.delenv("TALKINGMODELS_DATA", raising=False)
    monkeypatch.setenv("TALKINGMODELS_CACHE", str(tmp_path_factory.getbasetemp() / "user-cache"))


@pytest.fixture(scope="session")
def ml_dir(tmp_path_factory) -> Path:
    """A tiny ml-100k-format directory."""
    return write_movielens(tmp_path_factory.mktemp("ml-100k"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The session's teacher cache (shared so the fixture teacher is trained once)."""
    return tmp_path_factory.mktemp("cache")


def movielens(options: dict) -> MovieLens:
    return MovieLens(MovieLensConfig.model_validate(options))


@pytest.fixture(scope="session")
def fresh_dense(ml_dir, cache_dir):
    """The prepared ``dense`` (Drama) setting whose teacher is pre-trained here, into the
    session's empty cache: the first thing that uses the cache."""
    assert not any(cache_dir.iterdir())
    return movielens(_options(ml_dir, cache_dir)).prepare("dense")


def _options(ml_dir: Path, cache_dir: Path) -> dict:
    return {"data_dir": str(ml_dir), "cache_dir": str(cache_dir), "download": False,
            "teacher": TEACHER, "teacher_train": TEACHER_TRAIN, "student": STUDENT}


@pytest.fixture(scope="session")
def task_options(ml_dir, cache_dir, fresh_dense) -> dict:
    """MovieLens ``task_options`` for the fixture data (as a YAML config would hold them);
    the fixture teacher is in the cache they name."""
    return _options(ml_dir, cache_dir)


@pytest.fixture(scope="session")
def task(task_options) -> MovieLens:
    """The fixture task; it loads the teacher from the cache."""
    return movielens(task_options)


@pytest.fixture(scope="session")
def dense(task):
    """The prepared ``dense`` setting with the fixture teacher loaded from the cache (the
    usual case once a teacher exists). Shared by many tests: never modify its teacher or splits."""
    return task.prepare("dense")


def train_one_epoch(prepared, name: str, metric, batch_size: int):
    """Train method ``name`` for one epoch on a prepared setting: (its result, whether the
    frozen teacher's weights stayed exactly the same, whether every weight matrix of the
    student moved)."""
    from talkingmodels.engine import TrainConfig, fit
    from talkingmodels.methods import METHODS
    from talkingmodels.methods.base import supports
    from talkingmodels.runner import build_method

    if name.startswith("test-"):
        pytest.skip("registered by another test")
    cls = METHODS[name]
    if not supports(cls, prepared.output):
        pytest.skip(f"{name} does not apply to {prepared.output} outputs")
    method = build_method(prepared, cls, cls.Config(), seed=0)
    before = {k: v.clone() for k, v in prepared.teacher.state_dict().items()}
    initial = {k: v.clone() for k, v in method.student.named_parameters() if v.dim() > 1}
    result = fit(method, prepared.splits, metric, TrainConfig(epochs=1, batch_size=batch_size), seed=0)
    after, trained = prepared.teacher.state_dict(), dict(method.student.named_parameters())
    moved = all(not torch.equal(v, trained[k]) for k, v in initial.items())
    return result, all(torch.equal(v, after[k]) for k, v in before.items()), moved


@pytest.fixture
def probe_fits(monkeypatch) -> list[tuple]:
    """Every call of the frozen teacher's probe fit: (train features, train labels, val
    features, val labels)."""
    from talkingmodels import frozen

    calls = []
    fit = frozen.fit_probe

    def recorded(train, train_y, val, val_y, classes=10):
        calls.append((train, train_y, val, val_y))
        return fit(train, train_y, val, val_y, classes=classes)

    monkeypatch.setattr(frozen, "fit_probe", recorded)
    return calls
