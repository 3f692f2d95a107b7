"""Experiments at scale: sweeps and their reports, failing jobs, W&B, DDP, bf16, resume, clusters.

Multiruns go through the real entry point: the console script in a subprocess where the
process boundary matters (exit status, DDP re-executing the command line), otherwise
``pyramidlab-train``'s ``main()`` in-process with ``sys.argv`` set (the same code, without
~10 s of imports per test).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_modules import builders as B
from lightning_modules import checkpoints as CK
from lightning_modules import hydra_callbacks as H
from lightning_modules import optim as OPT
from lightning_modules import report as R
from lightning_modules import train as T
from tests.conftest import CONF_DIR, TINY, compose_cfg

# Smaller than TINY's images, and the generation parameters of the `shapes_root` fixture
# (16 train / 8 val images at 128 px): without them the datamodule regenerates the default
# 800 + 200 images into it. These tests run whole sweeps.
SMALL = TINY + [
    "data.min_size=64", "data.max_size=80",
    "data.generate.num_train=16", "data.generate.num_val=8", "data.generate.image_size=128",
]


def _env() -> dict[str, str]:
    # OpenMP threads that spin while waiting starve each other on a shared CPU (measured 25x
    # slower per step on the 2-core machine under load); passive waiting costs nothing idle.
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path} missing: install the project (`make install`) before running the tests"
    return str(path)


@pytest.fixture
def restore_logging():
    """Hydra apps configure the root logger (file handlers in the job folders): undo it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def run_main(monkeypatch, main, args: list[str]) -> int:
    """Run a console-script ``main()`` in-process; its exit status."""
    monkeypatch.setattr(sys, "argv", ["pyramidlab", *args])
    GlobalHydra.instance().clear()
    try:
        main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        GlobalHydra.instance().clear()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- W&B files
def wandb_records(path: Path):
    """Records of an offline run's ``run-*.wandb`` (W&B's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""  # 7-byte file header; 32 KiB blocks; 7-byte record headers
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec
        elif kind == 0:
            buf = b""


def wandb_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """group, job_type, name, config (JSON-decoded, top level) and history keys of one offline run.

    ``wandb.finish()`` can return before W&B's service process has written the run's last
    records (seen on a loaded machine): wait for the closing ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = _read_wandb_run(next(run_dir.glob("run-*.wandb")))
        if "exit_code" in out or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_wandb_run(path: Path) -> dict:
    out: dict = {"config": {}, "history": set()}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(group=rec.run.run_group, job_type=rec.run.job_type, name=rec.run.display_name)
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            out["history"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


# ------------------------------------------------------------------------------- sweeps
def test_grid_sweep_through_the_cli_writes_the_report(tmp_path, shapes_root):
    """2 x 2 multirun with debug=fdr: one row per job, mean ± std over seeds, CSVs, a plot."""
    sweep = tmp_path / "sweep"
    cmd = [
        _console_script("pyramidlab-train"), "-m", *SMALL, "debug=fdr", f"data.root={shapes_root}",
        f"paths.log_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep}", "neck.out_channels=16,32", "seed=1,2",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    # job folders named by what the sweep varies
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert jobs == [
        "0_neck.out_channels=16,seed=1", "1_neck.out_channels=16,seed=2",
        "2_neck.out_channels=32,seed=1", "3_neck.out_channels=32,seed=2",
    ]
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"], r["neck.out_channels"], r["seed"]) for r in rows] == [
        ("0", "ok", "16", "1"), ("1", "ok", "16", "2"), ("2", "ok", "32", "1"), ("3", "ok", "32", "2"),
    ]
    for r in rows:
        metrics = json.loads((sweep / jobs[int(r["job"])] / "metrics.json").read_text())
        assert float(r["bbox/AP [%]"]) == pytest.approx(100 * metrics["bbox/AP"], abs=1e-3)
        assert float(r["params [M]"]) == pytest.approx(metrics["params_trainable"] / 1e6, abs=1e-3)
        assert float(r["time [ms]"]) > 0
    mean = read_csv(sweep / "report_mean.csv")
    assert [(m["neck.out_channels"], m["jobs"], m["ok"]) for m in mean] == [("16", "2", "2"), ("32", "2", "2")]
    md = (sweep / "report.md").read_text()
    assert md.count("| ok |") == 4 and "Mean ± std over seeds" in md and "± " in md
    assert (sweep / "report.png").stat().st_size > 5_000
    assert [p.name for p in (tmp_path / "runs").glob("train/*")] == []  # nothing outside the sweep dir

    # a job whose folder is gone (never started) is a failed row, not a missing one
    import shutil

    shutil.rmtree(sweep / jobs[3])
    R.main([str(sweep), "--no-wandb"])
    rows = read_csv(sweep / "report.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert rows[3]["neck.out_channels"] == "32" and rows[3]["seed"] == "2" and "not started" in rows[3]["error"]


def test_failing_job_does_not_stop_the_sweep_and_wandb_runs_per_job(
    tmp_path, shapes_root, monkeypatch, restore_logging
):
    """Job 0 diverges (non-finite loss) and is reported; job 1 still runs. One W&B run per job."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    args = [
        "-m", *SMALL, "neck.out_channels=16", "logger=wandb", "logger.wandb.tags=[sweep_test]",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks=none", "+trainer.enable_checkpointing=false",
        f"data.root={shapes_root}", f"paths.log_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep}",
        "optim.optimizer.lr=1e30,0.01",
    ]
    code = run_main(monkeypatch, T.main, args)
    assert code == 1  # after the report: a job failed
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"], r["optim.optimizer.lr"]) for r in rows] == [("0", "failed", "1e+30"),
                                                                              ("1", "ok", "0.01")]
    assert rows[0]["error"].startswith("FloatingPointError: non-finite loss") and rows[1]["bbox/AP [%]"] != ""
    failed = json.loads((sweep / "0_optim.optimizer.lr=1e+30" / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == rows[0]["error"]
    assert "| failed |" in (sweep / "report.md").read_text()

    group = H.sweep_id(sweep)
    assert group == f"{tmp_path.name}/sweep"
    for job, lr, exit_code in (("0_optim.optimizer.lr=1e+30", 1e30, 1), ("1_optim.optimizer.lr=0.01", 0.01, 0)):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, job  # its own run: the previous job's was finished
        run = wandb_run(runs[0])
        assert (run["group"], run["job_type"], run["name"]) == (group, "train", job)
        assert run["config"]["optim"]["optimizer"]["lr"] == lr  # the resolved config of that job
        assert run["config"]["neck"]["out_channels"] == 16 and run["config"]["logger"]["wandb"]["tags"] == [
            "sweep_test"]
        assert run["exit_code"] == exit_code
    assert "test/bbox/AP" in wandb_run(next((sweep / "1_optim.optimizer.lr=0.01" / "wandb").glob("offline-run-*")))[
        "history"]
    # the report: a separate short run in the sweep's group
    (report_run,) = list((sweep / "wandb").glob("offline-run-*"))
    rep = wandb_run(report_run)
    assert (rep["group"], rep["job_type"]) == (group, "report")
    assert {"report/_type", "report/nrows", "report_plot/_type"} <= rep["history"]  # a table and an image
    import wandb

    assert wandb.run is None


def test_single_failing_run_exits_nonzero_with_status(tmp_path, shapes_root, monkeypatch, restore_logging, capsys):
    run_dir = tmp_path / "run"
    args = [*SMALL, "debug=fdr", f"data.root={shapes_root}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={run_dir}",
            "optim.optimizer.lr=-1"]
    assert run_main(monkeypatch, T.main, args) == 1
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == {"status": "failed", "error": "ValueError: optim.optimizer.lr=-1 must be a positive number"}
    assert "optim.optimizer.lr=-1 must be a positive number" in capsys.readouterr().err


def test_optuna_search_optimizes_the_returned_ap(tmp_path, shapes_root, monkeypatch, restore_logging):
    sweep = tmp_path / "optuna"
    args = [
        *SMALL, "hparams_search=optuna_lr_wd", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
        "debug=fdr", "neck.out_channels=16", f"data.root={shapes_root}", f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]
    assert run_main(monkeypatch, T.main, args) == 0
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    rows = read_csv(sweep / "report.csv")
    assert len(rows) == 2 and {"optim.optimizer.lr", "optim.optimizer.weight_decay"} <= set(rows[0])
    aps = [float(r["bbox/AP [%]"]) for r in rows]
    assert 100 * best.best_value == pytest.approx(max(aps), abs=1e-3)  # the value main() returned
    assert 1e-4 <= best.best_params["optim.optimizer.lr"] <= 1e-1
    assert "Optuna best value" in (sweep / "report.md").read_text()
    assert {json.loads(p.read_text())["eval_split"] for p in sweep.glob("*/metrics.json")} == {"val"}


def test_run_guarded_returns_none_in_a_multirun(tmp_path, monkeypatch):
    """What Optuna sees from a failed job: None (a FAIL trial), not an exception (an aborted study)."""
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})

    def boom(_):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(H, "in_multirun", lambda: True)
    assert H.run_guarded(boom, cfg) is None
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"status": "failed",
                                                                   "error": "RuntimeError: first line"}
    monkeypatch.setattr(H, "in_multirun", lambda: False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra prints the traceback: the exception goes up
    with pytest.raises(RuntimeError, match="first line"):
        H.run_guarded(boom, cfg)
    monkeypatch.delenv("HYDRA_FULL_ERROR")  # one line on the console (tests/test_robustness.py), exit 1
    with pytest.raises(SystemExit, match="1"):
        H.run_guarded(boom, cfg)
    # Hydra's instantiate wraps errors in a message without the cause: report the cause
    with pytest.raises(Exception) as e:
        instantiate({"_target_": "lightning_modules.datamodule.DetectionDataModule", "root": "x", "num_classes": 1,
                     "name": "voc"})
    assert H.first_line(e.value) == "ValueError: unknown dataset name 'voc'; expected 'coco' or 'shapes'"
    assert T.objective(None) is None and T.objective({"bbox/AP": 0.25}) == 0.25
    assert T.objective({"val/bbox/AP": 0.5}) == 0.5


# ------------------------------------------------------------------------------ reports
def test_write_report_percent_mean_std_and_failed_rows(tmp_path):
    """The reusable writer (the SRF-GAN pipeline passes one row per variant)."""
    rows = [
        {"variant": "nn", "seed": 1, "bbox/AP": 0.30, "segm/AP": 0.28, "params_trainable": 37_740_000, "time_ms": 50},
        {"variant": "nn", "seed": 2, "bbox/AP": 0.32, "segm/AP": 0.30, "params_trainable": 37_740_000, "time_ms": 52},
        {"variant": "srf", "seed": 1, "bbox/AP": 0.35, "segm/AP": 0.31, "params_trainable": 38_720_000, "time_ms": 60},
        {"variant": "srf", "seed": 2, "status": "failed", "error": "killed"},
    ]
    files = R.write_report(rows, tmp_path, "Table 4", ["variant", "seed"])
    md = files.md.read_text()
    assert "| nn | 2/2 | 31.0 ± 1.4 |" in md and "| srf | 1/2 | 35.0 |" in md
    assert "| failed |" in md and "killed" in md and "segm AP" in md
    per_job = read_csv(files.csv)
    assert [r["bbox/AP [%]"] for r in per_job] == ["30.0", "32.0", "35.0", ""]
    assert per_job[0]["params [M]"] == "37.74"
    mean = read_csv(files.mean_csv)
    assert mean[0]["bbox/AP [%] mean"] == "31.0" and float(mean[0]["bbox/AP [%] std"]) == pytest.approx(1.4142, 1e-3)
    assert files.png.stat().st_size > 5_000


def test_job_dirname_is_one_readable_folder():
    assert H.job_dirname(3, "experiment=smsl/table1,seed=2") == "3_experiment=smsl-table1,seed=2"
    long = H.job_dirname(0, "x" * 500)
    assert len(long) < 140 and "/" not in long and long != H.job_dirname(0, "x" * 499)
    assert H.job_dirname(0, "") == "0"


# --------------------------------------------------------------------------------- DDP
def test_ddp_cpu_multirun_through_the_cli_keeps_one_sweep_dir(tmp_path, shapes_root):
    """trainer=ddp_cpu re-executes the command line for rank 1: it must run this job, not the sweep again."""
    runs = tmp_path / "runs"
    cmd = [
        _console_script("pyramidlab-train"), "-m", *SMALL, "debug=fdr", "trainer=ddp_cpu", "neck.out_channels=16",
        f"data.root={shapes_root}", f"paths.log_dir={runs}",  # default sweep dir: multirun_${now:...}
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Starting with 2 processes" in out.stdout + out.stderr
    (sweep,) = list((runs / "debug" / "train").iterdir())  # one sweep folder, though rank 1 started seconds later
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert job.name == "0"  # no swept key
    assert (job / "train_ddp_rank1.log").is_file()  # rank 1 ran in this job's folder
    assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
    assert [r["status"] for r in read_csv(sweep / "report.csv")] == ["ok"]


# --------------------------------------------------------------------------- precision
def test_bf16_mixed_training_step_on_cpu(tmp_path, shapes_root, monkeypatch):
    cfg = compose_cfg("train", SMALL + [
        "neck.out_channels=16", "trainer.precision=bf16-mixed", "test=false", "trainer.max_epochs=1",
        "trainer.limit_train_batches=1", "trainer.limit_val_batches=0", "callbacks=none",
        "+trainer.enable_checkpointing=false",
    ], tmp_path, shapes_root)
    dtypes: list[torch.dtype] = []
    losses: list[float] = []

    class Probe(B.L.Callback):
        def on_train_start(self, trainer, pl_module):
            body = pl_module.net.backbone.body
            body.register_forward_hook(lambda m, i, o: dtypes.append(next(iter(o.values())).dtype))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    real = B.build_callbacks
    monkeypatch.setattr(B, "build_callbacks", lambda c: real(c) + [Probe()])
    T.train(cfg)
    assert dtypes and dtypes[0] == torch.bfloat16  # the backbone ran under bf16 autocast
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()


# ------------------------------------------------------------------------------ resume
class StopAtStep(B.L.Callback):
    """A crash right after the checkpoint of optimizer step ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


class FinalState(B.L.Callback):
    """Weights, optimizer and scheduler states and progress when training ends."""

    def on_train_end(self, trainer, pl_module):
        import copy

        self.state = copy.deepcopy({
            "weights": pl_module.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
        })


@pytest.fixture
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true sets it for the process


def test_resume_mid_epoch_reaches_the_same_weights(tmp_path, shapes_root, monkeypatch, deterministic):
    """Stop in epoch 1 after its first batch, resume from last.ckpt: same weights as never stopping.

    Augmentation is on (random flips), so the batches' order and their random draws must
    both continue where they stopped.
    """
    over = SMALL + [
        "neck.out_channels=16", "seed=0", "trainer.deterministic=true", "trainer.max_epochs=2",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "test=false", "optim=adamw",
        "optim.scheduler.warmup_iters=2", "callbacks.last_checkpoint.every_n_epochs=null",
        "callbacks.last_checkpoint.every_n_train_steps=3", "~callbacks.model_checkpoint",
        "~callbacks.rich_progress_bar", "~callbacks.lr_monitor", "~callbacks.plot_curves",
    ]
    real = B.build_callbacks

    def run(out: Path, *extra: B.L.Callback, resume: bool = False) -> FinalState:
        final = FinalState()
        monkeypatch.setattr(B, "build_callbacks", lambda c: real(c) + [final, *extra])
        T.train(compose_cfg("train", over + (["ckpt_path=last"] if resume else []), out, shapes_root))
        return final

    straight = run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed at step 3"):
        run(tmp_path / "resumed", StopAtStep(3))
    stopped = CK.load_checkpoint(tmp_path / "resumed" / "out" / "checkpoints" / "last.ckpt")
    # epoch 1, one of its two batches done: a mid-epoch resume point
    assert stopped["global_step"] == 3 and stopped["epoch"] == 1
    (loader_state,) = stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (loader_state["epoch"], loader_state["batches"]) == (1, 1)
    assert "pyramidlab_config" in stopped  # pyramidlab-eval ckpt_path=... alone rebuilds the model

    resumed = run(tmp_path / "resumed", resume=True)
    a, b = straight.state, resumed.state
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (4, 2)
    assert a["weights"].keys() == b["weights"].keys()
    for k, v in a["weights"].items():
        assert torch.equal(v, b["weights"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][name], sb[i][name]), (i, name)
    assert a["scheduler"] == b["scheduler"]


# ------------------------------------------------------------------------- lr scaling
def test_scale_lr_is_linear_in_the_total_batch(tmp_path):
    def lr(*over: str) -> float:
        cfg = compose_cfg("train", ["optim=sgd", *over], tmp_path)
        return OPT.build_optimizer(cfg).keywords["lr"]

    assert lr("optim.scale_lr=false") == 0.01 and lr("optim.scale_lr=false", "trainer=ddp_cpu") == 0.01
    assert lr() == pytest.approx(0.01 * 4 / 16)  # recipe=paper (the default) scales: 4 images per step
    assert lr("optim.scale_lr=true", "data.batch_size=4", "trainer=ddp_cpu") == pytest.approx(0.01 * 8 / 16)
    assert lr("optim.scale_lr=true", "data.batch_size=4", "trainer=ddp_cpu", "trainer.num_nodes=2",
              "trainer.accumulate_grad_batches=2") == pytest.approx(0.01 * 32 / 16)
    assert lr("optim.scale_lr=true", "data.batch_size=2", "optim.base_batch_size=2") == pytest.approx(0.01)
    with pytest.raises(ValueError, match="trainer.devices=-1"):
        lr("optim.scale_lr=true", "trainer.devices=-1")
    # the module built from the config trains with the scaled rate
    cfg = compose_cfg("train", TINY + ["optim.scale_lr=true", "data.batch_size=8"], tmp_path)
    assert B.build_module(cfg, CK.build_net(cfg)).optimizer_factory.keywords["lr"] == pytest.approx(0.005)


# ------------------------------------------------------------------ clusters, launchers
def _compose_with_hydra(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.log_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def test_slurm_launcher_config_instantiates_one_task_per_device(tmp_path):
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = _compose_with_hydra(tmp_path, [
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600",
    ])
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    p = launcher.params
    assert (p["tasks_per_node"], p["gpus_per_node"], p["nodes"]) == (4, 4, 2)
    assert (p["partition"], p["timeout_min"], p["mem_gb"]) == ("gpu", 600, 64)
    assert p["submitit_folder"].endswith("/.submitit/%j") and str(tmp_path) in p["submitit_folder"]


def test_local_parallel_and_optuna_configs_instantiate(tmp_path):
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

    cfg = _compose_with_hydra(tmp_path, ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"])
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, JoblibLauncher) and launcher.joblib["n_jobs"] == 2

    assert _compose_with_hydra(tmp_path, ["optim=adamw"]).data.test_split == "test"  # the embedded data's
    cfg = _compose_with_hydra(tmp_path, ["hparams_search=optuna_lr_wd", "optim=adamw"])
    assert cfg.data.test_split is None  # a search scores its trials on val, never on the test split
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.hydra.sweeper.storage is None  # in memory: the sqlite storage breaks with SQLAlchemy 2
    assert set(cfg.hydra.sweeper.params) == {"optim.optimizer.lr", "optim.optimizer.weight_decay"}
    sweeper = instantiate(cfg.hydra.sweeper)
    assert isinstance(sweeper, OptunaSweeper)
    assert sweeper.sweeper.n_trials == 20 and sweeper.sweeper.params["optim.optimizer.lr"] == "tag(log, interval(1e-4, 1e-1))"
    assert cfg.hydra.callbacks.report.fail_on_failed_jobs is False


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_problem_and_the_choices(tmp_path, monkeypatch, restore_logging, capsys):
    common = [f"paths.log_dir={tmp_path}", "debug=fdr"]
    # an experiment that does not exist: an error listing the presets, not a silent default run
    assert run_main(monkeypatch, T.main, [*common, "experiment=no_such_preset"]) == 1
    err = capsys.readouterr().err
    assert "experiment/no_such_preset" in err and "shapes_retinanet" in err

    # a sweep over a misspelled key: Hydra names it, the hint names the keys that exist
    assert run_main(monkeypatch, T.main, ["-m", *common, "neck.out_chanels=16,32"]) == 1
    err = capsys.readouterr().err
    assert "neck.out_chanels" in err and "did you mean neck.out_channels?" in err

    # trainer=ddp without a GPU; 16-mixed on CPU: one line naming the key and the choices
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"trainer.accelerator=gpu .* choose trainer=cpu, or trainer=ddp_cpu"):
            B.build_trainer(compose_cfg("train", ["trainer=ddp"], tmp_path), [], [])
    with pytest.raises(ValueError, match=r"trainer.precision=16-mixed .* choose 32, bf16-mixed"):
        B.build_trainer(compose_cfg("train", ["trainer.precision=16-mixed"], tmp_path), [], [])
    with pytest.raises(ValueError, match="sync_batchnorm=true needs GPUs"):
        B.build_trainer(compose_cfg("train", ["trainer=ddp_cpu", "trainer.sync_batchnorm=true"], tmp_path), [], [])
