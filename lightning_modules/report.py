"""pyramidlab-report SWEEP_DIR: one table (and plot) per sweep, like the papers' tables.

Reads every job folder of a Hydra multirun (``<job>/.hydra/overrides.yaml`` and
``<job>/metrics.json``) and writes into SWEEP_DIR:

- ``report.md``: one row per job (job number, status, the swept keys, AP metrics in
  percent, trainable parameters in millions, inference time in ms) and, when ``seed`` is
  swept, a second table with mean ± std per configuration (the jobs that differ only in
  ``seed``);
- ``report.csv``: the per-job rows (machine-readable, same units); ``report_mean.csv``:
  the per-configuration means and standard deviations (only when ``seed`` is swept);
- ``report.png``: bbox AP (and mask AP) per configuration, error bars = std over seeds.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

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
        cols.append(("params_trainable", "params (M)", "params [M]"))
    if any("time_ms" in r for r in rows):
        cols.append(("time_ms", "time (ms)", "time [ms]"))
    return cols


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


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in body]
    return "\n".join(lines)


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
        for m in metrics:
            vals = [v for v in (_display(m, r.get(m)) for r in ok) if v is not None]
            mean[m] = statistics.fmean(vals) if vals else None
            std[m] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(ConfigStats({k: members[0].get(k, "") for k in keys}, len(members), len(ok), mean, std))
    return out


def write_report(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    title: str,
    columns: Sequence[str],
    notes: Sequence[str] = (),
    plot: bool = True,
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
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(columns)
    metric_cols = _metric_columns(rows)
    lead = ["job"] if any("job" in r for r in rows) else []
    failed = [r for r in rows if r.get("status", "ok") != "ok"]

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
        _md_table(header, body),
    ]

    files = ReportFiles(md=out_dir / "report.md", csv=out_dir / "report.csv", png=None)
    with open(files.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(lead + ["status"] + columns + [c for _, _, c in metric_cols] + ["error"])
        for r in rows:
            vals = [_display(k, r.get(k)) for k, _, _ in metric_cols]
            w.writerow([r.get(c, "") for c in lead] + [r.get("status", "ok")] + [r.get(c, "") for c in columns]
                       + ["" if v is None else round(v, 4) for v in vals] + [r.get("error", "") or ""])

    metric_keys = [k for k, _, _ in metric_cols]
    stats = aggregate(rows, columns, metric_keys)
    seeds = SEED_KEY in columns and any(s.jobs > 1 for s in stats)
    if seeds:
        keys = [c for c in columns if c != SEED_KEY]
        head = keys + ["seeds (ok/all)"] + [h for _, h, _ in metric_cols]
        agg_body = []
        for s in stats:
            cells = [s.values[k] for k in keys] + [f"{s.ok}/{s.jobs}"]
            for k in metric_keys:
                m, sd = s.mean[k], s.std[k]
                cells.append(_fmt(k, m) if sd is None or m is None else f"{_fmt(k, m)} ± {_fmt(k, sd)}")
            agg_body.append(cells)
        md += ["", "## Mean ± std over seeds", "", _md_table(head, agg_body)]
        files.mean_csv = out_dir / "report_mean.csv"
        with open(files.mean_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys + ["jobs", "ok"] + [c for k, _, c in metric_cols for c in (f"{c} mean", f"{c} std")])
            for s in stats:
                vals = [v for k in metric_keys for v in (s.mean[k], s.std[k])]
                w.writerow([s.values[k] for k in keys] + [s.jobs, s.ok]
                           + ["" if v is None else round(v, 4) for v in vals])
    files.md.write_text("\n".join(md) + "\n")
    if plot and rows:
        files.png = _plot(stats, [c for c in columns if c != SEED_KEY], metric_keys, out_dir / "report.png", title)
    return files


def _plot(stats: Sequence[ConfigStats], keys: Sequence[str], metrics: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [m for m in ("bbox/AP", "segm/AP") if m in metrics] or ["bbox/AP"]
    n = len(stats)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n + 2), 4.5))
    for i, m in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(n)]
        means = [s.mean.get(m) or 0.0 for s in stats]
        errs = [s.std.get(m) or 0.0 for s in stats]
        ax.bar(xs, means, width, yerr=errs, capsize=4, label=m.replace("bbox/", "box ").replace("segm/", "mask "))
        for x, s in zip(xs, stats):
            if s.mean.get(m) is None:
                ax.text(x, 0, "failed", rotation=90, ha="center", va="bottom", color="red", fontsize=8)
    ax.set_xticks(range(n))
    ax.set_xticklabels([_config_label(s.values, keys) for s in stats], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
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


def write_sweep_report(sweep_dir: str | Path, wandb: bool = True, title: str | None = None) -> SweepReportResult:
    """Collect a multirun folder's jobs and write its report (and log it to W&B if the jobs did)."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job folders (<job>/.hydra/overrides.yaml) in this sweep folder")
    keys, common = swept_keys(jobs)
    rows = job_rows(jobs, keys)
    notes = [f"Sweep: `{sweep_dir}`"]
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
    files = write_report(rows, sweep_dir, title or f"Sweep {sweep_dir.name}", keys, notes)
    failed = [f"job {j.num}" for j in jobs if j.status != "ok"]
    result = SweepReportResult(files, len(jobs), failed)
    log.info(f"report: {files.md} ({len(jobs)} jobs, {len(failed)} failed)")
    infos = [j.metrics["wandb"] for j in jobs if isinstance(j.metrics.get("wandb"), dict)]
    if wandb and infos:
        result.wandb_dir = log_report_to_wandb(files, infos[0], sweep_dir)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pyramidlab-report",
        description="Collect a Hydra multirun's metrics.json files into report.md, report.csv and report.png.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (holds one folder per job)")
    parser.add_argument("--title", default=None, help="report title (default: the folder's name)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = write_sweep_report(args.sweep_dir, wandb=not args.no_wandb, title=args.title)
    except FileNotFoundError as e:
        parser.exit(2, f"pyramidlab-report: {e}\n")
    print(result.files.md.read_text())
    for p in (result.files.md, result.files.csv, result.files.mean_csv, result.files.png):
        if p is not None:
            print(p)


if __name__ == "__main__":
    main()
