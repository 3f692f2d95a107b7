"""pyramidlab-bench's convergence section: Lightning and the plain loop train alike, from one start."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from lightning_modules.bench import bench
from lightning_modules.bench.convergence import schedule_steps, summarize
from tests.conftest import compose_cfg

STEPS = 3
# Tiny and fast, but every part the real run has: loader workers (their seeds must match across the
# arms), two seeds (the second runs the plain arm first), an epoch boundary inside the steps (2 batches
# per epoch: the samplers' set_epoch must match), a learning rate and clipping that move the weights
# (losses after the first step compare optimizer, schedule and clipping)
TINY_CONVERGENCE = [
    "bench.sections=[convergence]",
    "bench.convergence.seeds=[0,1]",
    f"bench.convergence.max_steps={STEPS}",
    "bench.convergence.eval_images=4",
    "bench.threads=1",
    "data.num_workers=1",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.max_train_images=4",
    "data.min_size=96",
    "data.max_size=128",
    "neck.out_channels=32",
    "optim.optimizer.lr=0.01",
    "optim.scheduler.warmup_iters=1",
    "trainer.gradient_clip_val=0.5",
    "logger=csv",
]


@pytest.fixture(scope="module")
def tiny_convergence(tmp_path_factory, shapes_root):
    tmp = tmp_path_factory.mktemp("convergence")
    results = bench(compose_cfg("bench", TINY_CONVERGENCE, tmp, shapes_root))
    yield tmp / "out", results
    shutil.rmtree(tmp, ignore_errors=True)


def test_section_writes_both_arms_aps_times_and_table(tiny_convergence):
    out, results = tiny_convergence
    c = json.loads((out / "bench.json").read_text())["convergence"]
    assert c == json.loads(json.dumps(results["convergence"]))
    assert c["steps"] == STEPS and c["batches_per_epoch"] == 2 and c["seeds"] == [0, 1]
    assert c["eval_split"] == "test" and c["eval_images"] == 4 and c["eval_checkpoint"] == "last"
    for arm in ("lightning", "plain"):
        assert c[f"{arm}_s"] > 0 and c[f"{arm}_img_s"] > 0 and c[f"{arm}_total_s"] >= c[f"{arm}_s"]
        for run in c["runs"]:
            assert all(math.isfinite(run[arm][k]) and -1 <= run[arm][k] <= 1 for k in ("ap", "ap50", "aps"))
    for k in ("ap", "ap50", "ap75", "aps", "apm"):  # apl: no large object among 4 tiny test images (-1: None)
        assert math.isfinite(c[f"{k}_lightning"]) and math.isfinite(c[f"{k}_plain"])
        # the paired difference over the two seeds
        diffs = [r["lightning"][k] - r["plain"][k] for r in c["runs"]]
        assert c[f"{k}_diff"] == pytest.approx(sum(diffs) / 2)
        assert c[f"{k}_diff_std"] is not None and c[f"{k}_lightning_std"] is not None
    md = (out / "bench.md").read_text()
    assert "## Convergence" in md and "| Lightning − plain |" in md and "| plain loop |" in md


def test_both_arms_start_alike_and_train_alike(tiny_convergence):
    """The evidence the comparison is fair: one initialisation, the same first batch (ids and pixels:
    the same flips), the same first-step loss, and on CPU the same loss at every later step too."""
    _, results = tiny_convergence
    c = results["convergence"]
    for run in c["runs"]:
        lit, plain = run["lightning"], run["plain"]
        assert run["same_init_weights"] and run["same_first_batch"]
        assert lit["first_batch"]["image_ids"] == plain["first_batch"]["image_ids"]
        assert lit["first_loss"] == pytest.approx(plain["first_loss"], abs=1e-5)
        assert run["loss_agree_steps"] == STEPS
    # different seeds: different batches and weights (the seeds do something)
    assert c["runs"][0]["lightning"]["first_loss"] != c["runs"][1]["lightning"]["first_loss"]


def test_summary_mean_std_and_paired_difference():
    def run(ap_l: float, ap_p: float, apl: float = 0.5) -> dict:
        arm = {"ap50": 0.1, "ap75": 0.1, "aps": 0.1, "apm": 0.1, "train_s": 2.0, "img_s": 4.0, "total_s": 3.0,
               "final_loss": 1.0}
        return {"lightning": {**arm, "ap": ap_l, "apl": apl}, "plain": {**arm, "ap": ap_p, "apl": apl},
                "first_loss_abs_diff": 0.0, "loss_agree_steps": 5, "same_init_weights": True, "same_first_batch": True}

    s = summarize([run(0.30, 0.20), run(0.10, 0.20, apl=-1.0)])
    assert s["ap_lightning"] == pytest.approx(0.2) and s["ap_plain"] == pytest.approx(0.2)
    assert s["ap_lightning_std"] == pytest.approx(math.sqrt(0.02)) and s["ap_plain_std"] == 0
    assert s["ap_diff"] == pytest.approx(0.0) and s["ap_diff_std"] == pytest.approx(math.sqrt(0.02))
    assert s["apl_lightning"] is None and s["apl_diff"] is None  # -1 (no large object) in one run
    one = summarize([run(0.30, 0.20)])
    assert one["ap_diff"] == pytest.approx(0.1) and one["ap_diff_std"] is None


def test_not_in_the_default_sections_and_full_schedule_follows_the_recipe(tmp_path):
    cfg = compose_cfg("bench", [], tmp_path)
    assert "convergence" not in cfg.bench.sections  # two full trainings: minutes
    c = cfg.bench.convergence
    assert list(c.seeds) == [0] and c.max_steps is None and c.eval_images is None
    # the recipe's own schedule, whatever it is: trainer.max_epochs x batches per epoch
    assert schedule_steps(cfg, 200, None) == cfg.trainer.max_epochs * 200
    assert schedule_steps(cfg, 200, 7) == 7
    with pytest.raises(ValueError, match=r"trainer\.limit_train_batches=0\.5.*bench\.convergence\.max_steps"):
        schedule_steps(compose_cfg("bench", ["trainer.limit_train_batches=0.5"], tmp_path), 200, None)


@pytest.mark.parametrize("override,key", [
    ("bench.convergence.seeds=[]", "bench.convergence.seeds"),
    ("bench.convergence.seeds=[1,1]", "bench.convergence.seeds"),
    ("bench.convergence.max_steps=1", "bench.convergence.max_steps"),
    ("bench.convergence.eval_images=0", "bench.convergence.eval_images"),
])
def test_bad_option_is_one_line_naming_its_key(tmp_path, override, key):
    with pytest.raises(ValueError) as e:
        bench(compose_cfg("bench", ["bench.sections=[convergence]", override], tmp_path))
    assert key in str(e.value) and "\n" not in str(e.value)
