"""Everything that talks to Hydra's runtime beyond composing a config.

- :func:`run_guarded`: the outcome of one job. A failing job writes ``metrics.json`` with
  ``status: failed`` and the error's first line; in a multirun it returns ``None`` so the
  sweep goes on (Hydra's ``BasicSweeper`` would re-raise a job's exception after the
  batch, which skips ``on_multirun_end`` and so the report); in a single run it re-raises
  so the process exits non-zero.
- :class:`SweepReport`: a Hydra callback (configured in ``conf/hydra/default.yaml``) that
  writes ``report.md/csv/png`` when a multirun ends.
- :func:`main_with_hints`: a console-script wrapper that adds "did you mean" to Hydra's
  unknown-key error and makes a multirun with failed jobs exit non-zero.
- The ``pyramidlab.job_dirname`` resolver: readable sweep sub-folder names.
- :func:`ddp_child_command`: the command line of a DDP child process (Lightning's own
  re-runs the whole sweep in every child of a multirun job).

Importing this module registers the resolver. Hydra instantiates the callback (so imports
this module) when a multirun starts, before any job folder name is resolved; the entry
points import it too.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from detection.atomic import write_json_atomic

log = logging.getLogger("pyramidlab")

T = TypeVar("T")

JOB_DIRNAME_RESOLVER = "pyramidlab.job_dirname"
MAX_DIRNAME = 120  # characters of the overrides kept in a job folder name (file names stop at 255 bytes)


def job_dirname(num: int | str, override_dirname: str) -> str:
    """``<num>_<overrides>``: path separators become ``-``; long names are cut and end with a hash.

    Hydra's ``override_dirname`` keeps ``/`` from values such as ``experiment=smsl/table1``
    or a path, which would nest folders; a dozen overrides exceed the file-name limit.
    """
    name = str(override_dirname).replace(os.sep, "-")
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_DIRNAME]}-{digest}"
    return f"{num}_{name}" if name else str(num)


def previous_wandb_id(output_dir: str) -> str | None:
    """The id of the W&B run logged from this run folder before (the newest), or None.

    ``conf/logger/wandb.yaml`` passes it as ``id`` with ``resume: allow``: a run resumed in its
    folder (``ckpt_path=last``, a sweep rerun) continues the same W&B run instead of starting a new one.
    W&B names its folders ``[offline-]run-<date>_<time>-<id>``.
    """
    runs = [p for p in Path(str(output_dir), "wandb").glob("*run-*-*") if p.is_dir() and not p.is_symlink()]
    if not runs:
        return None
    return max(runs, key=lambda p: p.name.removeprefix("offline-")).name.rsplit("-", 1)[1]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(JOB_DIRNAME_RESOLVER):
        OmegaConf.register_new_resolver(JOB_DIRNAME_RESOLVER, job_dirname)
    if not OmegaConf.has_resolver("pyramidlab.wandb_id"):
        OmegaConf.register_new_resolver("pyramidlab.wandb_id", previous_wandb_id)


register_resolvers()


# ----------------------------------------------------------------------------- job runtime
def hydra_mode() -> RunMode | None:
    """RUN, MULTIRUN, or None outside a Hydra app (the Compose API leaves ``hydra.mode`` unset)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().get("mode")


def in_multirun() -> bool:
    return hydra_mode() == RunMode.MULTIRUN


def sweep_id(sweep_dir: str | Path) -> str:
    """The sweep's id, shared by its jobs (W&B ``group``): the sweep folder's last two path parts.

    ``runs/train/multirun_2026-11-22_10-00-00`` -> ``train/multirun_2026-11-22_10-00-00``:
    the task and the time, readable in a dashboard and the same from every job and from the
    report, which all know only the folder.
    """
    return "/".join(Path(sweep_dir).resolve().parts[-2:])


def current_sweep_id() -> str | None:
    """The running multirun's :func:`sweep_id`; None in a single run."""
    return sweep_id(HydraConfig.get().sweep.dir) if in_multirun() else None


def is_rank_zero() -> bool:
    # Set from RANK / LOCAL_RANK / SLURM_PROCID at import and by Lightning once DDP is up.
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``; for Hydra's instantiation wrapper, of the error it wraps."""
    from hydra.errors import InstantiationException

    # its first line is only "Error in call to target 'x':"; the cause names the problem
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def write_status(output_dir: str | Path, status: str, **extra: Any) -> Path:
    """``metrics.json`` holding only a status (a failed job), written atomically."""
    path = Path(output_dir) / "metrics.json"
    write_json_atomic(path, {"status": status, **extra})
    return path


def run_guarded(task: Callable[[DictConfig], T], cfg: DictConfig) -> T | None:
    """Run ``task(cfg)``; on an exception record it in ``<output dir>/metrics.json``.

    In a multirun the job then returns ``None``: the launcher goes on with the other jobs,
    the report lists this one as failed, and the Optuna sweeper records the trial as FAIL
    and goes on (it cannot convert None to a float; a job that raised would instead abort
    the study once ``max_failure_rate``, default 0, is exceeded). In a
    single run (or a DDP child) it re-raises, so Hydra prints the error and exits 1.
    KeyboardInterrupt is not caught: Ctrl-C stops a sweep.
    """
    from lightning_modules.config_checks import prepare_config

    try:
        return task(prepare_config(cfg))
    except Exception as exc:
        output_dir = cfg.paths.output_dir
        line = first_line(exc)
        where = ""
        if is_rank_zero():
            where = f" (recorded in {write_status(output_dir, 'failed', error=line)})"
        full = os.environ.get("HYDRA_FULL_ERROR") == "1"
        if full and not in_multirun():
            log.error(f"job failed: {line}{where}")
            raise  # Hydra prints the whole traceback
        # the console gets one line; the traceback goes to the log files (train.log) only
        logs = log_to_files(f"job failed: {line}{where}\n" + "".join(traceback.format_exception(exc)))
        print(f"Error: {line}{where}", file=sys.stderr)
        if full:
            print("".join(traceback.format_exception(exc)), file=sys.stderr)
        elif logs:
            print(f"full traceback in {', '.join(logs)} (HYDRA_FULL_ERROR=1 prints it here)", file=sys.stderr)
        if in_multirun():
            return None  # the sweep continues
        if not is_rank_zero():
            raise  # a DDP child: its parent reports
        raise SystemExit(1) from None


def log_to_files(text: str) -> list[str]:
    """Write ``text`` as an ERROR record to the root logger's file handlers only (``train.log``); their paths."""
    record = logging.LogRecord("pyramidlab", logging.ERROR, __file__, 0, text, None, None)
    paths = []
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
            paths.append(h.baseFilename)
    return paths


# ------------------------------------------------------------------------------ callbacks
class ReadableJobDirs(Callback):
    """Job folders named by what the sweep varies: ``3_neck=smsl_fpn,seed=2``.

    Hydra's ``override_dirname`` lists every task override, including those common to all
    jobs (``experiment=…``, ``data.root=…``), which buries the swept values and soon
    exceeds the file-name limit. When a multirun starts, the keys given a single value on
    the command line are added to ``override_dirname.exclude_keys``: jobs are composed
    from the master config's hydra overrides, so every launcher (local, joblib, SLURM)
    sees the same names. Values swept by ``hydra.sweeper.params`` stay in the name.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import read_write

        task = [str(o) for o in config.hydra.overrides.task]
        try:
            parsed = OverridesParser.create().parse_overrides(task)
        except Exception as e:  # noqa: BLE001 - Hydra reports bad overrides itself, next
            log.warning(f"job folder names keep all overrides: {first_line(e)}")
            return
        fixed = [o.key_or_group for o in parsed if not o.is_sweep_override()]
        excluded = list(config.hydra.job.config.override_dirname.exclude_keys)
        keys = excluded + [k for k in fixed if k not in excluded]
        if keys == excluded:
            return
        quoted = ",".join("'" + k.replace("'", "\\'") + "'" for k in keys)
        with read_write(config.hydra.overrides):
            config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]")
        with read_write(config.hydra.job.config.override_dirname):
            config.hydra.job.config.override_dirname.exclude_keys = keys


@dataclass
class SweepOutcome:
    """What the last multirun of this process left behind (read by :func:`main_with_hints`)."""

    sweep_dir: Path
    jobs: int
    failed: list[str] = field(default_factory=list)
    fail_on_failed_jobs: bool = True


LAST_SWEEP: SweepOutcome | None = None


class SweepReport(Callback):
    """Write ``report.md``, ``report.csv`` and ``report.png`` into the sweep folder at the end.

    It also finishes sweeps: a grid multirun pointed at a sweep folder that already holds jobs
    (the same command with the same ``hydra.sweep.dir``) skips the completed ones, resumes those
    with a checkpoint and starts the rest (:func:`plan_sweep`, :class:`ResumableSweeper`).

    Args:
        enabled: false skips the report (``hydra.callbacks.report.enabled=false``).
        fail_on_failed_jobs: the console script exits 1 after the report when a job failed
            (the Optuna search sets it false: failed trials are part of a search).
        wandb: log the table and plot to W&B when the jobs logged there.
        resume: finish an existing sweep folder instead of rerunning every job (grid sweeps).
        dry_run: print what each job would do (skip / resume / start) and exit without running.
        baseline: the baseline rows, ``key=value`` selections of swept values (several in one
            string separated by spaces; a list for several baselines, e.g. one per detector):
            report.md's mean table then gives each row's difference to its baseline with a
            95 % CI (``report.select_baselines``). None: no differences.
    """

    def __init__(
        self,
        enabled: bool = True,
        fail_on_failed_jobs: bool = True,
        wandb: bool = True,
        resume: bool = True,
        dry_run: bool = False,
        baseline: str | Sequence[str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.fail_on_failed_jobs = fail_on_failed_jobs
        self.wandb = wandb
        self.resume = resume
        self.dry_run = dry_run
        # a list arrives as a ListConfig
        self.baseline = baseline if baseline is None or isinstance(baseline, str) else [str(b) for b in baseline]

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import read_write

        grid = str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).endswith("BasicSweeper")
        if self.resume and grid:
            # the sweeper is instantiated from this config right after the callbacks' start hooks
            with read_write(config.hydra.sweeper):
                config.hydra.sweeper._target_ = RESUMABLE_SWEEPER
        from lightning_modules.console import show_config

        # once per sweep (the jobs only write theirs to their train.log and .hydra/)
        swept = [str(o) for o in config.hydra.overrides.task if "," in str(o)]
        params = config.hydra.sweeper.get("params") or {}
        swept += [f"{k}={v}" for k, v in params.items()]
        show_config(config, f"sweep {config.hydra.sweep.dir}: {' '.join(swept) or 'one job'}")
        if not self.dry_run:
            return
        from lightning_modules.report import grid_jobs

        expected = grid_jobs(config) if (grid or self.resume) else None
        if expected is None:
            print("dry run: this sweeper decides its jobs as it goes; nothing to plan", file=sys.stderr)
            raise SystemExit(0)
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        plan = plan_sweep(Path(str(config.hydra.sweep.dir)), expected)
        print(format_plan(plan, Path(str(config.hydra.sweep.dir))))
        raise SystemExit(0)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """A multirun job that returned without writing ``metrics.json`` (pyramidlab-srfgan: its
        results are per stage) gets one saying completed, so a rerun of the sweep skips it."""
        from hydra.core.utils import JobStatus

        if config.hydra.get("mode") != RunMode.MULTIRUN or job_return.status != JobStatus.COMPLETED:
            return
        path = Path(str(config.hydra.runtime.output_dir)) / "metrics.json"
        if not path.exists() and is_rank_zero():
            write_status(path.parent, "completed", note="per-stage results in this folder's report.md")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SWEEP
        if not self.enabled:
            return
        from lightning_modules.report import write_sweep_report

        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)  # ${hydra:...} in the sweep dir's interpolations
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            log.warning(f"sweep folder {sweep_dir} does not exist: no report")
            return
        try:
            result = write_sweep_report(sweep_dir, wandb=self.wandb, baseline=self.baseline)
        except FileNotFoundError as e:  # no job folder (e.g. an app with hydra.output_subdir=null)
            log.warning(f"no report: {e}")
            return
        LAST_SWEEP = SweepOutcome(sweep_dir, result.jobs, result.failed, self.fail_on_failed_jobs)


# ---------------------------------------------------------------------------- sweep resume
RESUMABLE_SWEEPER = "hydra_plugins.pyramidlab_sweeper.ResumableSweeper"
RESUME_OVERRIDE = "ckpt_path=last"  # pyramidlab-train: <run dir>/checkpoints/last.ckpt (report.RESUMED)


@dataclass
class JobPlan:
    """What a rerun of a sweep does with job ``num``: ``skip`` (completed), ``resume`` or ``start``."""

    num: int
    overrides: list[str]
    action: str
    reason: str
    dir: Path | None = None
    extra: list[str] = field(default_factory=list)  # overrides added to the job (resume point)


def plan_sweep(sweep_dir: Path, expected: list[list[str]]) -> list[JobPlan]:
    """Decide per grid job from what its folder holds.

    - ``metrics.json`` with ``status: completed``: skip (the folder is not touched);
    - ``checkpoints/last.ckpt``: resume from it (``ckpt_path=last``);
    - stage folders with ``stage.json`` (pyramidlab-srfgan): resume (finished stages are skipped);
    - otherwise (no folder, no checkpoint, or failed before one): start.

    A folder whose job ran with other overrides means the command changed: an error, not a guess.
    """
    from lightning_modules.report import read_job

    found: dict[int, Path] = {}
    if sweep_dir.is_dir():
        for p in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
            job = read_job(p.parent.parent)
            if job.num >= 0:
                found[job.num] = p.parent.parent
    plan = []
    for num, overrides in enumerate(expected):
        folder = found.get(num)
        if folder is None:
            plan.append(JobPlan(num, overrides, "start", "never started"))
            continue
        job = read_job(folder)
        ran = [o for o in job.overrides if o != RESUME_OVERRIDE or o in overrides]
        if sorted(ran) != sorted(overrides):
            raise ValueError(
                f"hydra.sweep.dir={sweep_dir}: job {num} ({folder.name}) ran with {ran}, this command's job {num} "
                f"is {list(overrides)}; rerun the same command to finish that sweep, or choose a new hydra.sweep.dir"
            )
        if job.status == "ok":
            plan.append(JobPlan(num, overrides, "skip", "completed", folder))
        elif (folder / "checkpoints" / "last.ckpt").is_file():
            extra = [] if any(o.startswith("ckpt_path=") for o in overrides) else [RESUME_OVERRIDE]
            plan.append(JobPlan(num, overrides, "resume", "from checkpoints/last.ckpt", folder, extra))
        elif any(folder.glob("*/stage.json")):
            done = sorted(p.parent.name for p in folder.glob("*/stage.json"))
            plan.append(JobPlan(num, overrides, "resume", f"finished stages kept: {', '.join(done)}", folder))
        else:
            why = job.error.split(":")[0] if job.metrics.get("status") == "failed" else "no checkpoint"
            plan.append(JobPlan(num, overrides, "start", f"again ({why})", folder))
    return plan


def format_plan(plan: list[JobPlan], sweep_dir: Path) -> str:
    counts = {a: sum(p.action == a for p in plan) for a in ("skip", "resume", "start")}
    lines = [f"sweep {sweep_dir}: {len(plan)} jobs, " + ", ".join(f"{n} {a}" for a, n in counts.items())]
    for p in plan:
        where = p.dir.name if p.dir is not None else " ".join(p.overrides)
        lines.append(f"  job {p.num:<3} {p.action:<6} {where}  ({p.reason})")
    return "\n".join(lines)


def run_resumable_sweep(sweeper: Any, arguments: list[str]) -> list:
    """:class:`ResumableSweeper`'s sweep: Hydra's ``BasicSweeper.sweep`` with each batch's jobs planned.

    Skipped jobs are not launched. The others keep their job numbers (and so their folders): they are
    launched in runs of consecutive numbers, each run one ``launcher.launch`` call, so a launcher
    still runs a run's jobs in parallel (joblib, SLURM arrays).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lightning_modules.compat import sweeper_params

    params_conf = sweeper_params(sweeper) + list(arguments)
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    sweeper.overrides = sweeper.split_arguments(parser.parse_overrides(params_conf), sweeper.max_batch_size)
    sweep_dir = Path(sweeper.config.hydra.sweep.dir)
    expected = [list(job) for batch in sweeper.overrides for job in batch]
    plan = plan_sweep(sweep_dir, expected)
    if any(p.action != "start" or p.dir is not None for p in plan):
        log.info(format_plan(plan, sweep_dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")
    returns = []
    first = 0
    while not sweeper.is_done():
        batch = sweeper.get_job_batch()
        sweeper.validate_batch_is_legal(batch)
        todo = [p for p in plan[first:first + len(batch)] if p.action != "skip"]
        runs: list[list[JobPlan]] = []
        for p in todo:
            if runs and runs[-1][-1].num == p.num - 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            results = sweeper.launcher.launch([p.overrides + p.extra for p in run], initial_job_idx=run[0].num)
            for r in results:
                _ = r.return_value  # as BasicSweeper: re-raise a job's exception
            returns.append(results)
        first += len(batch)
    return returns


# --------------------------------------------------------------------------- console script
def override_hint(config_name: str, args: list[str]) -> str | None:
    """For ``key=value`` overrides whose key is not in the composed config: the closest keys.

    Hydra reports "Key 'out_chanels' is not in struct" without the keys that exist (and
    advises ``+key``, which would silently add the misspelled key). It composes the config
    with the group choices from ``args`` (first value of a sweep) and checks every dotted key.
    A required value (``data.root: ???``) is a key: OmegaConf's ``in`` says False for it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_modules.paths import CONF_DIR

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    groups = [o.split(",")[0] for o in overrides if "." not in o.split("=")[0] and not o.startswith(("+", "~"))]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=groups)
    except Exception:  # noqa: BLE001 - a bad group choice: Hydra's own message already names it
        return None
    finally:
        GlobalHydra.instance().clear()
    hints = []
    for o in overrides:
        key = o.split("=")[0]
        if key.startswith(("+", "~", "hydra.", "hydra/")) or "." not in key:
            continue
        parent, leaf = key.rsplit(".", 1)
        node = OmegaConf.select(cfg, parent, default=None)
        keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else None
        if keys is not None and leaf not in keys:
            close = difflib.get_close_matches(leaf, keys, n=1)
            guess = f"did you mean {parent}.{close[0]}? " if close else ""
            hints.append(f"{key} is not a key of the config: {guess}keys of {parent}: {', '.join(keys)}")
    return "\n".join(hints) or None


def main_with_hints(app: Callable[[], Any], config_name: str) -> None:
    """Run a ``@hydra.main`` app as a console script.

    An override of a key that does not exist stops before Hydra starts, with the closest
    keys (Hydra's own error would advise ``+key``); a multirun whose report lists failed
    jobs exits 1 after the report is written.
    """
    global LAST_SWEEP
    LAST_SWEEP = None
    dotted = [a for a in sys.argv[1:] if "=" in a and "." in a.split("=")[0]
              and not a.startswith(("-", "+", "~", "hydra.", "hydra/"))]
    if dotted and (hint := override_hint(config_name, sys.argv[1:])):
        print(f"Error: {hint}\n(a new key on purpose: +KEY=VALUE)", file=sys.stderr)
        sys.exit(1)
    app()
    outcome = LAST_SWEEP
    if outcome is not None and outcome.failed and outcome.fail_on_failed_jobs:
        print(
            f"{len(outcome.failed)} of {outcome.jobs} jobs failed ({', '.join(outcome.failed)}): "
            f"see {outcome.sweep_dir / 'report.md'}",
            file=sys.stderr,
        )
        sys.exit(1)


# --------------------------------------------------------------------------------- ddp
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# Hydra overrides a DDP child must not inherit: it runs this one job, in RUN mode, here.
_CHILD_DROPS = ("hydra.mode", "hydra.sweep", "hydra.run", "hydra/launcher", "hydra.launcher", "hydra/sweeper",
                "hydra.sweeper", "hydra.output_subdir", "hydra.job.name", "hydra.callbacks")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ddp_child_command(local_rank: int) -> tuple[list[str], str]:
    """Command line and cwd of DDP child ``local_rank``: this job alone, in this job's folder.

    Lightning's ``_hydra_subprocess_cmd`` re-runs ``sys.argv`` with ``hydra.run.dir`` set:
    in a multirun every child re-runs the whole sweep (a second sweep folder with a
    ``${now:}`` sweep dir, and jobs started twice). Here the child gets the job's own
    overrides, ``hydra.mode=RUN`` (a preset may set ``hydra.mode: MULTIRUN``) and the job's
    output folder; no ``.hydra`` copy (the parent writes it).
    """
    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a in _CONFIG_FLAGS and i + 1 < len(argv):
            command += [a, argv[i + 1]]
        elif a.startswith(tuple(f + "=" for f in _CONFIG_FLAGS)):
            command.append(a)
    command += list(hc.overrides.task)
    command += [o for o in hc.overrides.hydra if not o.lstrip("+~").startswith(_CHILD_DROPS)]
    command += [
        f"hydra.run.dir={_quote(str(hc.runtime.output_dir))}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_ddp_rank{local_rank}",
        "hydra.mode=RUN",
    ]
    return command, str(hc.runtime.cwd)


def install_ddp_child_command() -> None:
    """Make Lightning's DDP launcher start children with :func:`ddp_child_command`."""
    from lightning_modules.compat import set_ddp_child_command

    set_ddp_child_command(ddp_child_command)
