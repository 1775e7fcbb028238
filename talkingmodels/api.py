"""One call to distil a teacher into a student: :func:`distill`, and :func:`load_student`.

The user brings two PyTorch (or Hugging Face) models and their data as DataLoaders, Hugging
Face datasets or :class:`~talkingmodels.splits.Split` s; layers are named by module path.
Everything is validated before any training or teacher computation where it can be: the
method and its options, the layer names, the device and precision, the batches' shape and
whether the student's output fits the task.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from talkingmodels import distributed, frozen, losses
from talkingmodels.config import validate
from talkingmodels.data import Batch, as_loader, iterate, teacher_cached
from talkingmodels.engine import TrainConfig, first_batch, fit, seed_everything
from talkingmodels.errors import UserError
from talkingmodels.inference import device_of, precompute_teacher
from talkingmodels.io import atomic_write_text
from talkingmodels.losses import Metric
from talkingmodels.splits import Split, Splits
from talkingmodels.states import TAILS, ModelPair, OutputKind, vocabulary

TASKS = losses.TASKS  # task name -> (loss, default metric): classification, regression, causal-lm
CACHES = (False, True, "memory", "disk")
WEIGHTS, META = "model.safetensors", "talkingmodels.json"


@dataclass
class Result:
    """What :func:`distill` returns: the student selected on validation (in eval mode) and
    its metrics; :meth:`save` writes it as a deployable folder."""

    student: nn.Module
    val: float
    test: float | None
    history: list[dict]
    method: str
    options: dict
    student_layers: tuple[str, str] | None
    teacher_layers: tuple[str, str] | None
    metric: str
    best_epoch: int
    epochs: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """The student's weights as ``model.safetensors`` and a ``talkingmodels.json``
        (method, options, layers, metrics, library version) in ``folder``."""
        from talkingmodels import __version__
        from talkingmodels.export import save_weights

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.student, folder / WEIGHTS)
        meta = {"library": "talkingmodels", "version": __version__, "method": self.method,
                "options": self.options, "student_layers": self.student_layers,
                "teacher_layers": self.teacher_layers, "student_class": type(self.student).__name__,
                "metric": self.metric, "val": self.val, "test": self.test,
                "best_epoch": self.best_epoch, "epochs": self.epochs}
        atomic_write_text(folder / META, json.dumps(meta, indent=2) + "\n")
        return folder


def load_student(folder: str | Path, model: nn.Module) -> nn.Module:
    """``model`` (the user's student architecture) with the weights :meth:`Result.save`
    wrote to ``folder``, in eval mode."""
    from talkingmodels.export import load_weights

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise UserError(f"no saved student in {folder} (expected {WEIGHTS} from Result.save)")
    try:
        return load_weights(model, path)
    except RuntimeError as exc:
        raise UserError(f"the student saved in {folder} does not fit {type(model).__name__}: "
                        f"{str(exc).splitlines()[0]}") from None


def _method_class(method):
    from talkingmodels.methods import Distiller, get_method

    if isinstance(method, type) and issubclass(method, Distiller):
        return method
    if not isinstance(method, str):
        raise UserError(f"method must be a method name or a Distiller subclass; got {method!r}")
    return get_method(method)


def _loss_name(task: Callable) -> str:
    return getattr(task, "__qualname__", None) or type(task).__name__


def _user_loss_metric(task: Callable) -> Metric:
    """The selection metric of a loss callable: its mean over the evaluation batches,
    weighted by their size (streamed: no split's predictions are held at once)."""
    def totals(prediction, target):
        return torch.stack([task(prediction, target).detach().float() * len(target),
                            torch.tensor(float(len(target)), device=prediction.device)])

    return Metric("loss", lambda p, t: task(p, t), False, totals, lambda sums: sums[0] / sums[1])


def _task(task, metric) -> tuple[Callable, Metric | None, OutputKind | None]:
    """(loss, metric, output kind); the kind is None for a loss callable (read off the data)."""
    if callable(task):
        loss, default, output = task, _user_loss_metric(task), None
    elif task in TASKS:
        (loss, default), output = TASKS[task], task
    else:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}, or a loss "
                        "callable (prediction, target) -> loss")
    if metric is None:
        return loss, default, output
    if isinstance(metric, Metric):
        return loss, metric, output
    if metric in losses.METRICS:
        return loss, losses.METRICS[metric], output
    raise UserError(f"unknown metric {metric!r}; valid metrics: {', '.join(losses.METRICS)}, or a "
                    "talkingmodels.losses.Metric(name, fn, higher_is_better)")


def _positions(model: nn.Module) -> int | None:
    """How many positions a Hugging Face model's config says it reads (None: not said)."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def _kind_of(prediction: torch.Tensor, target: torch.Tensor) -> OutputKind:
    """The output kind a prediction and its target look like (for a user's loss callable)."""
    integer = not (target.is_floating_point() or target.is_complex())
    if integer and prediction.dim() == 3 and target.shape == prediction.shape[:2]:
        return "causal-lm"
    if integer and prediction.dim() == 2 and target.shape == prediction.shape[:1]:
        return "classification"
    return "regression"


def _check_causal_lm(prediction: torch.Tensor, target: torch.Tensor, seen: str) -> None:
    integer = not (target.is_floating_point() or target.is_complex())
    if not (integer and prediction.dim() == 3 and target.shape == prediction.shape[:2]):
        raise UserError(f"task 'causal-lm' needs (batch, seq, vocabulary) logits and integer labels "
                        f"(batch, seq) with -100 where no token is predicted; {seen}")
    real = target[target != losses.IGNORE]
    if len(real) and (int(real.min()) < 0 or int(real.max()) >= prediction.shape[-1]):
        raise UserError(f"task 'causal-lm': labels must lie in 0..{prediction.shape[-1] - 1} (the "
                        f"student's vocabulary of {prediction.shape[-1]}) or be -100; found "
                        f"{int(real.min())}..{int(real.max())}")


@torch.no_grad()
def _check_output(student: nn.Module, batch: Batch, output: OutputKind | None,
                  loss: Callable | None = None) -> OutputKind:
    """The task's output kind, checked against what the student predicts on ``batch``
    (run in eval mode, so no BN statistic moves). A user's ``loss`` callable (``output``
    None) is called on that prediction instead: any shapes it accepts are valid."""
    from talkingmodels import taps

    target = batch.target
    positions = _positions(student)
    if output == "causal-lm" and positions is not None and target.dim() == 2 and target.shape[1] > positions:
        raise UserError(f"sequences of {target.shape[1]} tokens are longer than the student's "
                        f"{positions} positions (its config's max_position_embeddings); cut them "
                        f"to at most {positions} tokens")
    was_training = student.training
    student.eval()
    try:
        prediction = taps.prediction(batch.to(device_of(student)).run_student(student))
    except (TypeError, RuntimeError, IndexError) as exc:
        raise UserError(f"the student ({type(student).__name__}) cannot run on a batch of the "
                        f"data: {str(exc).splitlines()[0]}") from None
    finally:
        student.train(was_training)
    target = target.to(prediction.device)
    seen = (f"the student outputs {tuple(prediction.shape)}, the targets are {target.dtype} "
            f"{tuple(target.shape)}")
    integer = not (target.is_floating_point() or target.is_complex())
    if output is None:  # the user's own loss: it says what fits
        name = _loss_name(loss)
        try:
            value = loss(prediction, target)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code is theirs
            raise UserError(f"your loss (task={name}) failed on the first batch ({seen}): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()):
            raise UserError(f"your loss (task={name}) must return a scalar float tensor; on the first "
                            f"batch it returned {type(value).__name__}"
                            f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
        return _kind_of(prediction, target)
    if output == "causal-lm":
        _check_causal_lm(prediction, target, seen)
    elif output == "classification":
        if not (integer and prediction.dim() == 2 and target.shape == prediction.shape[:1]):
            hint = ("for next-token logits use task='causal-lm'" if prediction.dim() == 3
                    else "for real-valued targets use task='regression'")
            raise UserError(f"task 'classification' needs (batch, classes) logits and integer "
                            f"class targets (batch,); {seen}; {hint}")
        if len(target) and (int(target.min()) < 0 or int(target.max()) >= prediction.shape[1]):
            raise UserError(f"task 'classification': class targets must lie in 0..{prediction.shape[1] - 1} "
                            f"(the student's {prediction.shape[1]} outputs); found {int(target.min())}.."
                            f"{int(target.max())}")
    elif prediction.shape != target.shape or integer:
        raise UserError(f"task 'regression' needs one real-valued prediction per target, of the "
                        f"targets' shape; {seen}; for class logits use task='classification'")
    return output


def _full_cache_size(split: Split, teacher: nn.Module, student_vocab: int | None) -> int:
    """Bytes of a causal LM's full next-token logits (float32) over the split's tokens."""
    vocab = vocabulary(teacher) or student_vocab or 0
    tokens = int(split.lengths.sum()) if split.lengths is not None else (
        len(split) * int(split.target.shape[1]) if split.target.dim() == 2 else len(split))
    return tokens * vocab * 4


def _cached_split(data, teacher: nn.Module, layers, mode, out: Path | None, batch_size: int,
                  output: OutputKind = "classification", top_k: int | None = None,
                  tail: str = "renormalise", student_vocab: int | None = None) -> Split:
    """The training data as a Split with the frozen teacher's states at ``layers`` and its
    output computed once per example (in memory, or in a file on disk read memory-mapped).
    A loader's dataset is read once, in order: per-epoch random augmentation is then lost.
    A causal LM's output is kept as its ``top_k`` next tokens per position; its full
    logits (``top_k`` None) are cached only after their size is printed, and never past the
    free disk."""
    if isinstance(data, Split):
        split = data
    else:
        loader = data
        dataset = getattr(data, "dataset", None)
        if isinstance(dataset, torch.utils.data.Dataset) and not isinstance(
                dataset, torch.utils.data.IterableDataset):
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                 collate_fn=data.collate_fn)
        split = Split.from_batches(iterate(loader, batch_size))
    if teacher_cached(split, layers or ()):
        return split  # (a Split handed over with its teacher's states already)
    folder = None
    if mode == "disk":
        folder = out or Path(tempfile.mkdtemp(prefix="talkingmodels-"))
    if output == "causal-lm" and top_k is None:
        size = _full_cache_size(split, teacher, student_vocab)
        where = f"on disk in {folder}" if folder is not None else "in memory"
        print(f"caching the teacher's full next-token logits {where}: {size / 2**30:.2f} GiB "
              "(top_k=K keeps K tokens per position instead)", file=sys.stderr)
        if folder is not None:
            existing = next(p for p in (Path(folder), *Path(folder).absolute().parents) if p.exists())
            free = shutil.disk_usage(existing).free
            if size > free:
                raise UserError(f"a full-vocabulary teacher cache of {size / 2**30:.2f} GiB does not fit "
                                f"the {free / 2**30:.2f} GiB free in {folder}; pass top_k (e.g. 100) to "
                                "cache the teacher's top-k tokens, or cache_teacher=False")
    if mode == "disk":  # written batch by batch, read memory-mapped
        split.teacher_cache = frozen.write_teacher_cache(
            Path(folder) / "teacher_cache.safetensors", teacher, split, tuple(layers or ()), batch_size,
            top_k, tail)
    else:
        # (a causal LM's logits are tokens x vocabulary floats: in the training batches, not
        # in one pass over the split)
        precompute_teacher(teacher, split, tuple(layers or ()), batch_size if output == "causal-lm" else 8192,
                           top_k=top_k, tail=tail)
    return split


def _check_top_k(top_k, tail, cache_teacher, output: OutputKind, vocab: int | None) -> None:
    if tail not in TAILS:
        raise UserError(f"unknown top_k_tail {tail!r}; valid: {', '.join(TAILS)}")
    if top_k is None:
        return
    if not (isinstance(top_k, int) and top_k >= 1):
        raise UserError(f"top_k must be a whole number >= 1 (tokens kept per position); got {top_k!r}")
    if output != "causal-lm" or not cache_teacher:
        raise UserError("top_k applies to a cached causal-LM teacher: task='causal-lm' with "
                        "cache_teacher='memory' or 'disk'")
    if vocab is not None and top_k > vocab:
        raise UserError(f"top_k {top_k} is larger than the vocabulary of {vocab} tokens; valid: 1..{vocab}")


def distill(student: nn.Module, teacher: nn.Module, train, val, test=None, method="td",
            student_layers: tuple[str, str] | None = None,
            teacher_layers: tuple[str, str] | None = None,
            task: str | Callable = "classification", metric: str | Metric | None = None,
            epochs: int = 30, lr: float = 1e-3, device: str = "auto", mixed_precision: str = "no",
            cache_teacher: bool | str = False, out: str | Path | None = None, seed: int = 0,
            batch_size: int = 256, patience: int = 5, progress: bool = True,
            train_options: dict | None = None, top_k: int | None = None,
            top_k_tail: str = "renormalise", **method_options) -> Result:
    """Distil ``teacher`` into ``student`` with ``method`` on the user's data.

    ``train`` / ``val`` / ``test`` (test optional): DataLoaders (map-style or iterable
    datasets), Hugging Face datasets, Splits or any re-iterable of batches; a batch is a tuple
    ``(inputs..., target)`` or a dict with ``labels`` whose other keys go to the models by
    keyword. ``student_layers`` / ``teacher_layers`` are the (l, h) module names, for
    methods that read hidden states. ``task``: ``"classification"`` (cross-entropy,
    accuracy), ``"regression"`` (MSE, RMSE) or a loss callable. ``cache_teacher``:
    ``"memory"`` / ``"disk"`` computes the frozen teacher's states once per training example
    (the training data is then read once, in order, and shuffled by the run's seed); ``"disk"``
    writes them batch by batch to ``out/teacher_cache.safetensors`` (a temporary folder without
    ``out``) and reads them memory-mapped. ``top_k`` (``task="causal-lm"``): the cache keeps the
    teacher's ``top_k`` most likely next tokens per position instead of its full logits, their
    tail's mass ``top_k_tail`` ``"renormalise"``-d away or kept as one ``"other"`` bucket.
    ``batch_size`` applies to data that is not already a DataLoader; ``train_options`` holds
    any other :class:`TrainConfig` value (``weight_decay``, ``teacher_dtype``, ...).
    ``out``: a folder for the run's checkpoint (a rerun resumes it) and the saved student.
    ``method_options`` are the method's own (``talkingmodels methods``; e.g. ``rounds``).
    Returns a :class:`Result`; the student is selected on validation and left in eval mode.
    """
    cls = _method_class(method)
    options = validate(cls.Config, method_options, f"method {cls.name!r} options")
    cfg = validate(TrainConfig, {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                 "patience": patience, "device": device,
                                 "mixed_precision": mixed_precision, **(train_options or {})},
                   "training options")
    distributed.check_precision(distributed.resolve_device(cfg.device), cfg.mixed_precision)
    if cache_teacher not in CACHES:
        raise UserError(f"unknown cache_teacher {cache_teacher!r}; valid: False, 'memory', 'disk'")
    loss, metric, output = _task(task, metric)
    layers = {side: None if names is None else tuple(names)
              for side, names in (("student", student_layers), ("teacher", teacher_layers))}
    train, val = as_loader(train, cfg.batch_size, shuffle=True), as_loader(val, cfg.eval_batch_size, False)
    test = None if test is None else as_loader(test, cfg.eval_batch_size, False)
    output = _check_output(student, first_batch(train, cfg.batch_size), output, loss)
    _check_top_k(top_k, top_k_tail, cache_teacher, output, vocabulary(teacher) or vocabulary(student))
    seed_everything(seed)
    distiller = cls(ModelPair(student, teacher, layers["student"], layers["teacher"], output, loss),
                    options)
    out = None if out is None else Path(out)
    if cache_teacher and not options.unfreeze_teacher:
        # A loader's own batch size carries over to the cached split's shuffled batches.
        batch = getattr(train, "batch_size", None) or cfg.batch_size
        train = _cached_split(train, teacher, layers["teacher"], cache_teacher, out, batch, output, top_k,
                              top_k_tail, vocabulary(student))
        cfg = cfg.model_copy(update={"batch_size": batch})
    fingerprint = {"method": {"name": cls.name, **options.model_dump(mode="json")},
                   "train": cfg.model_dump(), "seed": seed,
                   **({"top_k": top_k, "top_k_tail": top_k_tail} if top_k is not None else {})}
    result = fit(distiller, Splits(train, val, test), metric, cfg, seed,
                 checkpoint=None if out is None else out / "checkpoint.pt",
                 fingerprint=fingerprint, progress=progress)
    done = Result(student, result.val, result.test, result.history, cls.name,
                  options.model_dump(mode="json"), layers["student"], layers["teacher"],
                  metric.name, result.best_epoch, result.epochs, result.seconds)
    if out is not None:
        done.save(out)
        (out / "checkpoint.pt").unlink(missing_ok=True)  # the run is finished and saved
    return done
