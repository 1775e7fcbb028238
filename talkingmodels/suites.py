"""Named method grids for ``talkingmodels bench TASK --suite NAME``.

* ``core``: the paper's baselines and TD (each task's ``default_methods``);
* ``full``: ``core`` plus the modern baselines and the parameter-matched control;
* ``ablations``: TD's ablations around its defaults, with scratch and the default TD as
  references, on each task's ``ablation_settings``;
* ``efficiency``: TD's cheaper-interaction options against the default TD and TD without
  interaction, on the same settings;
* ``decoder``: TD's choices on a decoder-only teacher (layer pairs of its stack, message
  width, consistency, listening, the teacher's head as a per-token target, two rounds) and
  its diagnostics, on the lm task's settings;
* ``research``: the settings TD's premise is about (a capacity gap, little data, a teacher
  whose logits are weaker than its features: each task's ``research_settings``), the
  baselines, TD's diagnostics and its grounded options (docs/method.md).

Every suite is also an ordinary experiment config: ``experiment_config(task, suite)``
builds it, and ``configs/ablations-TASK.yaml`` hold the ablations (a test checks that
they agree), so ``talkingmodels run`` runs the same grids.
"""

from __future__ import annotations

from itertools import product

from talkingmodels.errors import UserError

MODERN = ("dkd", "dist", "rkd", "pkt", "crd", "kd-modules")


def _named(labels) -> dict[str, dict]:
    """Entries for method labels (``name`` or ``name:variant``) with their default options."""
    return {label: {"name": label.split(":")[0]} for label in labels}


def _weights() -> dict[str, dict]:
    """A coarse grid of the interaction and consistency weights: each of w1..w3 at 0.3 or 3
    (2^3 corners around TD's default w1 = w2 = w3 = 1)."""
    grid = {}
    for w1, w2, w3 in product((0.3, 3.0), repeat=3):
        grid[f"td-w{w1:g}-{w2:g}-{w3:g}"] = {"name": "td", "w1": w1, "w2": w2, "w3": w3}
    return grid


# label -> method entry; TD's defaults: 1 round, linear channel, m = 16, w0..w3 = 1
ABLATIONS: dict[str, dict] = {
    "scratch": {"name": "scratch"},
    "td": {"name": "td"},
    **{f"td-rounds-{r}": {"name": "td", "rounds": r} for r in (0, 2, 3)},
    "td-no-mc": {"name": "td", "message_consistency": False},
    "td-no-sc": {"name": "td", "state_consistency": False},
    "td-no-kd": {"name": "td", "weight": 0.0},  # w0 = 0: pure communication
    "td-dense": {"name": "td", "channel": "dense-relu-dense"},
    **{f"td-m{m}": {"name": "td", "message_dim": m} for m in (8, 32, 64)},
    **_weights(),
    # diagnostics: is TD better than TD with a teacher that knows nothing, or with answers
    # to other examples' questions? If not, its interaction carries no knowledge of the teacher.
    "td-random-teacher": {"name": "td", "interpreter": "random"},
    "td-shuffled-answers": {"name": "td", "answers": "shuffled"},
}

# TD's cheaper interactions (options of td, off by default) against the default TD and
# TD without interaction: what each saves (benchmarks/td_profile.py) and what it costs in
# quality, on every ablated setting.
EFFICIENCY: dict[str, dict] = {
    "td": {"name": "td"},
    "td-rounds-0": ABLATIONS["td-rounds-0"],
    "td-fraction-0.5": {"name": "td", "interact_fraction": 0.5},
    "td-every-2": {"name": "td", "interact_every": 2},
    "td-bf16": {"name": "td", "interact_precision": "bf16"},
}

# TD's grounded options (docs/method.md): consistency in every exchange (reviews), the
# teacher's own view of the input in what it hears (patent), and both.
GROUNDED: dict[str, dict] = {
    "td-round-consistency": {"name": "td", "round_consistency": True},
    "td-listen-add": {"name": "td", "listen": "add"},
    "td-listen-gate": {"name": "td", "listen": "gate"},
    "td-grounded": {"name": "td", "round_consistency": True, "listen": "gate"},
    "td-grounded-no-kd": {"name": "td", "round_consistency": True, "listen": "gate", "weight": 0.0},
}

# The research grid: the baselines that compete with TD where logits are weak (feature-based
# ones and the parameter-matched control), TD, its diagnostics, w0 = 0, and its grounded options.
RESEARCH: dict[str, dict] = {
    **_named(("scratch", "logit-kd", "feature-kd", "fitnet", "hybrid", "kd-modules", "td")),
    **{label: ABLATIONS[label] for label in
       ("td-rounds-0", "td-random-teacher", "td-shuffled-answers", "td-no-kd")},
    **GROUNDED,
}


def _teacher_pair(low: int, high: int) -> dict:
    return {"name": "td", "teacher_layers": [f"model.layers.{low}", f"model.layers.{high}"]}


# TD's choices on a decoder-only teacher (the lm task's 30-layer SmolLM2; the task's pair is
# (10, 14)): the teacher's layer pair, shallow, deep and a wide gap against the narrow
# default, the message width, per-round consistency, listening, the teacher's own head on its
# interpretation as a per-token soft target, and two rounds. Tuned on seeds 100-102 by the
# rule in docs/results.md ("Does talking help an LLM's student?").
DECODER: dict[str, dict] = {
    "td": {"name": "td"},
    "td-layers-2-6": _teacher_pair(2, 6),
    "td-layers-22-26": _teacher_pair(22, 26),
    "td-layers-6-22": _teacher_pair(6, 22),
    "td-m8": ABLATIONS["td-m8"],
    "td-m64": ABLATIONS["td-m64"],
    "td-round-consistency": GROUNDED["td-round-consistency"],
    "td-listen-add": GROUNDED["td-listen-add"],
    "td-listen-gate": GROUNDED["td-listen-gate"],
    "td-answer-kd": {"name": "td", "answer_kd": 1.0},
    "td-rounds-2": ABLATIONS["td-rounds-2"],
}


def _diagnosed(label: str, entry: dict) -> dict[str, dict]:
    """The diagnostics of a configuration with its own options (the report compares it with
    these rather than with the default ones): no interaction, a re-initialised teacher."""
    return {f"{label}-rounds-0": {**entry, "rounds": 0},
            f"{label}-random-teacher": {**entry, "interpreter": "random"}}


# (added once the tuning rule had picked td-layers-2-6 on validation: the default diagnostics
# run at the task's layers 10-14, and a configuration at other layers is judged against
# diagnostics at its own)
DECODER_DIAGNOSTICS = _diagnosed("td-layers-2-6", DECODER["td-layers-2-6"])

# Every labelled variant of TD (the report's ablation tables compare them with TD).
VARIANTS: dict[str, dict] = {**ABLATIONS, **EFFICIENCY, **GROUNDED, **DECODER, **DECODER_DIAGNOSTICS}


def _ablated(task) -> tuple[str, ...]:
    return task.ablation_settings or task.default_settings


# suite -> (its method entries on a task class, its settings on a task class)
SUITES: dict[str, tuple] = {
    "core": (lambda task: _named(task.default_methods), lambda task: task.default_settings),
    "full": (lambda task: _named((*task.default_methods, *MODERN)), lambda task: task.default_settings),
    "ablations": (lambda task: ABLATIONS, _ablated),
    "efficiency": (lambda task: EFFICIENCY, _ablated),
    "research": (lambda task: RESEARCH, lambda task: task.research_settings),
    # (its layer names are a Hugging Face decoder stack's: the lm task's)
    "decoder": (lambda task: {**DECODER, **{label: ABLATIONS[label] for label in
                                            ("td-rounds-0", "td-random-teacher", "td-shuffled-answers")},
                              **DECODER_DIAGNOSTICS},
                lambda task: task.default_settings),
}


def _suite(suite: str) -> tuple:
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[suite]


def methods(task, suite: str) -> list[dict]:
    """The method entries (name, label, options) of ``suite`` on ``task`` (a Task class);
    a task's own options for a method (``method_options``) apply when the grid is resolved."""
    entries, _ = _suite(suite)
    return [{**entry, "label": label} for label, entry in entries(task).items()]


def settings(task, suite: str) -> list[str]:
    _, chosen = _suite(suite)
    return list(chosen(task))


def experiment_config(task, suite: str, seeds: int = 5) -> dict:
    """The suite on ``task`` as the data of an experiment config (``talkingmodels run``)."""
    return {"task": task.name, "settings": settings(task, suite), "seeds": seeds,
            "methods": methods(task, suite)}
