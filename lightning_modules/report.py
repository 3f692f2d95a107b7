"""pyramidlab-report SWEEP_DIR: one table (and plot) per sweep, like the papers' tables.

Reads every job folder of a Hydra multirun (``<job>/.hydra/overrides.yaml`` and
``<job>/metrics.json``) and writes into SWEEP_DIR:

- ``report.md``: one row per job (job number, status, the swept keys, AP metrics in
  percent, trainable parameters in millions, inference time in ms) and, when ``seed`` is
  swept, a second table with mean ± std per configuration (the jobs that differ only in
  ``seed``);
- ``report.csv``: the per-job rows (machine-readable, same units); ``report_mean.csv``:
  the per-configuration means and standard deviations (only when ``seed`` is swept);
- ``report.png``: bbox AP (and mask AP) per configuration, error bars = std over seeds, each
  seed's value beside its configuration's mean, on an axis spanning the values (not from 0).

``baseline=`` (``hydra.callbacks.report.baseline``, ``--baseline``) names the baseline rows
(``key=value`` selections): the mean table then holds each row's paired difference to its
baseline with a 95 % confidence interval, ``36.4 ± 0.3 [+0.9 ± 0.6]`` (:func:`select_baselines`,
:func:`paired_difference`). A job folder holding the SRF-GAN pipeline's per-variant
``report.csv`` is one row per variant (:func:`variant_rows`).

A job without ``metrics.json`` (killed, timed out, still running) or whose ``metrics.json``
says ``status: failed`` is a row marked ``failed`` with the error's first line; jobs of a
grid sweep that never got a folder are rows too. When the jobs logged to W&B, the table
and the plot go to a short W&B run in the sweep's group with ``job_type=report``.

Other entry points reuse :func:`write_report` with their own rows (e.g. one per variant).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detection.atomic import atomic_path
from lightning_modules.markdown import markdown_table

log = logging.getLogger("pyramidlab")

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
SEED_KEY = "seed"
# overrides that never describe a configuration (where outputs go); a swept ckpt_path does
# (an eval sweep over checkpoints), a fixed one is listed with the common overrides
IGNORED_KEYS = ("paths.", "hydra.")
RESUMED = "ckpt_path=last"  # added by a sweep rerun to the jobs it resumes (hydra_callbacks.plan_sweep)


# ------------------------------------------------------------------------------- reading
@dataclass
class Job:
    """One job folder of a sweep (or an expected job that never got one)."""

    num: int
    overrides: list[str]
    dir: Path | None
    status: str  # "ok" | "failed"
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, str]:
        out = {}
        for o in self.overrides:
            if o == RESUMED:
                continue  # how the job was finished, not what it is
            key, _, value = o.partition("=")
            out[key.lstrip("+~")] = value
        return out


def read_job(job_dir: Path) -> Job:
    """A job's overrides, number and outcome from its folder."""
    hydra_dir = job_dir / ".hydra"
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"))]
    num = -1
    if (hydra_dir / "hydra.yaml").is_file():
        # a plain int; the rest of the saved hydra config (interpolations) is never resolved
        num = int(OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.job.num", default=-1))
    metrics_file = job_dir / "metrics.json"
    if not metrics_file.is_file():
        return Job(num, overrides, job_dir, "failed", "no metrics.json: the job did not finish (killed, timed out or running)")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as e:
        return Job(num, overrides, job_dir, "failed", f"unreadable metrics.json: {e}")
    if metrics.get("status", "completed") != "completed":
        return Job(num, overrides, job_dir, "failed", str(metrics.get("error", metrics.get("status"))), metrics)
    return Job(num, overrides, job_dir, "ok", "", metrics)


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The overrides of every job a grid sweep launches (BasicSweeper), from ``multirun.yaml``."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    return grid_jobs(OmegaConf.load(path))


GRID_SWEEPERS = ("BasicSweeper", "ResumableSweeper")  # Hydra's grid sweeper, and the one that finishes a sweep


def grid_jobs(cfg: Any) -> list[list[str]] | None:
    """The overrides of every job of a grid multirun config (``multirun.yaml`` or the composed one), in
    job-number order; None for sweepers that decide their trials as they go (Optuna & co)."""
    target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default=""))
    if not target.endswith(GRID_SWEEPERS):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lightning_modules.compat import basic_sweeper_class

    node = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    args = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in cfg.hydra.overrides.task]
    parsed = OverridesParser.create().parse_overrides(args)
    batches = basic_sweeper_class().split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job of the sweep, ordered by job number; missing grid jobs as failed rows."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist")
    jobs = [read_job(p.parent.parent) for p in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"))]
    jobs = [j for j in jobs if j.dir != sweep_dir]
    expected = expected_jobs(sweep_dir)
    if expected is not None:
        seen = {j.num for j in jobs}
        jobs += [
            Job(i, ov, None, "failed", "not started: the job has no folder")
            for i, ov in enumerate(expected)
            if i not in seen
        ]
    return sorted(jobs, key=lambda j: (j.num, str(j.dir)))


def swept_keys(jobs: Sequence[Job]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, in order of appearance; overrides common to all)."""
    order: list[str] = []
    for j in jobs:
        for k in j.values:
            if k not in order and not k.startswith(IGNORED_KEYS):
                order.append(k)
    swept = [k for k in order if len({j.values.get(k) for j in jobs}) > 1]
    common = {k: jobs[0].values[k] for k in order if k not in swept and k in jobs[0].values}
    return swept, common


VARIANT_KEY = "variant"  # the column of the SRF-GAN pipeline's report.csv: one row per variant


def variant_rows(job: Job) -> list[dict[str, Any]] | None:
    """A job's rows from the per-variant ``report.csv`` the SRF-GAN pipeline writes into its folder
    (``variant``, ``status``, ``error`` and the metrics, back in ``metrics.json``'s units).

    None when the folder has no such file (a training job), or when the job failed before the
    pipeline's end (no ``variant`` in its ``metrics.json``: a report.csv there is an earlier run's).
    """
    path = None if job.dir is None else job.dir / "report.csv"
    if path is None or not path.is_file() or (job.status != "ok" and VARIANT_KEY not in job.metrics):
        return None
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    if not table or VARIANT_KEY not in table[0]:
        return None
    rows = []
    for r in table:
        row: dict[str, Any] = {"job": job.num, "status": r.get("status") or "ok", "error": r.get("error") or "",
                               VARIANT_KEY: r[VARIANT_KEY]}
        for header, text in r.items():
            metric = _csv_metric(header or "")
            if metric is not None and text:
                try:
                    row[metric[0]] = float(text) * metric[1]
                except ValueError:
                    pass  # not a number: the cell stays empty in the sweep's report
        rows.append(row)
    return rows


def job_rows(jobs: Sequence[Job], keys: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for j in jobs:
        row = {"job": j.num, "status": j.status, "error": j.error}
        row.update({k: j.values.get(k, "") for k in keys})
        row.update({k: v for k, v in j.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- writing
@dataclass
class ReportFiles:
    md: Path
    csv: Path
    png: Path | None
    mean_csv: Path | None = None
    baseline_error: str | None = None  # the baseline selection's error (the report has no deltas then)


PARAMS_CSV, TIME_CSV = "params [M]", "time [ms]"  # report.csv's headers (AP: "bbox/AP [%]" ...)


def _metric_columns(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """(row key, md header, csv header) of the metrics present in any row."""
    cols = []
    for t in IOU_TYPES:
        for name in AP_NAMES:
            key = f"{t}/{name}"
            if any(key in r for r in rows):
                head = name if t == "bbox" else f"{t} {name}"
                cols.append((key, head, f"{key} [%]"))
    if any("params_trainable" in r for r in rows):
        cols.append(("params_trainable", "params (M)", PARAMS_CSV))
    if any("time_ms" in r for r in rows):
        cols.append(("time_ms", "time (ms)", TIME_CSV))
    return cols


def _csv_metric(header: str) -> tuple[str, float] | None:
    """(``metrics.json`` key, factor from the report's unit back to it) of a ``report.csv`` column
    (the inverse of :func:`_metric_columns`); None for other columns."""
    if header == PARAMS_CSV:
        return "params_trainable", 1e6
    if header == TIME_CSV:
        return "time_ms", 1.0
    key = header.removesuffix(" [%]")
    return (key, 0.01) if key != header and key.split("/")[0] in IOU_TYPES else None


def _display(key: str, value: Any) -> float | None:
    """A metric in the report's unit: AP in percent, parameters in millions, time in ms."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    v = float(value)
    if key.split("/")[0] in IOU_TYPES:
        return None if v < 0 else 100 * v  # COCO's -1: no ground truth in that size range
    if key == "params_trainable":
        return v / 1e6
    return v


def _fmt(key: str, v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if key in ("params_trainable", "time_ms") else f"{v:.1f}"


def _config_label(row: dict, keys: Sequence[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={row.get(k, '')}" for k in keys) or "all jobs"


@dataclass
class ConfigStats:
    """One configuration's jobs (those differing only in ``seed``) and its metric statistics."""

    values: dict[str, Any]
    jobs: int
    ok: int
    mean: dict[str, float | None]
    std: dict[str, float | None]
    # metric -> {seed: value} over the completed jobs (in the report's unit; seed "" when not swept)
    per_seed: dict[str, dict[str, float]] = field(default_factory=dict)


def aggregate(rows: Sequence[dict], columns: Sequence[str], metrics: Sequence[str]) -> list[ConfigStats]:
    """Mean and sample std (n-1) over the completed jobs of each configuration, in order of appearance."""
    keys = [c for c in columns if c != SEED_KEY]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(k, "")) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        ok = [r for r in members if r.get("status", "ok") == "ok"]
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        per_seed: dict[str, dict[str, float]] = {}
        for m in metrics:
            seeded = [(str(r.get(SEED_KEY, "")), _display(m, r.get(m))) for r in ok]
            vals = [v for _, v in seeded if v is not None]
            mean[m] = statistics.fmean(vals) if vals else None
            std[m] = statistics.stdev(vals) if len(vals) > 1 else None
            by_seed: dict[str, list[float]] = {}
            for seed, v in seeded:
                if v is not None:
                    by_seed.setdefault(seed, []).append(v)
            per_seed[m] = {seed: statistics.fmean(vs) for seed, vs in by_seed.items()}  # a rerun seed: its mean
        out.append(ConfigStats({k: members[0].get(k, "") for k in keys}, len(members), len(ok), mean, std, per_seed))
    return out


# ------------------------------------------------------------------------ baseline deltas
BASELINE_KEY = "hydra.callbacks.report.baseline"
DELTA_METRICS = ("bbox/AP", "segm/AP")  # the metrics a difference to the baseline is given for
# t_{0.975, df} for df = 1..30 (two-sided 95 %), the normal quantile beyond
# hand-written: scipy is no dependency of ours (optuna pulls it in; the tests check this table against it)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """Student's t quantile t_{0.975, df} (the 95 % two-sided interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df}: expected >= 1")
    return T975[df - 1] if df <= len(T975) else statistics.NormalDist().inv_cdf(0.975)


def paired_difference(row: Mapping[str, float], base: Mapping[str, float]) -> tuple[float, float, int]:
    """(mean of row[s] - base[s] over the seeds s in both, the half-width of its 95 % CI, n).

    The CI is t_{0.975, n-1} * sd(diff) / sqrt(n) (sample sd); NaN when n = 1; the mean is NaN
    when no seed is in both.
    """
    diffs = [row[s] - base[s] for s in row if s in base]
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(diffs)
    if n == 1:
        return mean, math.nan, 1
    return mean, t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n), n


class BaselineError(ValueError):
    """A baseline selection that is malformed or matches no row (the report is written without deltas)."""


def _comparable(value: Any) -> str:
    """A value as Hydra reads it, for comparing a selection with a row: Hydra's sweeper writes the
    overrides of a job as ``neck.global_feature=False`` and ``lr=0.001`` for ``false`` and ``1e-3``
    (booleans in any case, numbers by value, null/None alike)."""
    text = str(value)
    low = text.lower()
    if low in ("true", "false"):
        return low
    if low in ("null", "none"):
        return "null"
    try:
        return repr(float(text))
    except ValueError:
        return text


def baseline_specs(baseline: str | Sequence[str] | None, key: str = BASELINE_KEY) -> list[dict[str, str]]:
    """``"a=1 b=2"`` or a list of such strings -> ``[{"a": "1", "b": "2"}, ...]`` (none: [])."""
    if baseline is None:
        return []
    specs = [baseline] if isinstance(baseline, str) else [str(b) for b in baseline]
    out = []
    for spec in specs:
        terms: dict[str, str] = {}
        for term in spec.split():
            k, sep, v = term.partition("=")
            if not sep or not k.lstrip("+~"):
                raise BaselineError(f"{key}={baseline!r}: {term!r} is not a key=value selection "
                                    "(e.g. 'neck.global_feature=false neck.channel_rescaling=false')")
            terms[k.lstrip("+~")] = v
        if terms:
            out.append(terms)
    return out


def select_baselines(
    configs: Sequence[Mapping[str, Any]], baseline: str | Sequence[str] | None, key: str = BASELINE_KEY
) -> list[int] | None:
    """Each configuration's baseline (an index into ``configs``), or None when there is no baseline.

    A configuration is a candidate if its values match one of the specs (every ``key=value`` of
    it). Each configuration's baseline is the candidate that agrees with it on the most keys the
    specs do not name; ties go to the nearest candidate above it (at or above: a candidate is its
    own baseline), else the nearest below. Raises :class:`BaselineError` (one line: ``key``, the
    value, the rows) when no spec matches a configuration. Of several specs, one that matches nothing
    is skipped with a warning naming it: a preset's list names every baseline of its full table
    (SMSL Table 2: RetinaNet, Mask and Cascade R-CNN's FPN rows), a sweep over some of its rows keeps
    the differences to the baselines it has.
    """
    specs = baseline_specs(baseline, key)
    if not specs:
        return None
    candidates: set[int] = set()
    unmatched: list[str] = []
    for spec in specs:
        match = {i for i, c in enumerate(configs)
                 if all(k in c and _comparable(c[k]) == _comparable(v) for k, v in spec.items())}
        if not match:
            unmatched.append(" ".join(f"{k}={v}" for k, v in spec.items()))
        candidates |= match
    if unmatched:
        rows = "; ".join(" ".join(f"{k}={v}" for k, v in c.items()) or "(one row)" for c in configs)
        named = ", ".join(repr(u) for u in unmatched)
        if not candidates:
            raise BaselineError(f"{key}={baseline!r}: {named} {'matches' if len(unmatched) == 1 else 'match'} "
                                f"no row; rows: {rows}")
        log.warning("%s: %s matches no row of this sweep, skipped (rows: %s)", key, named, rows)
    named_keys = {k for spec in specs for k in spec}
    out = []
    for i, c in enumerate(configs):
        others = [k for k in c if k not in named_keys]
        score = {j: sum(_comparable(configs[j].get(k)) == _comparable(c[k]) for k in others) for j in candidates}
        best = max(score.values())
        tied = sorted(j for j in candidates if score[j] == best)
        above = [j for j in tied if j <= i]
        out.append(above[-1] if above else tied[0])
    return out


@dataclass
class Deltas:
    """Each configuration's baseline (index) and, per metric of ``DELTA_METRICS``, the paired
    difference to it: (mean, 95 % CI half-width, n) in the report's unit."""

    baseline: list[int]
    diff: list[dict[str, tuple[float, float, int]]]


def deltas(stats: Sequence[ConfigStats], baseline: list[int], metrics: Sequence[str]) -> Deltas:
    diff = [{m: paired_difference(s.per_seed.get(m, {}), stats[b].per_seed.get(m, {})) for m in metrics}
            for s, b in zip(stats, baseline)]
    return Deltas(baseline, diff)


def _delta_cell(d: tuple[float, float, int], is_baseline: bool) -> str:
    """``[+0.9 ± 0.6]``; ``[baseline]``; ``[n/a]`` without a seed in both rows; ``± n/a`` with one."""
    if is_baseline:
        return "[baseline]"
    mean, ci, _ = d
    if math.isnan(mean):
        return "[n/a]"
    return f"[{mean:+.1f} ± {'n/a' if math.isnan(ci) else f'{ci:.1f}'}]"


def _sig_cell(d: tuple[float, float, int], is_baseline: bool) -> str:
    """``yes`` when the 95 % CI excludes 0, ``no`` when not, ``n/a`` without a CI, ``–`` for a baseline."""
    if is_baseline:
        return "–"
    mean, ci, _ = d
    if math.isnan(mean) or math.isnan(ci):
        return "n/a"
    return "yes" if abs(mean) > ci else "no"


def write_report(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    title: str,
    columns: Sequence[str],
    notes: Sequence[str] = (),
    plot: bool = True,
    baseline: str | Sequence[str] | None = None,
    baseline_key: str = BASELINE_KEY,
) -> ReportFiles:
    """Write ``report.md``, ``report.csv`` (and ``report_mean.csv``, ``report.png``) into ``out_dir``.

    Args:
        rows: one dict per job / variant: the identifying ``columns``, ``status`` (``ok`` or
            ``failed``; default ``ok``), ``error`` (first line, for failed rows), and the
            metrics as ``metrics.json`` holds them: ``bbox/AP`` … ``segm/APl`` in 0–1 (written
            in percent), ``params_trainable`` (written in millions), ``time_ms``. A ``job``
            key, when present, is the first column.
        out_dir: folder to write into.
        title: the markdown title (and the plot's).
        columns: the identifying columns, in order (e.g. the swept keys, or ``["variant"]``).
            When ``seed`` is one of them, rows that differ only in ``seed`` are one
            configuration: ``report.md`` adds a mean ± std table and ``report_mean.csv``.
        notes: lines printed under the title.
        plot: write ``report.png``.
        baseline: the baseline rows, ``key=value`` selections over ``columns`` (several in one
            string separated by spaces; a list for several baselines; :func:`select_baselines`).
            The mean table (then written also without seeds) and ``report_mean.csv`` add each
            configuration's paired difference to its baseline with a 95 % CI for bbox AP (and
            mask AP). A selection that matches nothing is logged and noted in ``report.md``, and
            the report is written without deltas (``ReportFiles.baseline_error``).
        baseline_key: the setting ``baseline`` came from, for the error message.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(columns)
    metric_cols = _metric_columns(rows)
    lead = ["job"] if any("job" in r for r in rows) else []
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    metric_keys = [k for k, _, _ in metric_cols]
    stats = aggregate(rows, columns, metric_keys)
    delta_metrics = [m for m in DELTA_METRICS if m in metric_keys]
    diffs: Deltas | None = None
    baseline_error = None
    named: list[str] = []  # the keys the baseline selections name: report.md's label of a row's baseline
    try:
        chosen = select_baselines([s.values for s in stats], baseline, baseline_key)
        if chosen is not None:
            diffs = deltas(stats, chosen, delta_metrics)
            named = [c for c in columns if any(c in spec for spec in baseline_specs(baseline, baseline_key))]
    except BaselineError as e:
        baseline_error = str(e)
        log.error(f"report {out_dir}: no differences to a baseline: {baseline_error}")
        notes = [*notes, f"No differences to a baseline: {baseline_error}"]

    # per-row table
    header = lead + ["status"] + columns + [h for _, h, _ in metric_cols] + (["error"] if failed else [])
    body = []
    for r in rows:
        cells = [r.get(c, "") for c in lead] + [r.get("status", "ok")] + [r.get(c, "") for c in columns]
        cells += [_fmt(k, _display(k, r.get(k))) for k, _, _ in metric_cols]
        if failed:
            cells.append(r.get("error", "") or "")
        body.append(cells)
    md = [f"# {title}", ""]
    md += [f"{n}  " for n in notes]
    md += [
        f"{len(rows)} rows, {len(failed)} failed. AP: COCO, in percent; params: trainable, in millions; "
        "time: median forward time per image, ms.",
        "",
        *markdown_table(header, body),
    ]

    files = ReportFiles(md=out_dir / "report.md", csv=out_dir / "report.csv", png=None, baseline_error=baseline_error)
    with open(files.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(lead + ["status"] + columns + [c for _, _, c in metric_cols] + ["error"])
        for r in rows:
            vals = [_display(k, r.get(k)) for k, _, _ in metric_cols]
            w.writerow([r.get(c, "") for c in lead] + [r.get("status", "ok")] + [r.get(c, "") for c in columns]
                       + ["" if v is None else round(v, 4) for v in vals] + [r.get("error", "") or ""])

    seeds = SEED_KEY in columns and any(s.jobs > 1 for s in stats)
    keys = [c for c in columns if c != SEED_KEY]
    if seeds or diffs is not None:
        sig_heads = [("sig." if m == "bbox/AP" else f"{m.split('/')[0]} sig.") for m in delta_metrics]
        head = keys + ["seeds (ok/all)"] + [h for _, h, _ in metric_cols]
        if diffs is not None:
            head += sig_heads + ["baseline"]
        agg_body = []
        for i, s in enumerate(stats):
            own = diffs is not None and diffs.baseline[i] == i
            cells = [s.values[k] for k in keys] + [f"{s.ok}/{s.jobs}"]
            for k in metric_keys:
                m, sd = s.mean[k], s.std[k]
                cell = _fmt(k, m) if sd is None or m is None else f"{_fmt(k, m)} ± {_fmt(k, sd)}"
                if diffs is not None and k in delta_metrics and m is not None:  # no mask AP in a box row: "–"
                    cell += " " + _delta_cell(diffs.diff[i][k], own)
                cells.append(cell)
            if diffs is not None:
                cells += [_sig_cell(diffs.diff[i][k], own) if s.mean[k] is not None else "–" for k in delta_metrics]
                cells.append("–" if own else _config_label(stats[diffs.baseline[i]].values, named))
            agg_body.append(cells)
        heading = "Mean ± std over seeds" if seeds else "Per configuration"
        md += ["", f"## {heading}" + (", difference to the baseline" if diffs is not None else ""), ""]
        if diffs is not None:
            md += ["[difference ± h]: the mean over seeds of (row − its baseline row), paired by seed (the seeds "
                   "both completed), ± the half-width h of its 95 % confidence interval, t(0.975, n−1)·sd/√n "
                   "(`n/a` with one seed); sig.: the interval excludes 0.", ""]
        md += markdown_table(head, agg_body)
        files.mean_csv = out_dir / "report_mean.csv"
        with open(files.mean_csv, "w", newline="") as f:
            w = csv.writer(f)
            delta_head = [c for m in delta_metrics for c in (f"delta {m} [%]", f"delta {m} ci95 [%]")]
            w.writerow(keys + ["jobs", "ok"] + [c for k, _, c in metric_cols for c in (f"{c} mean", f"{c} std")]
                       + (delta_head + ["baseline"] if diffs is not None else []))
            for i, s in enumerate(stats):
                vals = [v for k in metric_keys for v in (s.mean[k], s.std[k])]
                out = [s.values[k] for k in keys] + [s.jobs, s.ok] + ["" if v is None else round(v, 4) for v in vals]
                if diffs is not None:
                    own = diffs.baseline[i] == i  # a baseline row: no difference, no interval
                    for m in delta_metrics:
                        mean, ci, _ = diffs.diff[i][m]
                        out += ["" if own or math.isnan(v) else round(v, 4) for v in (mean, ci)]
                    out.append(_config_label(stats[diffs.baseline[i]].values, keys))  # all keys: unambiguous
                w.writerow(out)
    files.md.write_text("\n".join(md) + "\n")
    if plot and rows:
        files.png = _plot(stats, keys, metric_keys, out_dir / "report.png", title, diffs)
    return files


def _plot(
    stats: Sequence[ConfigStats], keys: Sequence[str], metrics: Sequence[str], path: Path, title: str,
    diffs: Deltas | None = None,
) -> Path:
    """Each configuration's mean ± std (marker, error bar) with its seeds' values beside it, on an
    axis spanning the values (differences of a point are visible; bars from 0 would hide them);
    with a baseline, each mean is labelled with its difference to its baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [m for m in ("bbox/AP", "segm/AP") if m in metrics] or ["bbox/AP"]
    n = len(stats)
    width = 0.8 / len(series)
    # one override per line under its column: long sweep keys stay readable and inside the figure;
    # columns as wide as their longest line (7 pt: ~0.07 in a character), else slanted labels
    labels = [_config_label(s.values, keys).replace(", ", "\n") for s in stats]
    if diffs is not None:
        labels = [f"{lab}\n[baseline]" if diffs.baseline[j] == j else lab for j, lab in enumerate(labels)]
    column = max(1.1, 0.07 * max((len(line) for lab in labels for line in lab.split("\n")), default=0))
    upright = column * n + 2 <= 16
    fig, ax = plt.subplots(figsize=(max(6.0, (column if upright else 1.1) * n + 2), 4.5))
    span: list[float] = []  # every value drawn: means ± std and the seeds' points
    for i, m in enumerate(series):
        color = f"C{i}"
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(n)]
        drawn = [(x, s) for x, s in zip(xs, stats) if s.mean.get(m) is not None]
        means = [s.mean[m] for _, s in drawn]
        errs = [s.std.get(m) or 0.0 for _, s in drawn]
        label = m.replace("bbox/", "box ").replace("segm/", "mask ")
        ax.errorbar([x - 0.15 * width for x, _ in drawn], means, yerr=errs, fmt="D", color=color, capsize=4,
                    label=f"{label}, mean ± std")
        span += [v + e for v, e in zip(means, errs)] + [v - e for v, e in zip(means, errs)]
        px, py = [], []
        for x, s in drawn:
            points = list(s.per_seed.get(m, {}).values())
            for k, v in enumerate(points):
                px.append(x + 0.15 * width + (k - (len(points) - 1) / 2) * 0.06 * width)
                py.append(v)
        if px:
            ax.scatter(px, py, s=16, facecolors="none", edgecolors=color, linewidths=1, label=f"{label}, per seed")
            span += py
        if diffs is not None and m in DELTA_METRICS:
            for j, (x, s) in enumerate(zip(xs, stats)):
                if s.mean.get(m) is None:
                    continue
                own = diffs.baseline[j] == j
                d = diffs.diff[j][m][0]
                if own or not math.isnan(d):
                    ax.annotate("base" if own else f"{d:+.1f}", (x - 0.15 * width, s.mean[m] + (s.std.get(m) or 0.0)),
                                xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                                color=color)
    if span:
        lo, hi = min(span), max(span)
        pad = 0.15 * (hi - lo) if hi > lo else max(0.5, 0.05 * abs(hi))
        ax.set_ylim(lo - pad, hi + 2 * pad)  # room above for the differences' labels
    bottom = ax.get_ylim()[0]
    for i, m in enumerate(series):
        for j, s in enumerate(stats):
            if s.mean.get(m) is None and s.ok == 0:  # completed without this metric (no masks): nothing drawn
                x = j + (i - (len(series) - 1) / 2) * width
                ax.text(x, bottom, "failed", rotation=90, ha="center", va="bottom", color="red", fontsize=8)
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, fontsize=7, rotation=0 if upright else 30, ha="center" if upright else "right")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if span:  # beside the axes: no point hidden (and no slow search for the "best" place)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")  # the legend beside the axes included
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- W&B
def log_report_to_wandb(files: ReportFiles, wandb_info: dict[str, Any], save_dir: str | Path) -> str:
    """Log ``report.csv`` as a table and ``report.png`` to a short run in the jobs' group.

    ``wandb_info`` is what a job recorded in its ``metrics.json`` (project, entity, group,
    mode): the report run lands beside the jobs, offline when they were offline (upload
    with ``wandb sync``). Returns the run's folder.
    """
    import wandb

    with open(files.csv, newline="") as f:
        table_rows = list(csv.reader(f))
    run = wandb.init(
        project=wandb_info.get("project"),
        entity=wandb_info.get("entity"),
        group=wandb_info.get("group"),
        job_type="report",
        name=f"report {wandb_info.get('group') or ''}".strip(),
        dir=str(save_dir),
        mode=wandb_info.get("mode") or None,
        config={"report_dir": str(files.md.parent)},
    )
    try:
        payload: dict[str, Any] = {"report": wandb.Table(columns=table_rows[0], data=table_rows[1:])}
        if files.mean_csv is not None:
            with open(files.mean_csv, newline="") as f:
                mean_rows = list(csv.reader(f))
            payload["report_mean"] = wandb.Table(columns=mean_rows[0], data=mean_rows[1:])
        if files.png is not None:
            payload["report_plot"] = wandb.Image(str(files.png))
        run.log(payload)
        return str(run.dir)
    finally:
        run.finish()


# -------------------------------------------------------------------------------- sweeps
@dataclass
class SweepReportResult:
    files: ReportFiles
    jobs: int
    failed: list[str]  # "job <num>" of each failed row
    wandb_dir: str | None = None


def sweep_rows(jobs: Sequence[Job], keys: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the report's rows, their identifying columns): one row per job, or, when a job folder holds
    the SRF-GAN pipeline's report.csv with several variants, one row per variant of each job that
    has one (``variant`` then leads the columns: seeds aggregate per variant); a job without
    that file stays one row (``variant`` empty)."""
    per_job = [variant_rows(j) for j in jobs]
    if not any(v is not None and len(v) > 1 for v in per_job) or VARIANT_KEY in keys:
        return job_rows(jobs, keys), list(keys)
    columns = [VARIANT_KEY, *keys]
    rows: list[dict[str, Any]] = []
    for job, variants in zip(jobs, per_job):
        if variants is None:
            rows += job_rows([job], columns)
        else:
            rows += [{**v, **{k: job.values.get(k, "") for k in keys}} for v in variants]
    return rows, columns


def write_sweep_report(
    sweep_dir: str | Path,
    wandb: bool = True,
    title: str | None = None,
    baseline: str | Sequence[str] | None = None,
    baseline_key: str = BASELINE_KEY,
) -> SweepReportResult:
    """Collect a multirun folder's jobs and write its report (and log it to W&B if the jobs did).

    ``baseline``: the baseline rows (``hydra.callbacks.report.baseline``; :func:`write_report`),
    ``baseline_key`` the setting it came from, for its error message.
    """
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job folders (<job>/.hydra/overrides.yaml) in this sweep folder")
    keys, common = swept_keys(jobs)
    rows, keys = sweep_rows(jobs, keys)
    notes = [f"Sweep: `{sweep_dir}`"]
    if keys[:1] == [VARIANT_KEY]:
        notes.append("One row per variant of each job (the SRF-GAN pipeline's `report.csv` in its folder)")
    if common:
        notes.append("Common overrides: `" + " ".join(f"{k}={v}" for k, v in common.items()) + "`")
    # which weights and which images the numbers come from (metrics.json's eval_checkpoint / eval_split)
    origins = sorted({(str(j.metrics.get("eval_checkpoint")), str(j.metrics.get("eval_split")))
                      for j in jobs if j.metrics.get("eval_split") is not None})
    if origins:
        notes.append("Numbers from: " + "; ".join(f"the {c} checkpoint on split `{s}`" for c, s in origins))
    optuna = sweep_dir / "optimization_results.yaml"
    if optuna.is_file():
        best = OmegaConf.load(optuna)
        notes.append(f"Optuna best value {best.get('best_value')} with `{OmegaConf.to_container(best.best_params)}`")
    files = write_report(rows, sweep_dir, title or f"Sweep {sweep_dir.name}", keys, notes, baseline=baseline,
                         baseline_key=baseline_key)
    failed = [f"job {j.num}" for j in jobs if j.status != "ok"]
    result = SweepReportResult(files, len(jobs), failed)
    log.info(f"report: {files.md} ({len(jobs)} jobs, {len(failed)} failed)")
    infos = [j.metrics["wandb"] for j in jobs if isinstance(j.metrics.get("wandb"), dict)]
    if wandb and infos:
        result.wandb_dir = log_report_to_wandb(files, infos[0], sweep_dir)
    return result


def sweep_baseline(sweep_dir: Path) -> str | list[str] | None:
    """The baseline the sweep itself was run with (``hydra.callbacks.report.baseline`` in its
    ``multirun.yaml``, set by a preset or on the command line); None without one."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    value = OmegaConf.select(OmegaConf.load(path), BASELINE_KEY, default=None)
    if value is None or isinstance(value, str):
        return value
    return [str(v) for v in OmegaConf.to_container(value)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pyramidlab-report",
        description="Collect a Hydra multirun's metrics.json files into report.md, report.csv and report.png.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (holds one folder per job)")
    parser.add_argument("--title", default=None, help="report title (default: the folder's name)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    parser.add_argument("--baseline", action="append", default=None, metavar="'KEY=VALUE [KEY=VALUE ...]'",
                        help="the baseline rows (repeat for several, e.g. one per detector): the mean table adds "
                             "each row's difference to its baseline with a 95%% CI (default: the sweep's own "
                             f"{BASELINE_KEY}, from its multirun.yaml)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="no differences to a baseline, even where the sweep named one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    baseline, key = args.baseline, "--baseline"
    if args.no_baseline:
        baseline = None
    elif baseline is None and args.sweep_dir.is_dir():
        baseline, key = sweep_baseline(args.sweep_dir), f"{BASELINE_KEY} (multirun.yaml)"
        if baseline is not None:
            log.info(f"report: baseline {baseline!r} from {args.sweep_dir / 'multirun.yaml'} "
                     "(--baseline to choose another, --no-baseline for none)")
    try:
        result = write_sweep_report(args.sweep_dir, wandb=not args.no_wandb, title=args.title,
                                    baseline=baseline, baseline_key=key)
    except FileNotFoundError as e:
        parser.exit(2, f"pyramidlab-report: {e}\n")
    print(result.files.md.read_text())
    for p in (result.files.md, result.files.csv, result.files.mean_csv, result.files.png):
        if p is not None:
            print(p)


if __name__ == "__main__":
    main()
