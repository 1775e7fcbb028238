"""Where TD's training step spends its time, per task.

    python benchmarks/td_profile.py [--tasks movielens,vision,text] [--steps 30] [--threads 2]
        [--repeats 3] [--data-dir DIR] [--ops 8] [--residual 10] [--compile] [--csv td_profile.csv]

For each task (its first bench setting, the task's batch size, teacher states cached), in
one process: the median of ``steps`` timed steps (after warm-up) of

- ``logit-kd``: the student's forward and backward, the optimiser step, the KD term;
- ``td``: the same plus TD's channel and its interpretation step;
- ``td`` with ``rounds: 0``: TD without the interaction (only its consistency terms), so
  ``td - td(rounds 0)`` is the cost of the interaction round (question, interpretation,
  answer);
- the interpretation step alone: the teacher's layers ``l+1..h`` (``taps.run_between``) run
  forward on a batch's cached ``t_l`` and backward to it, as TD's gradient needs it;
- the teacher's forward over those layers without autograd (what no gradient would cost);
- the interaction round's channel alone: the question's encoder ``E_S(s_l)`` and the
  teacher's decoder ``D_T``, the answer's encoder ``E_T`` and the student's decoder ``D_S``
  and the distance, forward and backward, with no teacher layer in between; and its forward
  alone without autograd (less than any channel of these four projections can cost);
- TD with each of its cheaper-interaction options (``VARIANTS``: half of each batch
  interacts, every second step interacts, the teacher's segment under bf16 autocast); the
  share of the interaction round's cost each keeps is ``(variant - rounds 0) / (td - rounds 0)``.

Times are the median over blocks of two consecutive steps of the block's mean step (so that
``interact_every: 2``, which interacts on every other step, is timed at its average cost),
``repeats * steps / 2`` blocks each. The measurements take turns block by block (each block
after one untimed call), so that a machine whose speed drifts while they run (another
process, a shared host) shifts them all alike instead of tilting one against another.

The alone-measurements start from inputs computed beforehand (the cached rows gathered, the
student's states, the incoming gradients), which TD's step pays once in its rounds-0 part.

TD's **floor** is what it cannot avoid: its step without the interaction (``rounds: 0``)
plus the interpretation step alone (forward and backward); ``td / floor`` is the overhead
left on top of both. The floor leaves out the channel's own projections in the round, which
are real work too; ``td / (floor + channel)`` is the overhead left on top of all three.
``--csv FILE`` writes ``task``, ``td_ms``, ``floor_ms``, ``td_over_floor``, ``channel_ms``,
``td_over_floor_and_channel`` and ``channel_forward_ms`` per task. ``--compile`` also times
TD with its interaction round (``interaction_terms``: channel and interpretation) under
``torch.compile`` (the other steps of such a run were slower on CPU: take the floor without
it). With ``--ops N`` the N aten operators with the most self time in TD's step are printed
too (torch.profiler); with ``--residual N``, the N operators whose self time per step in
TD's step differs most from the sum of its parts measured alone (rounds 0, the
interpretation, the channel).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time

import torch

# label -> TD's options: the cheaper interactions of issue "A cheaper interpretation step"
VARIANTS = {"td, interact_fraction 0.5": {"interact_fraction": 0.5},
            "td, interact_every 2": {"interact_every": 2},
            "td, interact_precision bf16": {"interact_precision": "bf16"}}


HELD = 8  # batches held ready for the measurements of the interpretation and the channel alone


def interleaved_ms(timed: dict, blocks: int, warmup: int = 5, block: int = 2, settle: int = 1) -> dict:
    """Per label, the median over ``blocks`` blocks of the mean of ``block`` consecutive
    calls, in ms. The measurements take turns block by block, so a machine that slows down
    or speeds up while they run shifts them all alike; before each block ``settle`` untimed
    calls bring caches and allocator back to that measurement's own state."""
    for fn in timed.values():
        for _ in range(warmup):
            fn()
    times = {label: [] for label in timed}
    for _ in range(blocks):
        for label, fn in timed.items():
            for _ in range(settle):
                fn()
            start = time.perf_counter()
            for _ in range(block):
                fn()
            times[label].append((time.perf_counter() - start) / block)
    return {label: 1000 * statistics.median(values) for label, values in times.items()}


def residual_table(timed: dict, count: int, calls: int = 20) -> str:
    """Per aten operator, self time and calls per step of TD's step less those of its parts
    measured alone (rounds 0, the interpretation, the channel): where what is left of TD's
    step goes. ``count`` operators with the largest difference either way."""
    from torch.profiler import ProfilerActivity, profile

    parts = ("td", "td, rounds 0", "interpretation", "channel")
    per_step = {}  # label -> operator -> (self time in us, calls), per step
    for label in parts:
        for _ in range(5):
            timed[label]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                timed[label]()
        per_step[label] = {e.key: (e.self_cpu_time_total / calls, e.count / calls)
                           for e in prof.key_averages()}
    left = {}
    # aten operators only: the profiler's other keys (autograd nodes, record_function ranges)
    # contain aten operators' time again, and timing noise could rank them first.
    for op in {op for ops in per_step.values() for op in ops if op.startswith("aten::")}:
        td_time, td_calls = per_step["td"].get(op, (0, 0))
        left[op] = (td_time - sum(per_step[p].get(op, (0, 0))[0] for p in parts[1:]),
                    td_calls - sum(per_step[p].get(op, (0, 0))[1] for p in parts[1:]), td_time)
    lines = ["| operator | td - parts (us per step) | calls per step | in td (us) |", "|---|---|---|---|"]
    lines += [f"| {op} | {t:+.0f} | {c:+.1f} | {whole:.0f} |"
              for op, (t, c, whole) in sorted(left.items(), key=lambda kv: -abs(kv[1][0]))[:count]]
    lines.append(f"| (all operators) | {sum(t for t, _, _ in left.values()):+.0f} | | |")
    return "\n".join(lines)


def profile_task(name: str, args, task_options: dict | None = None) -> dict:
    """One task's row: every measurement (ms) by label, the floor and the ratios' parts.
    ``task_options``: the task's options (default: ``--data-dir`` for MovieLens)."""
    from talkingmodels.channel import to_grid
    from talkingmodels.config import ExperimentConfig, resolve, validate
    from talkingmodels.engine import TrainStep, make_optimizer, train_step
    from talkingmodels.inference import precompute_teacher
    from talkingmodels.runner import build_method
    from talkingmodels.states import token_mask

    options = task_options if task_options is not None else (
        {"data_dir": args.data_dir} if args.data_dir and name == "movielens" else {})
    exp = resolve(validate(ExperimentConfig, {
        "task": name, "task_options": options, "seeds": 1,
        "methods": [{"name": "logit-kd"}, {"name": "td"},
                    {"name": "td", "label": "td, rounds 0", "rounds": 0},
                    *({"name": "td", "label": label, **options} for label, options in VARIANTS.items())]},
        "td_profile"))
    setting = exp.settings[0]
    prepared = exp.task.prepare(setting)
    # as the bench does: the frozen teacher's states and outputs computed once
    precompute_teacher(prepared.teacher, prepared.splits.train, prepared.teacher_layers)
    cfg = exp.train[setting]
    order = torch.Generator().manual_seed(0)
    shuffled = prepared.splits.train.batches(cfg.batch_size, order)
    batch_list = list(itertools.islice(shuffled, 50))
    batches = itertools.cycle(batch_list)
    row = {"task": f"{name} ({setting})", "batch": cfg.batch_size}
    timed = {}  # label -> one call of what is timed
    methods = {}
    for label, cls, method_options in exp.methods:
        method = build_method(prepared, cls, method_options, seed=0)
        method.train()
        methods[label] = method
        step, optimizer = TrainStep(method), make_optimizer(method.learnable_parameters(), cfg)
        timed[label] = lambda step=step, optimizer=optimizer: train_step(step, next(batches), optimizer)
        if label == "td" and args.compile:
            # the same TD with its interaction round (channel and interpretation) compiled
            twin = build_method(prepared, cls, method_options, seed=0)
            twin.train()
            twin.interaction_terms = torch.compile(twin.interaction_terms, dynamic=False)
            twin_step = TrainStep(twin)
            twin_optimizer = make_optimizer(twin.learnable_parameters(), cfg)
            start = time.perf_counter()
            train_step(twin_step, next(batches), twin_optimizer)
            row["compile seconds"] = time.perf_counter() - start
            timed["td, compiled interaction"] = (
                lambda step=twin_step, optimizer=twin_optimizer: train_step(step, next(batches), optimizer))
        if label == "td" and args.ops:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    train_step(step, next(batches), optimizer)
            row["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops)
    low, high = prepared.teacher_layers
    td = methods["td"]
    (s_low, s_high), side_s, side_t = td.pair.student_layers, td.student_side, td.teacher_side
    # What the alone-measurements below start from, computed beforehand for a few of the
    # batches TD's steps saw: the gathers of the cached rows, the student's states and the
    # incoming gradients are not part of what they time (TD's step pays the gathers and the
    # student once, in its rounds-0 part).
    held = []
    for batch in itertools.islice(batch_list, HELD):
        t_l, t_h = (batch.teacher_cache[layer].clone() for layer in (low, high))
        if t_l.dim() == 4:  # laid out as TD's decoder hands it over (a per-position map)
            t_l = t_l.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            _, states = td.student_states(batch, (s_low, s_high))
            answer = td.teacher_between(low, high, t_l, batch)
        held.append({"batch": batch, "t_l": t_l, "t_h": t_h, "s_l": states[s_low], "s_h": states[s_high],
                     "answer_grad": torch.randn_like(answer), "heard_grad": torch.randn_like(t_l)})
    held_batches = itertools.cycle(held)

    def interpret(grad: bool):
        """The interpretation step alone on a held batch's t_l; backward from a dense incoming
        gradient, as TD's answer encoder sends."""
        h = next(held_batches)
        heard = h["t_l"].detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = td.teacher_between(low, high, heard, h["batch"])
        if grad:
            out.backward(h["answer_grad"])

    def channel(grad: bool):
        """The interaction round's own channel work alone, forward and backward: the question
        E_S(s_l) decoded by D_T (its gradient: a dense one, as the teacher's layers send),
        the answer E_T(t'_h) (here the cached t_h) decoded by D_S, and the distance to s_h."""
        h = next(held_batches)
        s_l, s_h, t_h = (h[key].detach().requires_grad_(grad) for key in ("s_l", "s_h", "t_h"))
        with torch.set_grad_enabled(grad):
            heard = td.hear(side_s.encoder(s_l, "l"), h["t_l"])
            answer = side_s.decoder(to_grid(side_t.encoder(t_h, "h"), s_h), "h")
            loss = td.distance(answer, s_h, token_mask(h["batch"], s_h))
        if grad:
            torch.autograd.backward([loss, heard], [None, h["heard_grad"]])

    timed["interpretation"] = lambda: interpret(True)
    timed["interpretation (forward only)"] = lambda: interpret(False)
    timed["channel"] = lambda: channel(True)
    # (forward only: a lower bound on what any channel of these four projections costs)
    timed["channel (forward only)"] = lambda: channel(False)
    if args.residual:
        row["residual"] = residual_table(timed, args.residual)
    row.update(interleaved_ms(timed, max(1, args.repeats * args.steps // 2)))
    row["interaction"] = row["td"] - row["td, rounds 0"]
    row["floor"] = row["td, rounds 0"] + row["interpretation"]
    row["floor and channel"] = row["floor"] + row["channel"]
    for label in VARIANTS:
        row[f"{label} share"] = (row[label] - row["td, rounds 0"]) / row["interaction"]
    return row


COLUMNS = ("task", "td_ms", "floor_ms", "td_over_floor", "channel_ms", "td_over_floor_and_channel",
           "channel_forward_ms")


def write_csv(path, rows: list[dict]) -> None:
    """``COLUMNS`` for each task's row of :func:`profile_task`."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows([r["task"], f"{r['td']:.3f}", f"{r['floor']:.3f}", f"{r['td'] / r['floor']:.3f}",
                          f"{r['channel']:.3f}", f"{r['td'] / r['floor and channel']:.3f}",
                          f"{r['channel (forward only)']:.3f}"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="movielens,vision,text")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", help="MovieLens-100K folder")
    parser.add_argument("--repeats", type=int, default=3,
                        help="blocks per measurement: repeats * steps / 2, interleaved")
    parser.add_argument("--compile", action="store_true",
                        help="also time TD with its interaction round under torch.compile")
    parser.add_argument("--ops", type=int, default=0, help="print TD's top N operators")
    parser.add_argument("--residual", type=int, default=0,
                        help="print the N operators with the most time in TD's step beyond its parts alone")
    parser.add_argument("--csv", help="write the floor table's columns here (COLUMNS)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [profile_task(name, args) for name in args.tasks.split(",")]
    print(f"median ms per step, {args.threads} threads, torch {torch.__version__}")
    print("| task | batch | logit-kd step | td step | td / logit-kd | td without interaction "
          "(rounds 0) | the interaction round | interpretation alone (fwd+bwd) | interpretation "
          "(fwd, no grad) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['batch']} | {r['logit-kd']:.2f} | {r['td']:.2f} | "
              f"{r['td'] / r['logit-kd']:.2f} | {r['td, rounds 0']:.2f} | {r['interaction']:.2f} "
              f"({100 * r['interaction'] / r['td']:.0f}% of td) | {r['interpretation']:.2f} | "
              f"{r['interpretation (forward only)']:.2f} |")
    print("\n| task | td step (ms) | floor: rounds 0 + interpretation (ms) | td / floor | the round's "
          "channel alone (ms) | its forward only (ms, % of the floor) | td / (floor + channel) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        forward = r["channel (forward only)"]
        print(f"| {r['task']} | {r['td']:.2f} | {r['floor']:.2f} | {r['td'] / r['floor']:.2f} | "
              f"{r['channel']:.2f} | {forward:.2f} ({100 * forward / r['floor']:.1f}%) | "
              f"{r['td'] / r['floor and channel']:.2f} |")
    print("\n| task | td step (ms) | " + " | ".join(f"{v} (ms, share of the interaction kept)"
                                                for v in VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for r in rows:
        print(f"| {r['task']} | {r['td']:.2f} | " + " | ".join(
            f"{r[v]:.2f} ({100 * r[f'{v} share']:.0f}%)" for v in VARIANTS) + " |")
    for r in rows:
        if "td, compiled interaction" in r:
            print(f"\n{r['task']}: td {r['td']:.2f} ms, with its interaction compiled "
                  f"{r['td, compiled interaction']:.2f} ms (the first step, compiling it: "
                  f"{r['compile seconds']:.1f} s)")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    for r in rows:
        if "residual" in r:
            print(f"\n{r['task']}: TD's step less rounds 0, the interpretation and the channel alone, "
                  f"per operator (torch.profiler)\n{r['residual']}")
    for r in rows:
        if "ops" in r:
            print(f"\n{r['task']}: td's operators with the most self time (10 steps)\n{r['ops']}")


if __name__ == "__main__":
    main()
