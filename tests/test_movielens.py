"""The MovieLens task on the generated fixture: files, genre splits, the cached teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from talkingmodels import UserError
from talkingmodels.tasks.movielens import GENRES, MovieLens, MovieLensConfig, read_ratings

from .conftest import N_ITEMS, N_RATINGS, N_USERS


def pairs(split) -> set[tuple[int, int]]:
    users, items = split.student_inputs
    return set(zip(users.tolist(), items.tolist(), strict=True))


def test_read_ratings(ml_dir):
    ratings, genres = read_ratings(ml_dir)
    assert ratings.shape == (N_RATINGS, 3)
    assert ratings[:, 0].min() == 0 and ratings[:, 0].max() == N_USERS - 1  # 1-based ids -> 0-based
    assert ratings[:, 1].min() >= 0 and ratings[:, 1].max() <= N_ITEMS - 1
    assert set(np.unique(ratings[:, 2])) <= {1, 2, 3, 4, 5}
    assert genres.shape == (N_ITEMS, len(GENRES))
    drama, western = GENRES.index("Drama"), GENRES.index("Western")
    assert genres[:40, drama].all() and not genres[40:, drama].any()
    assert genres[60:, western].all() and not genres[:60, western].any()


def test_settings_select_their_genre(task, dense):
    assert task.check_setting("DENSE") == "dense"
    assert task.check_setting("western") == "Western"
    with pytest.raises(UserError, match="unknown movielens setting 'Drma'; valid settings: dense, "
                                        "sparse, rare"):
        task.check_setting("Drma")
    assert task.check_setting("rare") == "rare"  # Documentary: little data
    with pytest.raises(UserError, match="'dense-tiny'"):  # no tiny student for a recommender
        task.check_setting("dense-tiny")
    sparse = task.prepare("sparse")
    for prepared, items in ((dense, range(40)), (sparse, range(60, 80))):
        split_pairs = [pairs(s) for s in (prepared.splits.train, prepared.splits.val, prepared.splits.test)]
        assert all(p for p in split_pairs)
        assert {item for p in split_pairs for _, item in p} <= set(items)
        # train, validation and test are disjoint
        assert not (split_pairs[0] & split_pairs[1] or split_pairs[0] & split_pairs[2]
                    or split_pairs[1] & split_pairs[2])
    assert dense.student_layers == ("mlp.1", "mlp.4")
    assert dense.teacher_layers == ("mlp.1", "mlp.7")


def test_genre_without_ratings_is_a_user_error(task):
    with pytest.raises(UserError, match="genre 'Horror' has no ratings"):
        task.prepare("Horror")


def test_teacher_is_cached_frozen_and_better_than_the_mean(fresh_dense, dense, cache_dir):
    assert list((cache_dir / "teachers").glob("movielens-*.pt"))
    assert fresh_dense.teacher is not dense.teacher  # loaded again by another task object
    fresh, cached = fresh_dense.teacher.state_dict(), dense.teacher.state_dict()
    assert fresh.keys() == cached.keys() and all(torch.equal(fresh[k], cached[k]) for k in fresh)
    assert not dense.teacher.training
    assert not any(p.requires_grad for p in dense.teacher.parameters())
    test = dense.splits.test
    mean_rmse = float((test.target - dense.splits.train.target.mean()).pow(2).mean().sqrt())
    assert dense.teacher_metric < mean_rmse


def test_freshly_trained_teacher_has_no_gradients(fresh_dense):
    assert all(p.grad is None for p in fresh_dense.teacher.parameters())


def test_corrupt_teacher_cache_is_rebuilt(task_options, cache_dir, tmp_path, capsys):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    (path,) = (copy / "teachers").glob("movielens-*.pt")
    path.write_bytes(b"not a checkpoint")
    task = MovieLens(MovieLensConfig.model_validate({**task_options, "cache_dir": str(copy)}))
    teacher = task.teacher()
    assert "unreadable" in capsys.readouterr().err
    assert torch.load(path, weights_only=True).keys() == teacher.state_dict().keys()


def test_malformed_files_are_a_user_error(tmp_path, task_options):
    (tmp_path / "u.data").write_text("1\t2\n")  # two columns instead of four
    (tmp_path / "u.item").write_text("1|x|||u|0|0\n")
    options = {**task_options, "data_dir": str(tmp_path), "cache_dir": str(tmp_path / "c")}
    with pytest.raises(UserError, match="malformed MovieLens files"):
        MovieLens(MovieLensConfig.model_validate(options)).prepare("dense")


REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@pytest.mark.skipif(not (REAL_DATA / "u.data").is_file(), reason="no ../shared/data/ml-100k")
def test_reads_the_real_files():
    ratings, genres = read_ratings(REAL_DATA)
    assert ratings.shape == (100_000, 3)
    assert ratings[:, 0].max() + 1 == 943 and genres.shape == (1682, len(GENRES))
    assert genres[:, GENRES.index("Drama")].sum() > genres[:, GENRES.index("Western")].sum() > 0


def test_the_teacher_never_trains_on_a_students_held_out_rating(task_options, tmp_path, monkeypatch):
    """The teacher is fitted on the training part of the one 80/10/10 split of all ratings:
    none of its training ratings is in any genre's validation or test split (those are the
    same rows of the other two parts), and the held-out parts it is selected and scored on
    are exactly those parts."""
    from talkingmodels.tasks import movielens

    given = []
    fit = movielens.fit

    def recorded(method, splits, *args, **kwargs):
        given.append(splits)
        return fit(method, splits, *args, **kwargs)

    monkeypatch.setattr(movielens, "fit", recorded)
    task = MovieLens(MovieLensConfig.model_validate({**task_options, "cache_dir": str(tmp_path)}))
    task.teacher()
    (splits,) = given
    trained = pairs(splits.train)
    assert len(trained) == len(splits.train)  # one rating per (user, item)
    for setting in ("dense", "sparse", "Comedy"):
        prepared = task.prepare(setting)
        assert pairs(prepared.splits.train) <= trained
        for held in (prepared.splits.val, prepared.splits.test):
            assert not pairs(held) & trained
        assert pairs(prepared.splits.val) <= pairs(splits.val)
        assert pairs(prepared.splits.test) <= pairs(splits.test)
