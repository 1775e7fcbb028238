"""Checkpoints: a run stopped after any epoch and resumed ends exactly like the
uninterrupted run (same seed, CPU), and trains only the steps and epochs that were left
(a restart from scratch would end alike, so the counts are what prove the resume); a
corrupt checkpoint is reported, never used."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from talkingmodels import runner
from talkingmodels.engine import TrainConfig, fit
from talkingmodels.errors import UserError
from talkingmodels.methods import METHODS
from talkingmodels.tasks.movielens import MovieLens

TRAIN = TrainConfig(epochs=6, batch_size=64, lr=1e-2, patience=3)


class Killed(Exception):
    """Stands in for a process killed right after an epoch's checkpoint was written."""


class Counted:
    """What a run trained: its training steps (calls of ``forward_train``) and the epochs
    it finished (stage and epoch, in order)."""

    def __init__(self, method):
        self.steps, self.epochs = 0, []
        plain = method.forward_train

        def counted(batch):
            self.steps += 1
            return plain(batch)

        method.forward_train = counted


def run(prepared, name, checkpoint=None, kill_after=None, counts=None, **options):
    cls = METHODS[name]
    method = runner.build_method(prepared, cls, cls.Config(**options), seed=7)
    counted = Counted(method)

    def on_epoch(row):
        counted.epochs.append((row.get("stage"), row["epoch"]))
        if row["epoch"] == kill_after:
            raise Killed

    try:
        result = fit(method, prepared.splits, MovieLens.metric, TRAIN, seed=7, on_epoch=on_epoch,
                     checkpoint=checkpoint)
    finally:
        if counts is not None:
            counts.append(counted)
    return method, result


def assert_same(a, b):
    (method_a, result_a), (method_b, result_b) = a, b
    assert (result_a.test, result_a.val, result_a.best_epoch, result_a.epochs) == \
        (result_b.test, result_b.val, result_b.best_epoch, result_b.epochs)
    assert result_a.history == result_b.history
    sa, sb = method_a.state_dict(), method_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,options,kill_after", [
    ("td", {}, 1), ("td", {}, 4), ("td", {"rounds": 2}, 2),
    ("td", {"interpreter": "random", "listen": "gate", "round_consistency": True}, 2),
    ("fitnet", {"hint_epochs": 2}, 1),  # inside the hint stage
    ("fitnet", {"hint_epochs": 2}, 2),  # at the boundary between the two stages
    ("hybrid", {}, 3),
])
def test_resumed_run_equals_uninterrupted(dense, tmp_path, name, options, kill_after):
    counts = []
    whole = run(dense, name, counts=counts, **options)
    path = tmp_path / "run.pt"
    with pytest.raises(Killed):
        run(dense, name, checkpoint=path, kill_after=kill_after, counts=counts, **options)
    assert path.exists()
    assert_same(whole, run(dense, name, checkpoint=path, counts=counts, **options))
    uninterrupted, before, after = counts
    # the resumed run trained only what was left: no step or epoch twice, none missing
    assert before.epochs[-1][1] == kill_after
    assert before.epochs + after.epochs == uninterrupted.epochs
    assert 0 < after.steps == uninterrupted.steps - before.steps


def test_checkpointing_does_not_change_the_run(dense, tmp_path):
    assert_same(run(dense, "td"), run(dense, "td", checkpoint=tmp_path / "run.pt"))


def test_corrupt_checkpoint_is_reported(dense, tmp_path):
    path = tmp_path / "run.pt"
    with pytest.raises(Killed):
        run(dense, "td", checkpoint=path, kill_after=1)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match="unreadable"):
        run(dense, "td", checkpoint=path)


def test_checkpoint_of_another_method_is_refused(dense, tmp_path):
    path = tmp_path / "run.pt"
    with pytest.raises(Killed):
        run(dense, "scratch", checkpoint=path, kill_after=1)
    with pytest.raises(UserError, match="another model or method"):
        run(dense, "td", checkpoint=path)


def test_numerical_fault_names_the_term_and_keeps_the_last_good_checkpoint(dense, tmp_path):
    from talkingmodels.engine import NumericalFault

    cls = METHODS["td"]
    method = runner.build_method(dense, cls, cls.Config(), seed=7)
    plain = method.forward_train
    calls = []

    def poisoned(batch):  # the 'interact' term turns NaN from the 3rd step of epoch 2 on
        prediction, terms = plain(batch)
        calls.append(1)
        if len(calls) > steps_per_epoch + 2:
            terms["interact"] = terms["interact"] * float("nan")
        return prediction, terms

    steps_per_epoch = -(-len(dense.splits.train) // TRAIN.batch_size)
    method.forward_train = poisoned
    path, saved = tmp_path / "run.pt", []
    with pytest.raises(NumericalFault, match=r"loss term 'interact' became non-finite at "
                                              r"step 3 of epoch 2 \(main stage\)"):
        fit(method, dense.splits, MovieLens.metric, TRAIN, 7, checkpoint=path,
            on_epoch=lambda row: saved.append(path.read_bytes()))
    assert len(saved) == 1 and path.read_bytes() == saved[0]  # epoch 1's checkpoint is kept


@pytest.mark.parametrize("signum,at_step", [(signal.SIGINT, 3), (signal.SIGTERM, 11)])
def test_signal_mid_epoch_saves_and_resumes_exactly(dense, tmp_path, signum, at_step):
    from talkingmodels.checkpoint import Interrupted

    counts = []
    whole = run(dense, "td", counts=counts)
    whole_steps = counts[0].steps
    cls = METHODS["td"]
    method = runner.build_method(dense, cls, cls.Config(), seed=7)
    plain, calls = method.forward_train, []

    def signalled(batch):
        calls.append(1)
        if len(calls) == at_step:  # the signal arrives in the middle of a step
            os.kill(os.getpid(), signum)
        return plain(batch)

    method.forward_train = signalled
    path = tmp_path / "run.pt"
    with pytest.raises(Interrupted, match="run the same command with --resume"):
        fit(method, dense.splits, MovieLens.metric, TRAIN, 7, checkpoint=path)
    paused = torch.load(path, weights_only=False)["partial"]
    assert paused["steps"] == at_step % -(-len(dense.splits.train) // TRAIN.batch_size)
    assert signal.getsignal(signum) is not None  # the previous handler is back
    counts = []
    assert_same(whole, run(dense, "td", checkpoint=path, counts=counts))
    # the steps before the signal (the interrupted one finished) are not trained again
    assert counts[0].steps == whole_steps - at_step
