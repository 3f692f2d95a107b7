"""Reports that read like a paper's table: each row's difference to its baseline row, paired by seed,
with a 95 % confidence interval (``hydra.callbacks.report.baseline``), on hand-made sweep folders
whose AP values are known, so every difference and interval is checked against a hand computation."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from lightning_modules import hydra_callbacks as H
from lightning_modules import report as R
from tests.conftest import CONF_DIR

TABLE2_ROWS = ["retinanet_fpn", "retinanet_pafpn", "retinanet_smsl_fpn", "retinanet_smsl_pafpn",
               "mask_rcnn_fpn", "mask_rcnn_smsl_fpn", "cascade_rcnn_fpn", "cascade_rcnn_smsl_fpn"]


def fake_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None) -> Path:
    """A job folder as a Hydra multirun leaves it: ``.hydra/overrides.yaml``, ``.hydra/hydra.yaml`` (its
    number) and ``metrics.json`` (None: the job was killed before writing one)."""
    job = sweep / f"{num}_{','.join(overrides).replace('/', '-')}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def fake_sweep(sweep: Path, key: str, ap: dict[str, list[float | None]], seeds=(1, 2, 3)) -> None:
    """One job per (value, seed), bbox AP in percent as given (None: a failed job), mask AP 2 below."""
    num = 0
    for value, per_seed in ap.items():
        for seed, v in zip(seeds, per_seed):
            metrics = ({"status": "failed", "error": "CUDA out of memory"} if v is None else
                       {"status": "completed", "bbox/AP": v / 100, "segm/AP": (v - 2) / 100,
                        "params_trainable": 10_000_000, "time_ms": 5.0})
            fake_job(sweep, num, [f"{key}={value}"] + ([f"seed={seed}"] if len(seeds) > 1 else []), metrics)
            num += 1


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_rows(md: str, first_cell: str) -> list[list[str]]:
    """The cells of report.md's table rows that start with ``first_cell``."""
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_t_quantiles_are_students():
    """The hand-written table against scipy (installed with optuna, not a dependency of ours)."""
    from scipy import stats

    for df in range(1, 31):
        assert R.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4), df
    assert R.t975(31) == pytest.approx(1.95996, abs=1e-5)  # the normal quantile beyond the table


def test_paired_differences_and_intervals_by_hand(tmp_path):
    # bbox AP (%) per seed 1, 2, 3; mask AP is 2 below each
    fake_sweep(tmp_path, "neck", {
        "fpn": [30.0, 31.0, 32.0],
        "smsl_fpn": [31.0, 33.0, 35.0],   # diffs 1, 2, 3: mean 2, sd 1
        "srf_fpn": [32.0, 33.2, 33.8],    # diffs 2, 2.2, 1.8: mean 2, sd 0.2
        "pafpn": [29.0, 31.0, None],      # seed 3 failed: paired over seeds 1, 2 only, diffs -1, 0
    })
    result = R.write_sweep_report(tmp_path, wandb=False, baseline="neck=fpn")
    assert result.files.baseline_error is None

    ci_smsl = 4.303 * 1.0 / math.sqrt(3)   # t(0.975, 2) * sd / sqrt(n) = 2.484
    ci_srf = 4.303 * 0.2 / math.sqrt(3)    # 0.497: the interval [1.5, 2.5] excludes 0
    ci_pafpn = 12.706 * math.sqrt(0.5) / math.sqrt(2)  # t(0.975, 1) * sd(-1, 0) / sqrt(2) = 6.353
    mean = {r["neck"]: r for r in read_csv(result.files.mean_csv)}
    for name, delta, ci in (("smsl_fpn", 2.0, ci_smsl), ("srf_fpn", 2.0, ci_srf), ("pafpn", -0.5, ci_pafpn)):
        for iou in ("bbox", "segm"):  # mask AP is 2 below bbox AP in every job: the same differences
            assert float(mean[name][f"delta {iou}/AP [%]"]) == pytest.approx(delta, abs=1e-3), (name, iou)
            assert float(mean[name][f"delta {iou}/AP ci95 [%]"]) == pytest.approx(ci, abs=1e-3), (name, iou)
    assert mean["fpn"]["delta bbox/AP [%]"] == mean["fpn"]["delta bbox/AP ci95 [%]"] == ""  # the baseline itself
    assert {r["baseline"] for r in mean.values()} == {"neck=fpn"}
    # the other columns of report_mean.csv are as before, the differences after them
    head = list(mean["fpn"])
    assert head[:5] == ["neck", "jobs", "ok", "bbox/AP [%] mean", "bbox/AP [%] std"]
    assert head[-5:] == ["delta bbox/AP [%]", "delta bbox/AP ci95 [%]", "delta segm/AP [%]",
                         "delta segm/AP ci95 [%]", "baseline"]

    md = result.files.md.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| neck | seeds (ok/all) |"))
    assert header.endswith("| sig. | segm sig. | baseline |")
    # neck | seeds | AP | segm AP | params | time | sig. | segm sig. | baseline
    assert md_rows(md, "fpn")[0][2:4] == ["31.0 ± 1.0 [baseline]", "29.0 ± 1.0 [baseline]"]
    assert md_rows(md, "fpn")[0][6:] == ["–", "–", "–"]
    assert md_rows(md, "smsl_fpn")[0][2:] == ["33.0 ± 2.0 [+2.0 ± 2.5]", "31.0 ± 2.0 [+2.0 ± 2.5]",
                                              "10.00 ± 0.00", "5.00 ± 0.00", "no", "no", "neck=fpn"]
    srf = md_rows(md, "srf_fpn")[0]
    assert srf[2] == "33.0 ± 0.9 [+2.0 ± 0.5]" and srf[6:8] == ["yes", "yes"]
    assert md_rows(md, "pafpn")[0][1:3] == ["2/3", "30.0 ± 1.4 [-0.5 ± 6.4]"]
    # the per-job table and report.csv are unchanged by a baseline
    assert list(read_csv(result.files.csv)[0]) == [
        "job", "status", "neck", "seed", "bbox/AP [%]", "segm/AP [%]", "params [M]", "time [ms]", "error"]
    assert result.files.png.stat().st_size > 5_000


def test_differences_are_paired_by_seed():
    """Only the seeds both rows completed count: seed 3 (missing from the baseline) and seed 5 (missing
    from the row) are left out."""
    mean, ci, n = R.paired_difference({"1": 31.0, "2": 33.0, "3": 40.0}, {"2": 31.0, "1": 30.0, "5": 10.0})
    assert (mean, n) == (1.5, 2) and ci == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert math.isnan(R.paired_difference({"1": 31.0}, {"1": 30.0})[1])  # one seed: no interval
    assert R.paired_difference({"1": 31.0}, {"2": 30.0})[2] == 0  # no seed in both
    assert math.isnan(R.paired_difference({"1": 31.0}, {})[0])


def test_one_seed_has_no_interval(tmp_path):
    """Without seeds the differences are single values: the interval and sig. are n/a; the mean table and
    report_mean.csv are written because a baseline is set."""
    fake_sweep(tmp_path, "neck", {"fpn": [30.0], "smsl_fpn": [31.5]}, seeds=(1,))
    result = R.write_sweep_report(tmp_path, wandb=False, baseline="neck=fpn")
    md = result.files.md.read_text()
    assert md_rows(md, "smsl_fpn")[-1][2] == "31.5 [+1.5 ± n/a]" and md_rows(md, "smsl_fpn")[-1][6] == "n/a"
    mean = {r["neck"]: r for r in read_csv(result.files.mean_csv)}
    assert float(mean["smsl_fpn"]["delta bbox/AP [%]"]) == pytest.approx(1.5)
    assert mean["smsl_fpn"]["delta bbox/AP ci95 [%]"] == ""

    # no baseline: the report of a seedless sweep is what it was (no mean table, no report_mean.csv)
    (tmp_path / "report_mean.csv").unlink()
    plain = R.write_sweep_report(tmp_path, wandb=False)
    assert plain.files.mean_csv is None and "## " not in plain.files.md.read_text()


def test_table2_each_detector_is_compared_with_its_fpn_row(tmp_path):
    """One swept key (the row) agrees with no candidate on any other key: the nearest baseline above wins."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smsl/table2"], return_hydra_config=True)
    baseline = list(cfg.hydra.callbacks.report.baseline)
    sweep = [v.strip() for v in str(cfg.hydra.sweeper.params["+smsl_table2"]).split(",")]
    assert sweep == TABLE2_ROWS
    num = 0
    for i, row in enumerate(TABLE2_ROWS):
        for seed in (1, 2):
            fake_job(tmp_path, num, [f"+smsl_table2={row}", f"seed={seed}"],
                     {"status": "completed", "bbox/AP": (30 + i + seed) / 100})
            num += 1
    # mask AP only in the Mask R-CNN rows (as in the paper's Table 2)
    for job in tmp_path.glob("*mask_rcnn*"):
        metrics = json.loads((job / "metrics.json").read_text())
        (job / "metrics.json").write_text(json.dumps({**metrics, "segm/AP": metrics["bbox/AP"] - 0.02}))
    result = R.write_sweep_report(tmp_path, wandb=False, baseline=baseline)
    chosen = {r["smsl_table2"]: r["baseline"].removeprefix("smsl_table2=") for r in read_csv(result.files.mean_csv)}
    assert chosen == {
        "retinanet_fpn": "retinanet_fpn", "retinanet_pafpn": "retinanet_fpn",
        "retinanet_smsl_fpn": "retinanet_fpn", "retinanet_smsl_pafpn": "retinanet_fpn",
        "mask_rcnn_fpn": "mask_rcnn_fpn", "mask_rcnn_smsl_fpn": "mask_rcnn_fpn",
        "cascade_rcnn_fpn": "cascade_rcnn_fpn", "cascade_rcnn_smsl_fpn": "cascade_rcnn_fpn",
    }
    md = result.files.md.read_text()
    assert md.count("[baseline]") == 4  # three bbox, one mask
    # smsl_table2 | seeds | AP | segm AP | sig. | segm sig. | baseline
    # mask_rcnn_smsl_fpn (row 5) against mask_rcnn_fpn (row 4): +1 in both seeds, sd 0: the interval is 0
    assert md_rows(md, "mask_rcnn_smsl_fpn")[0][2:6] == ["36.5 ± 0.7 [+1.0 ± 0.0]", "34.5 ± 0.7 [+1.0 ± 0.0]",
                                                         "yes", "yes"]
    # the rows without mask AP have no mask difference
    assert md_rows(md, "retinanet_pafpn")[0][2:6] == ["32.5 ± 0.7 [+1.0 ± 0.0]", "–", "yes", "–"]


def test_the_baseline_agreeing_on_most_other_keys_wins_over_the_nearest():
    configs = [{"detector": "a", "neck": "smsl"}, {"detector": "b", "neck": "fpn"},
               {"detector": "a", "neck": "fpn"}, {"detector": "b", "neck": "smsl"}]
    # row 0's baseline is below it (same detector), row 3's above it
    assert R.select_baselines(configs, "neck=fpn") == [2, 1, 2, 1]
    # two keys in one selection; a bool value from a Python caller reads as the override spells it
    table1 = [{"global_feature": gf, "channel_rescaling": cr} for gf in (False, True) for cr in (False, True)]
    assert R.select_baselines(table1, "global_feature=false channel_rescaling=false") == [0, 0, 0, 0]
    assert R.select_baselines(table1, None) is None
    # values as Hydra reads them: the sweeper writes 1e-3 as 0.001, null as null
    assert R.select_baselines([{"lr": "0.002"}, {"lr": "0.001"}, {"lr": "null"}], "lr=1e-3") == [1, 1, 1]
    assert R.select_baselines([{"lr": "0.002"}, {"lr": "null"}], "lr=None") == [1, 1]


def test_presets_name_rows_that_exist():
    """Table 1's baseline is LF; SRF-GAN Tables 4 and 5: A1 (in the run's report and a sweep's over seeds)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        t1 = compose("train", overrides=["experiment=smsl/table1"], return_hydra_config=True)
        srf = {n: compose("srfgan", overrides=[f"experiment=srfgan/{n}"], return_hydra_config=True)
               for n in ("table4", "table5")}
        plain = compose("srfgan", overrides=[], return_hydra_config=True)
    # the jobs' overrides as Hydra's sweeper writes them into .hydra/overrides.yaml (False, not false)
    rows = [{k: v for k, _, v in (o.partition("=") for o in job) if k.startswith("neck.")} for job in R.grid_jobs(t1)]
    assert rows[0] == {"neck.global_feature": "False", "neck.channel_rescaling": "False"}  # LF
    assert R.select_baselines(rows, t1.hydra.callbacks.report.baseline) == [0, 0, 0, 0]
    for cfg in srf.values():
        assert cfg.report_baseline == cfg.hydra.callbacks.report.baseline == "variant=A1"
        assert R.select_baselines([{"variant": v} for v in cfg.variants], cfg.report_baseline) == [0] * len(cfg.variants)
    assert plain.report_baseline is None and plain.hydra.callbacks.report.baseline is None


def test_a_selection_matching_nothing_is_one_line_and_the_report_is_written(tmp_path, caplog):
    fake_sweep(tmp_path, "neck", {"fpn": [30.0, 31.0], "smsl_fpn": [31.0, 33.0]}, seeds=(1, 2))
    with caplog.at_level(logging.ERROR, logger="pyramidlab"):
        result = R.write_sweep_report(tmp_path, wandb=False, baseline="neck=pafpn")
    error = result.files.baseline_error
    assert error == ("hydra.callbacks.report.baseline='neck=pafpn': 'neck=pafpn' matches no row; "
                     "rows: neck=fpn; neck=smsl_fpn")
    assert error in caplog.text and error in result.files.md.read_text()
    # the report without differences: the mean table and report_mean.csv as without a baseline
    assert "[baseline]" not in result.files.md.read_text() and "| sig. |" not in result.files.md.read_text()
    assert not any(c.startswith("delta ") for c in read_csv(result.files.mean_csv)[0])
    assert result.files.png.is_file()

    bad = R.write_sweep_report(tmp_path, wandb=False, baseline="fpn").files.baseline_error
    assert bad.startswith("hydra.callbacks.report.baseline='fpn': 'fpn' is not a key=value selection")
    assert "\n" not in bad
    # of several selections, one matching nothing is skipped with a warning (a preset's list names the
    # baselines of its whole table, a sweep over some of its rows has some of them); all: an error
    with caplog.at_level(logging.WARNING, logger="pyramidlab"):
        partial = R.write_sweep_report(tmp_path, wandb=False, baseline=["neck=fpn", "neck=nope"]).files
    assert partial.baseline_error is None and "'neck=nope' matches no row of this sweep, skipped" in caplog.text
    assert "[+1.5 ± 6.4]" in partial.md.read_text()  # smsl_fpn - fpn over seeds 1, 2: +1, +2
    assert "'neck=nope', 'neck=none' match no row" in R.write_sweep_report(
        tmp_path, wandb=False, baseline=["neck=nope", "neck=none"]).files.baseline_error


def test_the_sweep_callback_reads_its_baseline(tmp_path, monkeypatch):
    """hydra.callbacks.report.baseline from the composed config, as the multirun's end hook uses it."""
    fake_sweep(tmp_path, "neck", {"fpn": [30.0, 31.0], "smsl_fpn": [31.0, 33.0]}, seeds=(1, 2))
    monkeypatch.setattr(H, "LAST_SWEEP", None)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.sweep.dir={tmp_path}", "hydra.callbacks.report.wandb=false",
                                          "hydra.callbacks.report.baseline=['neck=fpn']"], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    callback = instantiate(cfg.hydra.callbacks.report)
    assert callback.baseline == ["neck=fpn"]
    callback.on_multirun_end(cfg)
    assert H.LAST_SWEEP is not None and H.LAST_SWEEP.jobs == 4
    mean = {r["neck"]: r for r in read_csv(tmp_path / "report_mean.csv")}
    assert float(mean["smsl_fpn"]["delta bbox/AP [%]"]) == pytest.approx(1.5)  # diffs 1, 2
    ci = 12.706 * math.sqrt(0.5) / math.sqrt(2)  # t(0.975, 1) * sd(1, 2) / sqrt(2)
    assert float(mean["smsl_fpn"]["delta bbox/AP ci95 [%]"]) == pytest.approx(ci, abs=1e-3)


def test_the_report_command_defaults_to_the_sweeps_own_baseline(tmp_path, capsys):
    """``pyramidlab-report DIR`` rewrites the report with the baseline the sweep ran with (its
    multirun.yaml's hydra.callbacks.report.baseline); --baseline chooses another, --no-baseline none."""
    fake_sweep(tmp_path, "neck", {"fpn": [30.0, 31.0], "smsl_fpn": [31.0, 33.0]}, seeds=(1, 2))
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "  callbacks:\n    report:\n      baseline: neck=fpn\n  overrides:\n    task: []\n")

    def delta(row: str) -> str:
        return {r["neck"]: r for r in read_csv(tmp_path / "report_mean.csv")}[row].get("delta bbox/AP [%]", "")

    R.main([str(tmp_path), "--no-wandb"])
    assert float(delta("smsl_fpn")) == pytest.approx(1.5) and delta("fpn") == ""  # diffs 1, 2 to fpn
    out = capsys.readouterr().out  # the printed report.md: fpn 30.5 ± 0.7, smsl_fpn 32.0 ± 1.4
    assert "30.5 ± 0.7 [baseline]" in out and "32.0 ± 1.4 [+1.5 ±" in out
    R.main([str(tmp_path), "--no-wandb", "--baseline", "neck=smsl_fpn"])
    assert float(delta("fpn")) == pytest.approx(-1.5) and delta("smsl_fpn") == ""
    R.main([str(tmp_path), "--no-wandb", "--no-baseline"])
    assert delta("smsl_fpn") == ""  # no delta columns at all
    # a list of baselines (SMSL Table 2's preset) is read as a list
    (tmp_path / "multirun.yaml").write_text("hydra:\n  callbacks:\n    report:\n      baseline: [neck=fpn]\n")
    assert R.sweep_baseline(tmp_path) == ["neck=fpn"]
    (tmp_path / "multirun.yaml").write_text("hydra:\n  callbacks:\n    report:\n      baseline: null\n")
    assert R.sweep_baseline(tmp_path) is None


def pipeline_job(sweep: Path, num: int, seed: int, ap: dict[str, float | None]) -> None:
    """A pyramidlab-srfgan job: its folder holds the pipeline's per-variant report (written by the same
    writer with the pipeline's columns) and metrics.json with the headline (last) variant."""
    rows = [{"variant": v, "description": f"variant {v}", "folder": f"stage_{v}",
             **({"status": "not run", "error": "its stages did not run"} if a is None else
                {"status": "ok", "bbox/AP": a / 100, "segm/AP": (a - 1) / 100, "params_trainable": 12_000_000,
                 "time_ms": 40.0})}
            for v, a in ap.items()]
    job = fake_job(sweep, num, ["experiment=srfgan/table4", f"seed={seed}"], None)
    R.write_report(rows, job, "SRF-GAN Table 4", ["variant", "description"], plot=False)
    headline = {k: v for k, v in rows[-1].items() if k not in ("status", "description")}
    (job / "metrics.json").write_text(json.dumps({"status": "completed", **headline}))


def test_srfgan_sweep_over_seeds_is_one_row_per_variant_and_seed(tmp_path):
    pipeline_job(tmp_path, 0, 1, {"A1": 20.0, "A2": 21.0, "A5": 23.0})
    pipeline_job(tmp_path, 1, 2, {"A1": 21.0, "A2": 23.0, "A5": None})  # A5's stages did not run
    pipeline_job(tmp_path, 2, 3, {"A1": 22.0, "A2": 25.0, "A5": 26.0})
    # killed (no metrics.json): one failed row, though its folder holds an earlier run's report.csv
    killed = fake_job(tmp_path, 3, ["experiment=srfgan/table4", "seed=4"], None)
    R.write_report([{"variant": v, "bbox/AP": 0.5} for v in ("A1", "A2")], killed, "earlier", ["variant"], plot=False)
    result = R.write_sweep_report(tmp_path, wandb=False, baseline="variant=A1")
    assert result.jobs == 4 and result.failed == ["job 3"]
    per_row = read_csv(result.files.csv)
    assert [(r["job"], r["variant"], r["seed"], r["status"]) for r in per_row] == [
        ("0", "A1", "1", "ok"), ("0", "A2", "1", "ok"), ("0", "A5", "1", "ok"),
        ("1", "A1", "2", "ok"), ("1", "A2", "2", "ok"), ("1", "A5", "2", "not run"),
        ("2", "A1", "3", "ok"), ("2", "A2", "3", "ok"), ("2", "A5", "3", "ok"),
        ("3", "", "4", "failed")]
    assert (per_row[1]["bbox/AP [%]"], per_row[1]["segm/AP [%]"], per_row[1]["params [M]"]) == ("21.0", "20.0", "12.0")
    mean = {r["variant"]: r for r in read_csv(result.files.mean_csv)}
    assert list(mean) == ["A1", "A2", "A5", ""]
    assert (mean["A2"]["jobs"], mean["A2"]["ok"], mean["A5"]["ok"]) == ("3", "3", "2")
    # A2 - A1: diffs 1, 2, 3 (seeds 1-3); A5 - A1: seeds 1 and 3 only, diffs 3, 4
    assert float(mean["A2"]["delta bbox/AP [%]"]) == pytest.approx(2.0, abs=1e-3)
    assert float(mean["A2"]["delta bbox/AP ci95 [%]"]) == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert float(mean["A5"]["delta bbox/AP [%]"]) == pytest.approx(3.5, abs=1e-3)
    ci = 12.706 * math.sqrt(0.5) / math.sqrt(2)  # t(0.975, 1) * sd(3, 4) / sqrt(2)
    assert float(mean["A5"]["delta bbox/AP ci95 [%]"]) == pytest.approx(ci, abs=1e-3)
    assert float(mean["A5"]["delta segm/AP [%]"]) == pytest.approx(3.5, abs=1e-3)
    assert mean[""]["ok"] == "0" and mean[""]["delta bbox/AP [%]"] == ""  # the killed job: no paired seed
    md = result.files.md.read_text()
    assert md_rows(md, "A1")[-1][2] == "21.0 ± 1.0 [baseline]"
    assert md_rows(md, "A2")[-1][2] == "23.0 ± 2.0 [+2.0 ± 2.5]"
    assert "One row per variant of each job" in md

    # the pipeline's own report (one seed) with the preset's report_baseline
    rows = [{"variant": v, "description": "", "bbox/AP": a / 100} for v, a in (("A1", 20.0), ("A5", 23.0))]
    files = R.write_report(rows, tmp_path / "single", "T4", ["variant", "description"], plot=False,
                           baseline="variant=A1", baseline_key="report_baseline")
    a5 = md_rows(files.md.read_text(), "A5")[-1]
    assert (a5[3], a5[-1]) == ("23.0 [+3.0 ± n/a]", "variant=A1")  # the baseline by the key its selection names
    bad = R.write_report(rows, tmp_path / "single", "T4", ["variant", "description"], plot=False,
                         baseline="variant=NN", baseline_key="report_baseline").baseline_error
    assert bad.startswith("report_baseline='variant=NN': 'variant=NN' matches no row; rows: variant=A1 description=")


def test_a_sweep_of_one_variant_per_job_keeps_one_row_per_job(tmp_path):
    """SRF-GAN Tables 1, 3, 6, 7 are sweeps of pipelines with one variant each: their report is unchanged."""
    for num, degradation in enumerate(("nearest", "bilinear")):
        job = fake_job(tmp_path, num, [f"srf.degradation={degradation}"], {"status": "completed", "bbox/AP": 0.2})
        R.write_report([{"variant": "A5", "bbox/AP": 0.2}], job, "T6", ["variant"], plot=False)
    per_row = read_csv(R.write_sweep_report(tmp_path, wandb=False).files.csv)
    assert list(per_row[0]) == ["job", "status", "srf.degradation", "bbox/AP [%]", "error"]
    assert [r["srf.degradation"] for r in per_row] == ["nearest", "bilinear"]
