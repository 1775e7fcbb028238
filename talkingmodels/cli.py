"""The command line: ``talkingmodels run|bench|report|export|methods|tasks``.

A user's mistake prints one line (``error: ...``) and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from itertools import product
from pathlib import Path

from talkingmodels.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _seeds(text: str) -> int | list[int]:
    """``--seeds``: a count, a range ``A-B`` or a comma-separated list."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            if last < first:
                raise ValueError
            return list(range(first, last + 1))
        return [int(part) for part in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a count (5), a range (100-102) or a list "
                        "(0,1,2)") from None


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_run(args) -> None:
    from talkingmodels.config import load_config
    from talkingmodels.probes import PeakMemory
    from talkingmodels.runner import run_experiment

    start = time.perf_counter()
    exp = load_config(args.config, train=_train_options(args))
    out = args.out or exp.config.out or Path("runs") / Path(args.config).stem
    with _one_writer(Path(out)), PeakMemory() as memory:
        report = run_experiment(exp, Path(out), **_store_options(args))
    _finish(report, start, memory.peak, args.quiet)


def cmd_bench(args) -> None:
    from talkingmodels import distributed, suites
    from talkingmodels.config import ExperimentConfig, resolve, validate
    from talkingmodels.probes import PeakMemory
    from talkingmodels.runner import run_experiment
    from talkingmodels.tasks import benchmarks, get_task

    names = benchmarks() if args.task == "all" else [args.task]
    if unknown := [name for name in names if name not in benchmarks()]:
        get_task(unknown[0])  # an unknown name: the registry's error lists the tasks
        raise UserError(f"task {unknown[0]!r} has no benchmark (its models and data come from a "
                        f"config: talkingmodels run CONFIG.yaml); benchmarks: {', '.join(benchmarks())}")
    if args.task == "all" and args.settings:
        raise UserError("--settings names one task's settings; it cannot be used with bench all")
    tasks = [get_task(name) for name in names]
    chosen = _csv(args.suite)
    if unknown := [name for name in chosen if name not in suites.SUITES]:
        raise UserError(f"unknown suite {unknown[0]!r}; valid suites: {', '.join(suites.SUITES)} "
                        "(several: comma-separated, e.g. full,ablations)")
    options = {}
    if args.data_dir:
        options["data_dir"] = args.data_dir
    if args.cache_dir:
        options["cache_dir"] = args.cache_dir
    train = _train_options(args)
    if args.epochs is not None:
        train["epochs"] = args.epochs
    experiments, pieces = [], []
    for task, suite in product(tasks, chosen):  # all validated and resolved before the first run
        config = suites.experiment_config(task, suite, _seeds(args.seeds))
        if args.methods:  # the suite's own labels keep their options; other names: defaults
            entries = {entry["label"]: entry for entry in config["methods"]}
            config["methods"] = [entries.get(name, {"name": name, "label": name})
                                 for name in _csv(args.methods)]
        if args.settings:
            config["settings"] = _csv(args.settings)
        config.update(task_options=options, train=train)
        experiments.append(resolve(validate(ExperimentConfig, config, "bench")))
        pieces.append(suite)
    start = time.perf_counter()
    out = Path(args.out or "-".join([f"runs/{args.task}", *(name for name in chosen if name != "core")]))
    store = _store_options(args)
    with _one_writer(out), PeakMemory() as memory:
        for index, (exp, suite) in enumerate(zip(experiments, pieces, strict=True)):
            begin = time.perf_counter()
            with PeakMemory() as piece:
                # One store for all tasks and suites: --force clears it once, before the first.
                report = run_experiment(exp, out, **{**store, "force": store["force"] and index == 0})
            if len(experiments) > 1 and distributed.is_main():
                print(f"{exp.task.name} ({suite}): {time.perf_counter() - begin:.0f} s, "
                      f"peak memory {piece.peak:.2f} GiB")
    _finish(report, start, memory.peak, args.quiet)


def _one_writer(out: Path):
    """The store's lock, held by the main process (a launch's other processes and the
    --jobs workers write under it)."""
    from talkingmodels import distributed, store

    return store.writer_lock(out) if distributed.is_main() else contextlib.nullcontext()


def _train_options(args) -> dict:
    """Training values given on the command line (over the config's and the task's)."""
    return {key: value for key, value in (("device", args.device),
                                          ("mixed_precision", args.mixed_precision)) if value}


def _store_options(args) -> dict:
    # bench without --jobs picks for its task (one job a core where the models are tiny);
    # run keeps one job unless told, as a config names its own grid
    jobs = args.jobs if args.jobs is not None else (None if args.command == "bench" else 1)
    return {"force": args.force, "resume": args.resume, "tensorboard": args.tensorboard,
            "jobs": jobs, "threads": args.threads}


def _finish(report: Path, start: float, peak: float, quiet: bool) -> None:
    from talkingmodels import distributed

    if distributed.is_main():
        if not quiet and (table := _headline(report.parent)):
            print(table, end="\n\n")
        print(f"wrote {report} (and results.csv, plots) in {time.perf_counter() - start:.0f} s, "
              f"peak memory {peak:.2f} GiB")


def _headline(out: Path) -> str:
    """The store's headline tables (report.md's first ones), or nothing where it has none."""
    from talkingmodels import store
    from talkingmodels.report.headline import headline

    return headline(out) if (out / store.RESULTS).is_file() else ""


def cmd_report(args) -> None:
    from talkingmodels import store
    from talkingmodels.report import Study, write_report

    if not (Path(args.dir) / store.RESULTS).is_file():  # (before the lock: it would create the folder)
        raise UserError(f"no results.csv in {args.dir}; run an experiment first")
    with store.writer_lock(Path(args.dir)):
        print(f"wrote {write_report(Path(args.dir), Study(focus=args.focus, reference=args.reference))}")
    if args.readme:
        from talkingmodels.report import update_readme

        print(f"updated {update_readme(args.readme, args.dir)}")


def cmd_export(args) -> None:
    from talkingmodels.export import export_run

    print(f"wrote {export_run(args.dir, args.run, args.format, args.out)}")


def cmd_methods(_args) -> None:
    from talkingmodels.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}")


def cmd_tasks(_args) -> None:
    from talkingmodels.tasks import TASKS

    for name, cls in sorted(TASKS.items()):
        print(f"{name:12s} metric {cls.metric.name}; default settings: "
              f"{', '.join(cls.default_settings)}")


def _add_store_arguments(parser: Parser) -> None:
    parser.add_argument("--device", help="auto (CUDA when available; the default), cpu, cuda or "
                        "cuda:N")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="autocast of the forward passes (fp16 with a gradient scaler, CUDA "
                        "only); default: no")
    parser.add_argument("--resume", action="store_true",
                        help="continue runs that were interrupted (from their checkpoints)")
    parser.add_argument("--force", action="store_true",
                        help="start over: delete the results, students and checkpoints first")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="train independent runs in N worker processes (default 1; bench: as many "
                        "as cores, one thread each, for tasks whose models are tiny (MovieLens))")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads per run (default: all cores, shared out among the jobs)")
    parser.add_argument("--tensorboard", type=Path, metavar="DIR",
                        help="write TensorBoard logs of every loss term and metric to DIR")
    parser.add_argument("--quiet", action="store_true",
                        help="end with one line (the report's path) instead of the headline tables")


def build_parser() -> Parser:
    parser = Parser(prog="talkingmodels", description="Talking-model Distillation and KD baselines")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="run one YAML experiment")
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, help="output directory (default: the config's out)")
    _add_store_arguments(run)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="run a task's benchmark grid (or every task's: all)")
    bench.add_argument("task", help="a task name, or all (every task into one store and report)")
    bench.add_argument("--suite", default="core",
                       help="core: the paper's baselines and TD; full: plus the modern baselines "
                       "and the kd-modules control; ablations: TD's ablations and diagnostics; efficiency: "
                       "TD's cheaper-interaction options; research: the capacity-gap, little-data and "
                       "weak-logit settings with TD's grounded options; several: "
                       "comma-separated (full,ablations: the combined report)")
    bench.add_argument("--settings", help="comma-separated settings (default: the task's)")
    bench.add_argument("--methods", help="comma-separated methods (default: all of the task's)")
    bench.add_argument("--seeds", default="5", help="a count N (seeds 0..N-1, default 5), a range "
                       "A-B (e.g. the tuning seeds 100-102) or a comma-separated list")
    bench.add_argument("--epochs", type=int, help="epoch budget per run")
    bench.add_argument("--out", type=Path, help="output directory (default: runs/TASK)")
    bench.add_argument("--data-dir", type=Path, help="where the task's data lies")
    bench.add_argument("--cache-dir", type=Path, help="cache for teachers and data")
    _add_store_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="rewrite report.md and plots of an output directory")
    report.add_argument("dir", type=Path)
    report.add_argument("--focus", default="td", help="the method under study (default: td)")
    report.add_argument("--reference", default="scratch",
                        help="the method every gain is measured against (default: scratch)")
    report.add_argument("--readme", type=Path, help="also regenerate DIR's results block in this "
                        "Markdown file (between its marker lines)")
    report.set_defaults(func=cmd_report)

    export = sub.add_parser("export", help="write a stored student as a deployable file")
    export.add_argument("dir", type=Path, help="the runs store (an output directory)")
    export.add_argument("run", help="the run: SETTING__LABEL__SEED (its name under students/)")
    export.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors")
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    export.set_defaults(func=cmd_export)

    sub.add_parser("methods", help="list the registered methods").set_defaults(func=cmd_methods)
    sub.add_parser("tasks", help="list the registered tasks").set_defaults(func=cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"{interrupt or 'interrupted'}; finished runs are kept in results.csv",
              file=sys.stderr)
        return 130
    finally:
        from talkingmodels import distributed

        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
