"""MovieLens-100K rating prediction (the paper's recommendation experiment).

Teacher: a larger MLP recommender pre-trained on the training ratings of *all* genres,
cached on disk by its config. Student: a small MLP recommender trained only on the
training ratings of one genre (``dense`` = Drama, ``sparse`` = Western, ``rare`` =
Documentary with 758 ratings, or any genre by
name), selected on that genre's validation ratings; metric: that genre's test RMSE.
One seeded 80/10/10 split of all ratings is shared by the teacher and every student.
"""

from __future__ import annotations

import hashlib
import io
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from talkingmodels import losses
from talkingmodels.engine import RUNTIME_FIELDS, Supervised, TrainConfig, fit, seed_everything
from talkingmodels.errors import UserError
from talkingmodels.inference import evaluate
from talkingmodels.io import atomic_save
from talkingmodels.splits import Split, Splits
from talkingmodels.tasks.base import (
    Prepared,
    Task,
    TaskConfig,
    config_key,
    search_data,
)
from talkingmodels.tasks.registry import register

URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ZIP_MD5 = "0e33842e24a9c977be4e0107933c0723"
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
# rare: the genre with the fewest ratings (758: about 600 to train on; the little-data setting)
ALIASES = {"dense": "Drama", "sparse": "Western", "rare": "Documentary"}


class RecMLP(nn.Module):
    """User and item embeddings, concatenated, through ``mlp`` (blocks of Linear, ReLU,
    Dropout, so the ReLU of hidden layer ``k`` is ``mlp.{3k+1}``), then a linear ``head``
    plus the global mean rating."""

    def __init__(self, n_users: int, n_items: int, embedding: int, hidden: list[int],
                 dropout: float = 0.0, mean: float = 3.5):
        super().__init__()
        self.users = nn.Embedding(n_users, embedding)
        self.items = nn.Embedding(n_items, embedding)
        layers, width = [], 2 * embedding
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        self.register_buffer("mean", torch.tensor(float(mean)))
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``users``, ``items`` (batch,) int64 -> predicted ratings (batch,)."""
        x = torch.cat([self.users(users), self.items(items)], dim=-1)
        return self.head(self.mlp(x)).squeeze(-1) + self.mean


def relu_name(layer: int) -> str:
    """Module name of the ReLU after hidden layer ``layer`` (0-based) of a RecMLP."""
    return f"mlp.{3 * layer + 1}"


class RecommenderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embedding: int = Field(ge=1)
    hidden: list[PositiveInt] = Field(min_length=2)
    dropout: float = Field(0.0, ge=0, lt=1)

    def layers(self) -> tuple[str, str]:
        """Taps: the first and the last hidden layer."""
        return relu_name(0), relu_name(len(self.hidden) - 1)


class MovieLensConfig(TaskConfig):
    split_seed: int = 0
    download: bool = True
    teacher: RecommenderSpec = RecommenderSpec(embedding=64, hidden=[256, 128, 64], dropout=0.5)
    # A strong, regularised teacher: without dropout and weight decay it ends up worse
    # on Drama than a student trained from scratch (see docs/method.md).
    teacher_train: TrainConfig = TrainConfig(epochs=40, batch_size=512, lr=1e-3, weight_decay=0.5,
                                             optimizer="adamw", patience=4)
    student: RecommenderSpec = RecommenderSpec(embedding=8, hidden=[32, 16])
    student_layers: tuple[str, str] | None = None  # default: first and last hidden ReLU
    teacher_layers: tuple[str, str] | None = None


# ------------------------------------------------------------------------------ data
def _has_files(directory: Path) -> bool:
    return (directory / "u.data").is_file() and (directory / "u.item").is_file()


def find_data(config: MovieLensConfig, cache: Path) -> Path:
    """Where the MovieLens-100K files are: ``data_dir``, ``$TALKINGMODELS_DATA``, the user
    cache (each either holding the files or an ``ml-100k/`` folder), else a download."""
    found, looked = search_data(config.data_dir, [cache / "data"], "ml-100k",
                                lambda folder: folder if _has_files(folder) else None,
                                "u.data and u.item (MovieLens-100K)")
    if found is not None:
        return found
    if not config.download:
        raise UserError(f"MovieLens-100K not found (looked in {looked}); put u.data and u.item "
                        f"from {URL} into one of those directories")
    try:
        return download(cache / "data")
    except (OSError, ValueError) as exc:
        raise UserError(f"MovieLens-100K not found (looked in {looked}) and the download from "
                        f"{URL} failed ({exc}); put u.data and u.item into one of those "
                        "directories") from None


def download(target: Path) -> Path:
    """Fetch the official GroupLens archive, check its MD5, unpack ``ml-100k/``."""
    print(f"downloading {URL}", file=sys.stderr)
    with urllib.request.urlopen(URL, timeout=30) as response:
        content = response.read()
    if hashlib.md5(content).hexdigest() != ZIP_MD5:
        raise ValueError("checksum mismatch")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        archive.extractall(target)
    return target / "ml-100k"


def read_ratings(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """``u.data`` as an (n, 3) int array of 0-based user, 0-based item, rating, and
    ``u.item``'s genre flags as an (items, 19) bool array."""
    def malformed(what: str) -> UserError:
        return UserError(f"malformed MovieLens files in {directory}: {what}")

    try:
        ratings = np.loadtxt(directory / "u.data", dtype=np.int64, usecols=(0, 1, 2), ndmin=2)
    except (ValueError, IndexError, OSError) as exc:
        raise malformed(f"u.data: {exc}") from None
    try:
        with open(directory / "u.item", encoding="latin-1") as handle:
            rows = [line.rstrip("\n").split("|") for line in handle if line.strip()]
        genres = np.array([[flag == "1" for flag in row[-len(GENRES):]] for row in rows])
        ids = np.array([int(row[0]) for row in rows])
    except (ValueError, IndexError, OSError) as exc:
        raise malformed(f"u.item: {exc}") from None
    if genres.ndim != 2 or genres.shape[1] != len(GENRES) or len(ids) == 0:
        raise malformed(f"u.item needs {len(GENRES)} genre flags at the end of every line")
    bad = ratings[(ratings[:, 2] < 1) | (ratings[:, 2] > 5)]
    if len(bad):
        raise malformed(f"u.data has rating {bad[0, 2]} (ratings are 1..5)")
    unlisted = ratings[(ratings[:, 1] < 1) | (ratings[:, 1] > ids.max()) | (ratings[:, 0] < 1)]
    if len(unlisted):
        raise malformed(f"u.data names user {unlisted[0, 0]} and item {unlisted[0, 1]}, but ids "
                        f"start at 1 and u.item lists items up to {ids.max()}")
    flags = np.zeros((ids.max() + 1, len(GENRES)), dtype=bool)
    flags[ids] = genres
    ratings[:, :2] -= 1
    return ratings, flags[1:]


# ------------------------------------------------------------------------------ task
@register("movielens")
class MovieLens(Task):
    Config = MovieLensConfig
    metric = losses.RMSE
    output = "regression"
    default_settings = ("dense", "sparse")
    research_settings = ("rare",)  # little data: the genre with the fewest ratings
    tiny_models = True  # MLPs of a few thousand weights: one thread each, a run per core
    default_train = {"epochs": 200, "batch_size": 256, "lr": 1e-3, "patience": 10}
    # The relational baselines' full cost is hundreds of times a step of this tiny student
    # (rkd's n^3 triplets, crd's 256 x 4096 gathered bank rows): their cheaper variants.
    method_options = {"rkd": {"angle_examples": 64}, "crd": {"shared_negatives": True, "nce_k": 1024}}

    def __init__(self, config: MovieLensConfig):
        super().__init__(config)
        self._data = None
        self._teacher = None

    def settings(self) -> list[str]:
        return [*ALIASES, *GENRES]

    def data(self):
        if self._data is None:
            directory = find_data(self.config, self.cache_dir())
            ratings, genres = read_ratings(directory)
            order = np.random.default_rng(self.config.split_seed).permutation(len(ratings))
            n_train, n_val = int(0.8 * len(ratings)), int(0.9 * len(ratings))
            parts = {"train": order[:n_train], "val": order[n_train:n_val], "test": order[n_val:]}
            digest = hashlib.md5(ratings.tobytes()).hexdigest()
            self._data = ratings, genres, parts, digest
        return self._data

    @staticmethod
    def _split(ratings: np.ndarray, rows: np.ndarray) -> Split:
        r = torch.from_numpy(ratings[rows])
        return Split((r[:, 0].contiguous(), r[:, 1].contiguous()), r[:, 2].float())

    def _splits(self, keep: np.ndarray) -> Splits:
        ratings, _, parts, _ = self.data()
        return Splits(*(self._split(ratings, rows[keep[rows]]) for rows in parts.values()))

    def _model(self, spec: RecommenderSpec, mean: float) -> RecMLP:
        ratings, genres, _, _ = self.data()
        return RecMLP(int(ratings[:, 0].max()) + 1, len(genres), spec.embedding, spec.hidden,
                      spec.dropout, mean)

    def teacher(self) -> nn.Module:
        """The pre-trained teacher: loaded from the cache, or trained on all genres once."""
        if self._teacher is not None:
            return self._teacher
        cfg = self.config
        _, _, _, digest = self.data()
        key = config_key("movielens-teacher", cfg.teacher.model_dump(),
                         cfg.teacher_train.model_dump(exclude=RUNTIME_FIELDS), cfg.split_seed, digest)
        path = self.cache_dir() / "teachers" / f"movielens-{key}.pt"
        ratings = self.data()[0]
        splits = self._splits(np.ones(len(ratings), dtype=bool))
        model = self._model(cfg.teacher, float(splits.train.target.mean()))
        state = None
        if path.is_file():
            try:
                state = torch.load(path, weights_only=True)
                model.load_state_dict(state)
            except Exception as exc:  # a corrupt cache file is rebuilt, never used
                print(f"teacher cache {path} is unreadable ({exc}); retraining", file=sys.stderr)
                state = None
        if state is None:
            print("pre-training the MovieLens teacher on all genres (cached afterwards)",
                  file=sys.stderr)
            seed_everything(cfg.split_seed)
            model = self._model(cfg.teacher, float(splits.train.target.mean()))
            fit(Supervised(model, losses.mse), splits, self.metric, cfg.teacher_train,
                seed=cfg.split_seed)
            atomic_save(model.state_dict(), path)
        model.zero_grad(set_to_none=True)
        model.eval().requires_grad_(False)
        self._teacher = model
        return model

    def prepare(self, setting: str) -> Prepared:
        setting = self.check_setting(setting)
        genre = ALIASES.get(setting, setting)
        ratings, genres, _, _ = self.data()
        in_genre = genres[ratings[:, 1], GENRES.index(genre)]
        if in_genre.sum() == 0:
            raise UserError(f"genre {genre!r} has no ratings in this data set")
        splits = self._splits(in_genre)
        if min(len(splits.train), len(splits.val), len(splits.test)) == 0:
            raise UserError(f"genre {genre!r} has too few ratings for a train/val/test split")
        teacher = self.teacher()
        cfg = self.config
        mean = float(splits.train.target.mean())
        return Prepared(
            setting=setting,
            splits=splits,
            teacher=teacher,
            teacher_metric=evaluate(teacher, splits.test, self.metric),
            build_student=lambda: self._model(cfg.student, mean),
            student_layers=tuple(cfg.student_layers or cfg.student.layers()),
            teacher_layers=tuple(cfg.teacher_layers or cfg.teacher.layers()),
            task_loss=losses.mse,
            output=self.output,
        )
