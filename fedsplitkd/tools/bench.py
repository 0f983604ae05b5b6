"""The benchmark harness: every method tuned by one declared protocol, then run on several seeds.

    fedsplitkd-bench experiments/configs/quick.yaml --out results/quick [key=value ...]

The protocol, the same for every method of a dataset x partition:

1. **Tune.** An Optuna TPE study (seeded; the first third of the trials random, at most 10)
   of ``tuning.trials`` runs over the method's
   ``search`` space, at seed ``tuning.seed``. A trial's score is its final-round accuracy on
   the server's **holdout split** (``holdout-fraction`` of the training data, which no device
   and no teacher sees). The test split is never read for selection.
2. **Evaluate.** The chosen config runs at every seed in ``seeds``. The table reports test
   accuracy as mean ± 95 % confidence interval (Student t), next to device energy, bytes and
   simulated time, so more local epochs are never free; ``tuned.yaml`` holds the chosen
   configs, to rerun with ``flwr run . --run-config``.

Every method gets the same rounds, devices per round, trial budget and seeds. ``KD gain`` is
a KD method's mean minus the mean of ``split`` (split learning without KD), both tuned; a row
``splitkd-X`` is measured against ``split-X`` where the sweep has one (``kd_baseline``).

The YAML (omegaconf; ``key=value`` overrides on the command line, e.g. ``tuning.trials=2``):

    devices: 20                        # devices (in-process nodes, or SuperNodes)
    backend: inprocess                 # inprocess (InProcessGrid) or flower (flwr run)
    run_config: {num-rounds: 25, holdout-fraction: 0.1}
    datasets:   {digits: {}, har: {dataset: har, data-path: ...}}
    partitions: {dirichlet-0.5: {partition: dirichlet, dirichlet-alpha: 0.5}}
    methods:    {splitkd: {}, mutual: {method: splitkd, kd-mode: mutual}, fedavg: {}}
    search:     {splitkd: {learning-rate: {low: 0.001, high: 0.3, log: true},
                           kd-temperature: {choices: [1.0, 2.0, 4.0, 8.0]}}}
    tuning:     {trials: 8, seed: 100}
    seeds: [0, 1, 2]

A run's results go to ``<out>/runs/<key>``, the key a hash of its config, the device count,
the backend and the code (every source file of the package), so a table is never built
from runs of older code, and an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from fedsplitkd.config import ConfigError, resolve
from fedsplitkd.run.health import GRACE_ROUNDS

SECTIONS = ("datasets", "partitions", "methods")
KD_METHODS = ("splitkd", "mutual")  # rows that get a KD gain against "split" (kd_baseline)
Runner = Callable[[dict], list[dict]]  # run config -> metrics.csv rows


def load_sweep(path: str, overrides: list[str]) -> dict:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"fedsplitkd-bench: no sweep file at '{file}'")
    sweep = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(file), OmegaConf.from_dotlist(overrides)))
    missing = [k for k in (*SECTIONS, "seeds") if not sweep.get(k)]
    if missing:
        raise SystemExit(f"fedsplitkd-bench: '{file}' needs non-empty {missing}")
    unknown = sorted(set(sweep.get("search") or {}) - set(sweep["methods"]))
    if unknown:
        raise SystemExit(f"fedsplitkd-bench: '{file}' search names methods not in 'methods': {unknown}")
    return sweep


def code_version() -> str:
    """A hash of every source file of the installed package (core and Flower wiring)."""
    import fedsplitkd
    import fedsplitkd.baselines
    import fedsplitkd.clients
    import fedsplitkd.strategies

    digest = hashlib.sha256()
    for package in (fedsplitkd, fedsplitkd.baselines, fedsplitkd.clients, fedsplitkd.strategies):
        folder = Path(package.__file__).parent
        for path in sorted(folder.rglob("*.py")) + sorted(folder.rglob("*.yaml")):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_flags(code: str, threads: int) -> list[str]:
    """The command-line flags that name which cached runs a table reads (``--code``, ``--threads``)."""
    return [*(["--code", code] if code else []), *(["--threads", str(threads)] if threads else [])]


def run_key(config: dict, devices: int, backend: str, version: str, threads: int = 0) -> str:
    """The cache key of a run. ``threads`` (torch's intra-op threads; 0 = torch's default, keyed as
    before it was a key) is part of it: another thread count sums floats in another order, and a
    25-round run can end points apart (HAR, seed 1: 0.917 with 2 threads, 0.879 with 1)."""
    parts = [config, devices, backend, version] + ([threads] if threads else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_rows(directory: Path) -> list[dict]:
    """metrics.csv as numbers; the last row also carries summary.json's teacher accuracy."""
    with open(directory / "metrics.csv") as f:
        rows = [{k: (v if k == "method" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
    summary = json.loads((directory / "summary.json").read_text())
    rows[-1]["teacher_test_accuracy"] = float(summary.get("teacher_test_accuracy", math.nan))
    rows[-1]["health"] = summary.get("health", "ok")  # run/health.py: ok, diverged or not learning
    return rows


class CachedRunner:
    """Runs a config once (in-process grid, or ``flwr run``) and keeps its results by key."""

    def __init__(self, out: Path, devices: int, backend: str, app: str = ".", cpus: int = 1, threads: int = 0):
        self.out, self.devices, self.backend, self.app, self.cpus = out, devices, backend, app, cpus
        self.threads = threads
        self.version = code_version()
        self.sim = None
        self.ran = self.cached = 0

    def directory(self, config: dict) -> Path:
        return self.out / "runs" / run_key(config, self.devices, self.backend, self.version, self.threads)

    def __call__(self, config: dict) -> list[dict]:
        directory = self.directory(config)
        if (directory / "summary.json").is_file():
            self.cached += 1
            return read_rows(directory)
        full = {**config, "output-dir": str(directory.parent), "run-name": directory.name}
        if self.backend == "inprocess":
            from fedsplitkd.protocol import teacher_memo
            from fedsplitkd.strategies.inprocess import run_app

            with teacher_memo.kept():  # a frozen teacher's outputs, once per sample for all the runs here
                run_app(full, self.devices)
        else:
            if self.sim is None:
                from fedsplitkd.tools.localsim import LocalSimulation

                self.sim = LocalSimulation().__enter__()
            result = self.sim.run(self.app, full, num_supernodes=self.devices, cpus_per_client=self.cpus)
            if not (directory / "summary.json").is_file():
                (directory / "flower.log").parent.mkdir(parents=True, exist_ok=True)
                (directory / "flower.log").write_text(result.stdout + result.stderr)
        if not (directory / "summary.json").is_file():
            raise RuntimeError(f"the run of {json.dumps(config)} wrote no summary.json ({directory})")
        self.ran += 1
        return read_rows(directory)

    def close(self) -> None:
        if self.sim is not None:
            self.sim.__exit__(None, None, None)


def suggest(trial, space: dict) -> dict:
    """Run-config values for one trial from a search space {key: {choices} | {low, high, log}}."""
    values = {}
    for key, spec in space.items():
        if "choices" in spec:
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"])
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                              log=bool(spec.get("log", False)))
    return values


def collapse(rows: list[dict], num_classes: int) -> str | None:
    """Why a run is no fair pick, judged on the holdout split alone (``run/health.py`` judges the
    same on the test split, for the report): ``diverged`` when its holdout loss turned non-finite
    in some round, ``not learning`` when, from round ``GRACE_ROUNDS`` on, its final holdout
    cross-entropy is at or above chance (ln C) with an accuracy under twice chance (2 / C).
    None for a run that learns (or that has no holdout loss to judge)."""
    # A round left untested (evaluate-every) has no holdout accuracy either; a diverged
    # student's accuracy is still a number.
    losses = [r.get("holdout_loss") for r in rows[1:] if not math.isnan(r.get("holdout_accuracy", 0.0))]
    if any(v is not None and not math.isfinite(v) for v in losses):
        return "diverged"
    last = rows[-1]
    loss, accuracy = last.get("holdout_loss"), last.get("holdout_accuracy", math.nan)
    if loss is None or last.get("round", 0) < GRACE_ROUNDS or num_classes < 2:
        return None
    if loss >= math.log(num_classes) and accuracy < 2.0 / num_classes:
        return "not learning"
    return None


def score(rows: list[dict], num_classes: int) -> float:
    """What selection reads: the final round's holdout accuracy; a run that collapsed on the
    holdout (``collapse``) scores 0, the same rule for every method, so a config that collapses
    on the tuning seed is never picked."""
    value = rows[-1].get("holdout_accuracy", math.nan)
    if collapse(rows, num_classes):
        return 0.0
    return 0.0 if value is None or math.isnan(value) else value


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the scores: a third of the budget. Optuna's default (10)
    would leave a budget of 12 almost all random search."""
    return min(10, max(1, trials // 3))


def tune(base: dict, space: dict, trials: int, seed: int, run: Runner, num_classes: int
         ) -> list[dict]:
    """``trials`` runs of ``base`` over ``space`` (Optuna TPE, seeded, ``startup_trials`` random
    first, maximising ``score``); with an empty space, ``base`` itself. Returns one record per
    trial (its values and score), in trial order: ``evaluate`` ranks them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not space:
        rows = run(base)
        return [{"values": {}, "score": score(rows, num_classes), "test_accuracy": rows[-1]["test_accuracy"]}]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup_trials(trials)))
    records = []

    def objective(trial) -> float:
        values = suggest(trial, space)
        rows = run({**base, **values})
        # Test accuracy: recorded for the report, never for the choice.
        records.append({"values": values, "score": score(rows, num_classes),
                        "test_accuracy": rows[-1]["test_accuracy"]})
        return records[-1]["score"]

    study.optimize(objective, n_trials=trials)
    return records


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t; 0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    from scipy.stats import t

    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def settings(sweep: dict) -> list[tuple[str, str, str, dict]]:
    """(dataset, partition, method, base run config) for every cell of the sweep, validated now."""
    cells = []
    for dataset, d_cfg in sweep["datasets"].items():
        for partition, p_cfg in sweep["partitions"].items():
            for method, m_cfg in sweep["methods"].items():
                base = {**sweep.get("run_config", {}), **(d_cfg or {}), **(p_cfg or {}), "method": method,
                        **(m_cfg or {})}
                base.setdefault("dataset", dataset)
                try:
                    resolve(base)
                except ConfigError as err:
                    raise SystemExit(f"fedsplitkd-bench: {dataset}/{partition}/{method}: {err}") from None
                if not resolve(base)["holdout-fraction"]:
                    raise SystemExit(f"fedsplitkd-bench: {dataset}/{partition}/{method}: tuning needs a "
                                     "holdout split (run_config holdout-fraction > 0)")
                cells.append((dataset, partition, method, base))
    return cells


def num_classes_of(base: dict) -> int:
    """The class count of a cell's dataset (what ``collapse`` calls chance), loaded once per process."""
    from fedsplitkd.data.datasets import load_dataset

    return load_dataset(resolve(base)).num_classes


def describe(values: dict) -> str:
    """Tuned values as the table prints them: ``learning-rate=0.0222, local-epochs=5``."""
    return ", ".join(f"{k}={format(v, '.3g') if isinstance(v, float) else v}" for k, v in values.items())


def evaluate(base: dict, records: list[dict], seeds: list, fallbacks: int, run: Runner, num_classes: int
             ) -> tuple[dict, list[list[dict]], list[str]]:
    """The tuned config's runs at every seed. A config with a seed that collapsed on the holdout
    gives way to the next-best trial by score (up to ``fallbacks`` more); the first with no collapsed
    seed is taken, else the one with the best mean holdout accuracy. Returns (values, the runs per
    seed, what was passed over and why)."""
    ranked = []
    for record in sorted(records, key=lambda r: -r["score"]):  # stable: the earlier of equal trials first
        if record["values"] not in ranked:
            ranked.append(record["values"])
    tried = []
    for values in ranked[:1 + fallbacks]:
        per_seed = [run({**base, **values, "seed": seed}) for seed in seeds]
        why = [f"seed {seed}: {c}" for seed, rows in zip(seeds, per_seed) if (c := collapse(rows, num_classes))]
        tried.append((values, per_seed, why))
        if not why:
            break
    mean_holdout = lambda entry: statistics.fmean(rows[-1]["holdout_accuracy"] for rows in entry[1])  # noqa: E731
    values, per_seed, _ = tried[-1] if not tried[-1][2] else max(tried, key=mean_holdout)
    passed = [f"{describe(v)} ({', '.join(why)})" for v, _, why in tried if v is not values]
    return values, per_seed, passed


def search_space(sweep: dict, method: str) -> dict:
    """A method's declared search space ({} when it has none)."""
    return (sweep.get("search") or {}).get(method) or {}


def bench_cell(sweep: dict, cell: tuple[str, str, str, dict], run: Runner,
               classes: Callable[[dict], int] = num_classes_of) -> tuple[dict, dict]:
    """Tune and evaluate one cell (dataset, partition, method, base config): its table row
    (``kd_gain`` still to fill, by ``finish``) and its chosen config."""
    dataset, partition, method, base = cell
    tuning = sweep.get("tuning", {})
    trials, tuning_seed = int(tuning.get("trials", 8)), int(tuning.get("seed", 100))
    space = search_space(sweep, method)
    num_classes = classes(base)
    records = tune({**base, "seed": tuning_seed}, space, trials, tuning_seed, run, num_classes)
    values, per_seed, passed = evaluate(base, records, sweep["seeds"], int(tuning.get("fallbacks", 2)), run,
                                        num_classes)
    test, half = interval([rows[-1]["test_accuracy"] for rows in per_seed])
    teacher = resolve_teacher(per_seed)
    row = {
        "dataset": dataset, "partition": partition, "method": method, "seeds": len(per_seed),
        "trials": len(records), "test_accuracy": test, "test_ci95": half,
        "holdout_accuracy": statistics.fmean(rows[-1]["holdout_accuracy"] for rows in per_seed),
        "teacher_accuracy": teacher, "gap_to_teacher": teacher - test,
        "device_energy_j": statistics.fmean(rows[-1]["cum_device_energy_j"] for rows in per_seed),
        "mb_up_down": statistics.fmean(sum(r["bytes_up"] + r["bytes_down"] for r in rows) for rows in per_seed) / 1e6,
        "sim_time_s": statistics.fmean(rows[-1]["sim_time_s"] for rows in per_seed),
        "chosen": values, "curves": per_seed,
        # seeds that diverged or never learned: a collapsed seed shows here, never only in a wide CI
        "unhealthy": [f"seed {seed}: {rows[-1]['health']}" for seed, rows in zip(sweep["seeds"], per_seed)
                      if rows[-1].get("health", "ok") != "ok"],
        "passed_over": passed,  # tuned configs that collapsed on the holdout at a seed, and which seed
    }
    return row, {**base, **values}


def kd_baseline(method: str, methods: dict) -> str:
    """The row a KD row's gain is measured against: ``split<suffix>`` for ``splitkd<suffix>``
    where the sweep has it (``splitkd-joint`` against ``split-joint``: the same server steps
    without the teacher), else the longest tail of the suffix that has one
    (``splitkd-features-wide`` against ``split-wide``: the same student), else ``split``."""
    words = method.removeprefix("splitkd").split("-")[1:] if method.startswith("splitkd") else []
    tails = ("split" + "".join(f"-{w}" for w in words[i:]) for i in range(len(words)))
    return next((t for t in tails if t in methods), "split")


def finish(sweep: dict, rows: list[tuple[dict, dict]]) -> tuple[list[dict], dict]:
    """The table (in the sweep's cell order, each KD row with its gain over ``kd_baseline``)
    and the chosen configs, from the (row, config) of each cell."""
    table, chosen = [], {}
    for row, config in rows:
        table.append(row)
        chosen.setdefault(row["dataset"], {}).setdefault(row["partition"], {})[row["method"]] = config
    by_cell = {(r["dataset"], r["partition"], r["method"]): r for r in table}
    for row in table:
        baseline = by_cell.get((row["dataset"], row["partition"], kd_baseline(row["method"], sweep["methods"])))
        kd = row["method"] in KD_METHODS or (sweep["methods"][row["method"]] or {}).get("method") in KD_METHODS
        row["kd_gain"] = row["test_accuracy"] - baseline["test_accuracy"] if kd and baseline else math.nan
    return table, chosen


def progress_line(row: dict) -> str:
    return (f"{row['dataset']}/{row['partition']}/{row['method']}: {json.dumps(row['chosen'])} -> test "
            f"{row['test_accuracy']:.4f} ± {row['test_ci95']:.4f}")


def bench(sweep: dict, run: Runner, progress: Callable[[str], None] = print,
          shard: tuple[int, int] = (0, 1), classes: Callable[[dict], int] = num_classes_of
          ) -> tuple[list[dict], dict]:
    """Tune and evaluate every cell (or shard (k, n): every n-th from the k-th); returns the table
    rows and the chosen configs. ``classes`` gives a cell's class count (for ``collapse``)."""
    rows = []
    for cell in settings(sweep)[shard[0]::shard[1]]:
        rows.append(bench_cell(sweep, cell, run, classes))
        progress(progress_line(rows[-1][0]))
    return finish(sweep, rows)


def heaviest_first(sweep: dict, cells: list) -> list[int]:
    """The order in which parallel jobs take cells (indices into ``cells``): the methods that
    search ``local-epochs`` (a whole model trained for several epochs a round: the longest cells
    of every preset measured, e.g. HAR FedDF 504 s, split 51 s in the quick preset) first, the
    rest after, each in sweep order. A long cell taken last would leave the other jobs idle."""
    light = lambda i: "local-epochs" not in search_space(sweep, cells[i][2])  # noqa: E731
    return sorted(range(len(cells)), key=light)


_RUNNER: CachedRunner | None = None  # each job process's own


def settle_process(threads: int) -> None:
    """A benchmark process: Flower's and the package's per-round logs quiet, torch's threads set
    (0 = torch's default)."""
    import logging

    import flwr.common.logger  # noqa: F401  (importing it sets Flower's logger to DEBUG: import first)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("fedsplitkd").setLevel(logging.ERROR)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _start_job(out: str, devices: int, version: str, threads: int) -> None:
    global _RUNNER
    settle_process(threads)
    _RUNNER = CachedRunner(Path(out), devices, "inprocess", threads=threads)
    _RUNNER.version = version


def _job_cell(task: tuple[dict, int, tuple]) -> tuple[int, dict, dict, int, int]:
    sweep, index, cell = task
    ran, cached = _RUNNER.ran, _RUNNER.cached
    row, config = bench_cell(sweep, cell, _RUNNER)
    return index, row, config, _RUNNER.ran - ran, _RUNNER.cached - cached


def bench_jobs(sweep: dict, runner: CachedRunner, jobs: int, progress: Callable[[str], None] = print
               ) -> tuple[list[dict], dict]:
    """``bench`` with ``jobs`` processes (in-process backend) that each take the next cell when
    they finish one, heaviest first: the same runs, keyed as ``runner``'s (version, threads),
    and the same table as one process makes; ``runner`` counts what they ran and found cached."""
    import multiprocessing

    cells = settings(sweep)
    rows: dict[int, tuple[dict, dict]] = {}
    context = multiprocessing.get_context("spawn")  # no forked torch or Flower state
    with context.Pool(jobs, _start_job, (str(runner.out), runner.devices, runner.version, runner.threads)) as pool:
        tasks = [(sweep, i, cells[i]) for i in heaviest_first(sweep, cells)]
        for index, row, config, ran, cached in pool.imap_unordered(_job_cell, tasks):
            rows[index] = (row, config)
            runner.ran, runner.cached = runner.ran + ran, runner.cached + cached
            progress(progress_line(row))
    return finish(sweep, [rows[i] for i in sorted(rows)])


def resolve_teacher(per_seed: list[list[dict]]) -> float:
    """The teacher's test accuracy over the seeds' runs (summary.json), NaN for runs without one."""
    values = [rows[-1].get("teacher_test_accuracy", math.nan) for rows in per_seed]
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def write_report(table: list[dict], chosen: dict, out: Path, command: str) -> str:
    """summary.csv, summary.md (the README's table), tuned.yaml and the plots."""
    columns = [k for k in table[0] if k not in ("curves", "chosen")] if table else ["dataset"]
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "chosen"])
        writer.writeheader()
        writer.writerows([{**{k: r[k] for k in columns}, "chosen": json.dumps(r["chosen"])} for r in table])
    OmegaConf.save(OmegaConf.create(chosen), out / "tuned.yaml")
    fmt = lambda v, spec: "—" if isinstance(v, float) and math.isnan(v) else format(v, spec)  # noqa: E731
    lines = [f"Generated by `{command}`.", "",
             "| dataset | partition | method | test accuracy (95 % CI) | holdout | teacher | gap to teacher | "
             "KD gain (pt) | device energy J | MB up+down | simulated time s | chosen | seeds not ok, configs passed over |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cells = list(dict.fromkeys((r["dataset"], r["partition"]) for r in table))  # in the sweep's order
    for r in sorted(table, key=lambda r: (cells.index((r["dataset"], r["partition"])), -r["test_accuracy"])):
        notes = [*r.get("unhealthy", []), *(f"passed over {p}" for p in r.get("passed_over", []))]
        chosen_text = describe(r["chosen"])
        lines.append(f"| {r['dataset']} | {r['partition']} | {r['method']} | {r['test_accuracy']:.4f} ± "
                     f"{r['test_ci95']:.4f} | {r['holdout_accuracy']:.4f} | {fmt(r['teacher_accuracy'], '.4f')} | "
                     f"{fmt(r['gap_to_teacher'], '+.4f')} | {fmt(100 * r['kd_gain'], '+.2f')} | "
                     f"{r['device_energy_j']:.1f} | {r['mb_up_down']:.1f} | {r['sim_time_s']:.1f} | {chosen_text} | "
                     f"{'; '.join(notes) or '—'} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    plot(table, out / "plots")
    return text


def plot(table: list[dict], directory: Path) -> None:
    """Test accuracy against cumulative device energy (log scale) and simulated time: one line per
    tuned method (the mean over seeds) with its 95 % band, a method no device spends on (central-kd,
    public-kd) as a dotted line at its final accuracy, and the teacher's accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab20").colors  # twelve methods need more than the default ten colours
    for dataset, partition in sorted({(r["dataset"], r["partition"]) for r in table}):
        for column, label in (("cum_device_energy_j", "cumulative device energy (J)"),
                              ("sim_time_s", "simulated time (s)")):
            fig, ax = plt.subplots(figsize=(6.5, 4))
            cell = [r for r in table if (r["dataset"], r["partition"]) == (dataset, partition)]
            for i, r in enumerate(cell):
                x = np.mean([[row[column] for row in rows] for rows in r["curves"]], axis=0)
                y = np.array([[row["test_accuracy"] for row in rows] for rows in r["curves"]])
                tested = ~np.isnan(y).any(axis=0)  # the rounds evaluate-every tested
                x, y = x[tested], y[:, tested]
                mean, band = zip(*(interval(list(col)) for col in y.T))
                color = colors[(2 * i) % len(colors) + (2 * i) // len(colors)]
                if not np.any(x):  # no device spends anything (central-kd, public-kd): its final accuracy as a line
                    ax.axhline(mean[-1], color=color, linestyle=":", linewidth=1.5, label=f"{r['method']} (final)")
                    continue
                ax.plot(x, mean, marker=".", color=color, label=r["method"])
                ax.fill_between(x, np.clip(np.subtract(mean, band), 0, 1), np.clip(np.add(mean, band), 0, 1),
                                color=color, alpha=0.15)
            teachers = [r["teacher_accuracy"] for r in table if (r["dataset"], r["partition"]) == (dataset, partition)
                        and not math.isnan(r["teacher_accuracy"])]
            if teachers:  # the model being distilled, as a line: what the students are measured against
                ax.axhline(statistics.fmean(teachers), color="black", linestyle="--", linewidth=1, label="teacher")
            if column == "cum_device_energy_j":
                ax.set_xscale("symlog", linthresh=0.1)  # log scale that still shows round 0 (0 J)
            ax.set_xlim(left=0)
            ax.set_ylim(0, 1)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{dataset}, {partition} (tuned, mean and 95 % band over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(directory / f"{dataset}_{partition}_accuracy_vs_{column}.png", dpi=110)
            plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsplitkd-bench", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="the sweep YAML (e.g. experiments/configs/quick.yaml)")
    parser.add_argument("--out", required=True, help="directory for runs, summary, tuned.yaml and plots")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="backend flower: CPUs per ClientApp")
    parser.add_argument("--app", default=".", help="backend flower: the Flower app directory (this checkout)")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th cell from the K-th (N processes "
                        "share one --out; experiments/bench_table.py then writes the whole table)")
    parser.add_argument("--code", default="", help="keep and reuse runs under this code version instead of "
                        "this checkout's hash; only where no file a run executes changed since (git diff)")
    parser.add_argument("--threads", type=int, default=0, help="backend inprocess: torch threads for this process "
                        "(0 = torch's default). Shards side by side run far faster at cores / shards each (two "
                        "shards on 2 cores: 3.4x, docs/benchmarks.md); runs are keyed by it, as results differ")
    parser.add_argument("--jobs", type=int, default=1, help="backend inprocess: N processes, each taking the "
                        "next cell (heaviest first) as it finishes one, one table at the end; --threads "
                        "defaults to cores / N")
    parser.add_argument("--report", default="", help="write summary.md, summary.csv, tuned.yaml and the plots here "
                        "(default: --out), e.g. for a sweep that shares another sweep's runs and must not replace "
                        "its table")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the sweep YAML")
    args = parser.parse_args(argv)
    try:
        shard = tuple(int(v) for v in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        raise SystemExit(f"fedsplitkd-bench: --shard {args.shard!r}: must be K/N with 0 <= K < N") from None
    sweep = load_sweep(args.sweep, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads < 0:
        raise SystemExit(f"fedsplitkd-bench: --threads {args.threads}: must be >= 0")
    if args.jobs < 1:
        raise SystemExit(f"fedsplitkd-bench: --jobs {args.jobs}: must be >= 1")
    if args.jobs > 1 and (shard[1] > 1 or sweep.get("backend", "inprocess") != "inprocess"):
        raise SystemExit("fedsplitkd-bench: --jobs takes the cells itself: not with --shard, and only on "
                         "backend inprocess (a Flower run has its own processes)")
    if args.jobs > 1 and not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    settle_process(args.threads)
    runner = CachedRunner(out, sweep.get("devices", 20), sweep.get("backend", "inprocess"), args.app,
                          args.cpus_per_client, args.threads)
    runner.version = args.code or runner.version
    print(f"code {runner.version}, {sweep.get('devices', 20)} devices, backend {runner.backend}"
          + (f", {args.jobs} jobs x {args.threads} threads" if args.jobs > 1 else ""), flush=True)
    progress = lambda line: print(line, flush=True)  # noqa: E731
    try:
        if args.jobs > 1:
            table, chosen = bench_jobs(sweep, runner, args.jobs, progress)
        else:
            table, chosen = bench(sweep, runner, progress, shard)
    finally:
        runner.close()
    if shard[1] > 1:
        table_command = " ".join(["python experiments/bench_table.py", args.sweep, "--out", args.out,
                                  *run_flags(args.code, args.threads)])
        print(f"shard {args.shard} done: {runner.ran} runs, {runner.cached} cached; the table: {table_command}")
        return
    report = Path(args.report or args.out)
    report.mkdir(parents=True, exist_ok=True)
    command = " ".join(["fedsplitkd-bench", args.sweep, "--out", args.out,
                        *(["--report", args.report] if args.report else []), *run_flags(args.code, args.threads),
                        *args.overrides])
    sys.stdout.write(write_report(table, chosen, report, command))
    print(f"{runner.ran} runs, {runner.cached} cached; tuned configs in {report / 'tuned.yaml'}")


if __name__ == "__main__":
    main()
