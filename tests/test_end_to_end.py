"""A tiny TD run through the engine really learns, and is reproducible bit for bit."""

from __future__ import annotations

import pytest
import torch

from talkingmodels import runner
from talkingmodels.engine import TrainConfig, fit
from talkingmodels.inference import evaluate
from talkingmodels.methods import METHODS
from talkingmodels.tasks.movielens import MovieLens

TRAIN = TrainConfig(epochs=8, batch_size=64, lr=1e-2, patience=8)


def run(prepared, name: str, seed: int, train: TrainConfig = TRAIN, **options):
    cls = METHODS[name]
    method = runner.build_method(prepared, cls, cls.Config(**options), seed)
    result = fit(method, prepared.splits, MovieLens.metric, train, seed)
    return method, result


@pytest.fixture(scope="module")
def td_runs(dense):
    return run(dense, "td", seed=3), run(dense, "td", seed=3)


def test_td_beats_the_mean_rating(dense, td_runs):
    (method, result), _ = td_runs
    train_mean = dense.splits.train.target.mean()
    mean_rmse = float((dense.splits.test.target - train_mean).pow(2).mean().sqrt())
    assert result.test < 0.95 * mean_rmse, (result.test, mean_rmse)
    # the reported numbers are those of the student the method is left holding
    assert result.test == evaluate(method.student, dense.splits.test, MovieLens.metric)
    assert result.val == evaluate(method.student, dense.splits.val, MovieLens.metric)
    assert result.val == min(row["val_rmse"] for row in result.history)
    assert result.history[result.best_epoch - 1]["val_rmse"] == result.val
    assert {"loss_task", "loss_kd", "loss_interact", "loss_mc", "loss_sc"} <= set(result.history[0])
    # training lowered the task loss
    assert result.history[-1]["loss_task"] < result.history[0]["loss_task"]


def test_same_seed_same_result(td_runs):
    (first, a), (second, b) = td_runs
    assert a.test == b.test and a.val == b.val and a.best_epoch == b.best_epoch
    assert a.history == b.history
    sa, sb = first.student.state_dict(), second.student.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_another_seed_another_result(dense, td_runs):
    (_, a), _ = td_runs
    _, c = run(dense, "td", seed=4, train=TRAIN.model_copy(update={"epochs": 2}))
    assert c.history[0] != a.history[0]


def test_early_stopping_and_stages(dense):
    # fitnet: one hint epoch (no model selection), then the main stage
    _, result = run(dense, "fitnet", seed=0, train=TRAIN.model_copy(update={"epochs": 2}),
                    hint_epochs=1)
    assert [row["stage"] for row in result.history] == ["hint", "main", "main"]
    assert result.best_epoch in (2, 3)
    assert "loss_hint" in result.history[0] and "loss_hint" not in result.history[1]
    # patience 1 with a learning rate that is far too high: training stops early
    _, result = run(dense, "scratch", seed=0,
                    train=TrainConfig(epochs=30, batch_size=64, lr=3.0, patience=1))
    assert result.epochs < 30 and result.epochs == len(result.history)
    assert result.epochs - result.best_epoch == 1
