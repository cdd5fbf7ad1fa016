"""``python -m recipes.report``: collecting runs, grouping by config, seed statistics, budgets, interpolation, outputs.

All runs are hand-written ``summary.json`` / ``history.json`` pairs in ``tmp_path``; nothing trains. Expected numbers
are worked out by hand in the comments.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recipes.report import (
    aggregate_curve,
    accuracy_at_sim_time,
    align_rounds,
    collect_runs,
    group_runs,
    interpolate_common,
    load_run,
    main,
    plot_curves,
    run_curve,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUNDS = 4

# Two settings x three seeds. Per seed: final accuracy, seconds of simulated time per round, MB sent per round.
# Setting A: branching [8, 8], alpha 0.5; setting B: branching [4, 4, 4], alpha 0.1.
SETTING_A = {"branching": [8, 8], "alpha": 0.5,
             "final": [0.90, 0.92, 0.94], "dt": [2.0, 2.5, 3.0], "mb": [1.0, 1.1, 1.2], "wall": [1.0, 2.0, 3.0]}
SETTING_B = {"branching": [4, 4, 4], "alpha": 0.1,
             "final": [0.80, 0.85, 0.87], "dt": [2.2, 2.4, 2.6], "mb": [2.0, 2.0, 2.0], "wall": [4.0, 4.0, 4.0]}
LABEL_A = "hierarchy.branching=[8, 8], partition.alpha=0.5"
LABEL_B = "hierarchy.branching=[4, 4, 4], partition.alpha=0.1"


def round_acc(final: float, r: int) -> float | None:
    """Accuracy after round r: final - 0.3, final + 0.01 (the best), not evaluated, final."""
    return {1: final - 0.3, 2: final + 0.01, 3: None, 4: final}[r]


def write_run(run_dir: Path, *, branching: list[int], alpha: float, seed: int, final: float, dt: float, mb: float,
              wall: float, stamp: str = "2026-11-30_10-00-00") -> Path:
    """A fake run: ROUNDS rounds of ``dt`` simulated seconds and ``mb`` MB each; round 3 was not evaluated."""
    run_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    for r in range(1, ROUNDS + 1):
        rec: dict[str, Any] = {"round": r, "local_steps": 10 * r, "train_loss": 1.0 / r, "sim_time": r * dt,
                               "bits_total": r * mb * 8e6, "bits_baseline_total": r * 4 * mb * 8e6,
                               "bits_layer1": r * mb * 8e6 / 2, "bits_layer2": r * mb * 8e6 / 2}
        acc = round_acc(final, r)
        if acc is not None:
            rec["test_acc"], rec["test_loss"] = acc, 1.0 - acc
        history.append(rec)
    config = {
        "seed": seed, "name": f"depth_{stamp}", "run_name": f"sweep_{stamp}_{seed}", "data_dir": f"/data/{seed}",
        "hierarchy": {"branching": branching, "taus": [2, 2], "uplink_rates": None},
        "partition": {"name": "dirichlet", "alpha": alpha, "min_samples": 10},
        "quantizer": {"levels": 8, "bucket_size": 512},
        "trainer": {"rounds": ROUNDS},
    }
    summary = {
        "name": config["name"], "dataset": "mnist", "model": "lenet", "num_params": 21840, "layers": 2,
        "devices": 64, "taus": [2, 2], "quantizers": ["QSGD(8, bucket_size=512)"] * 2,
        "partition": f"Dirichlet(alpha={alpha}, min_samples=10, group_by_edge=False)", "seed": seed,
        "rounds": ROUNDS, "local_steps": 10 * ROUNDS, "executor": "vmap",
        "final_test_acc": final, "best_test_acc": final + 0.01,
        "bits_per_layer": [ROUNDS * mb * 8e6 / 2] * 2, "baseline_bits_per_layer": [ROUNDS * 4 * mb * 8e6 / 2] * 2,
        "bits_total": ROUNDS * mb * 8e6, "baseline_bits_total": ROUNDS * 4 * mb * 8e6,
        "sim_time_s": ROUNDS * dt, "wall_time_s": wall, "config": config,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "history.json").write_text(json.dumps(history))
    return run_dir


def write_multirun(root: Path) -> Path:
    """A Hydra-multirun-like tree ``root/depth/<timestamp>/<job>/`` holding both settings x 3 seeds."""
    sweep = root / "depth" / "2026-11-30_10-00-00"
    job = 0
    for setting in (SETTING_A, SETTING_B):
        for seed in range(3):
            d = write_run(sweep / str(job), branching=setting["branching"], alpha=setting["alpha"], seed=seed,
                          final=setting["final"][seed], dt=setting["dt"][seed], mb=setting["mb"][seed],
                          wall=setting["wall"][seed])
            (d / ".hydra").mkdir()
            (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
            job += 1
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def fmt(values: list[float]) -> str:
    """Hand formula of a table cell: mean ± sample std of percentages."""
    pct = [100 * v for v in values]
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| hierarchy") or line.startswith("| partition") or line.startswith("| all runs"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


# ================================================================================================= end to end
@pytest.fixture()
def multirun(tmp_path: Path) -> Path:
    return write_multirun(tmp_path / "multirun")


def test_main_table_json_and_plots(multirun: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([str(multirun), "--out", str(out), "--name", "depth sweep"])
    md = (out / "report.md").read_text()

    # Default budget: the smallest final simulated time, 4 rounds x 2.0 s = 8.0 s (setting A, seed 0).
    assert "acc @ T = 8.00 s sim. (%)" in md
    rows = table_rows(md)
    # Settings in sorted order: branching [4, 4, 4] before [8, 8]; seeds, timestamps and data_dir not in the label.
    assert list(rows) == [LABEL_B, LABEL_A]
    assert md.index(LABEL_B) < md.index(LABEL_A)

    a = rows[LABEL_A]
    assert a[0] == "3"
    assert a[1] == "92.00 ± 2.00"                      # final 0.90, 0.92, 0.94
    assert a[2] == "93.00 ± 2.00"                      # best 0.91, 0.93, 0.95
    # At T = 8 s: seed 0 (2.0 s/round) has round 4 at 8.0 s -> 0.90; seed 1 (2.5 s) round 2 at 5 s (round 3 at 7.5 s
    # was not evaluated) -> 0.93; seed 2 (3.0 s) round 2 at 6 s -> 0.95.
    assert a[3] == fmt([0.90, 0.93, 0.95]) == "92.67 ± 2.52"
    assert a[4] == "4"
    assert a[5] == "10.00"                             # (8 + 10 + 12) / 3
    assert a[6] == "4.40"                              # 4 rounds x (1.0 + 1.1 + 1.2) / 3 MB
    assert a[7] == "0.250x"                            # every run sends 1/4 of its 32-bit baseline
    assert a[8] == "2.0"

    b = rows[LABEL_B]
    assert b[1] == fmt([0.80, 0.85, 0.87]) == "84.00 ± 3.61"   # deviations -4, 1, 3: sqrt(26 / 2)
    # At T = 8 s: 2.2 s/round -> round 2 (4.4 s; round 3 at 6.6 s not evaluated) -> 0.81; likewise 0.86, 0.88.
    assert b[3] == fmt([0.81, 0.86, 0.88])
    assert b[5] == "9.60" and b[6] == "8.00" and b[8] == "4.0"

    assert "Run directories (6)" in md
    assert "mean ± sample std" in md

    rep = json.loads((out / "report.json").read_text())
    assert rep["budget_sim_time_s"] == pytest.approx(8.0)
    assert rep["group_by"] == ["hierarchy.branching", "partition.alpha"]
    assert len(rep["run_dirs"]) == 6
    sa = rep["settings"][1]
    assert sa["setting"] == LABEL_A and sa["seeds"] == [0, 1, 2]
    assert sa["final_test_acc_pct"]["mean"] == pytest.approx(92.0)
    assert sa["final_test_acc_pct"]["std"] == pytest.approx(2.0)
    assert sa["budget_test_acc_pct"]["values"] == pytest.approx([90.0, 93.0, 95.0])
    assert sa["bits_total_mb_mean"] == pytest.approx(4.4)
    assert sa["bits_ratio_to_32bit_mean"] == pytest.approx(0.25)

    for name in ("accuracy_vs_round.png", "accuracy_vs_sim_time.png", "accuracy_vs_bits.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name
        assert f"]({name})" in md


def test_explicit_budget_group_by_and_subset_of_plots(multirun: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([str(multirun), "--out", str(out), "--group-by", "partition.alpha", "--budget-sim-time", "5",
          "--x", "round", "--band", "minmax"])
    md = (out / "report.md").read_text()
    assert "acc @ T = 5.00 s sim. (%)" in md
    rows = table_rows(md)
    assert list(rows) == ["partition.alpha=0.1", "partition.alpha=0.5"]
    # T = 5 s, setting A: seed 0 round 2 at 4 s -> 0.91; seed 1 round 2 at exactly 5.0 s -> 0.93;
    # seed 2 round 1 at 3 s -> 0.94 - 0.3 = 0.64.
    assert rows["partition.alpha=0.5"][3] == fmt([0.91, 0.93, 0.64])
    assert (out / "accuracy_vs_round.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "accuracy_vs_sim_time.png").exists() and not (out / "accuracy_vs_bits.png").exists()


def test_default_out_dir_and_single_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_run(tmp_path / "runs" / "one", branching=[8, 8], alpha=0.5, seed=0, final=0.9, dt=1.0, mb=1.0,
                    wall=1.0)
    monkeypatch.chdir(tmp_path)
    main([str(run)])
    rows = table_rows((tmp_path / "report" / "report.md").read_text())
    assert rows == {"all runs": ["1", "90.00 ± n/a", "91.00 ± n/a", "90.00 ± n/a", "4", "4.00", "4.00", "0.250x",
                                 "1.0"]}
    assert (tmp_path / "report" / "accuracy_vs_bits.png").read_bytes()[:8] == PNG_MAGIC


# ================================================================================================= collecting
def test_collect_recurses_and_deduplicates(multirun: Path, tmp_path: Path) -> None:
    runs = collect_runs([tmp_path / "multirun"])
    assert [r.path.name for r in runs] == ["0", "1", "2", "3", "4", "5"]
    # A run given both directly and through its parent is collected once.
    again = collect_runs([multirun / "2", tmp_path])
    assert len(again) == 6
    groups = group_runs(runs)
    assert list(groups) == [LABEL_B, LABEL_A]
    # Hydra job numbers sort numerically.
    for job in (10, 9):
        write_run(tmp_path / "jobs" / str(job), branching=[8, 8], alpha=0.5, seed=job, final=0.9, dt=1.0, mb=1.0,
                  wall=1.0)
    assert [r.path.name for r in collect_runs([tmp_path / "jobs"])] == ["9", "10"]
    assert [r.seed for r in groups[LABEL_A]] == [0, 1, 2]


def test_missing_and_malformed_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main([str(empty), "--out", str(tmp_path / "out")])
    assert str(empty) in str(e.value) and "summary.json" in str(e.value)

    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as e:
        main([str(missing)])
    assert str(missing) in str(e.value)

    bad = write_run(tmp_path / "bad", branching=[8], alpha=0.5, seed=0, final=0.9, dt=1.0, mb=1.0, wall=1.0)
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "bad"), "--out", str(tmp_path / "out")])
    assert str(bad / "summary.json") in str(e.value) and "malformed" in str(e.value)

    (bad / "summary.json").write_text(json.dumps({"config": {}, "rounds": 1}))
    with pytest.raises(ValueError, match=r"bad/summary.json.*'bits_total'"):
        load_run(bad)

    ok = write_run(tmp_path / "ok", branching=[8], alpha=0.5, seed=0, final=0.9, dt=1.0, mb=1.0, wall=1.0)
    (ok / "history.json").write_text(json.dumps([{"round": 1, "test_acc": "high"}]))
    with pytest.raises(ValueError, match=r"ok/history.json.*record 0.*'test_acc'"):
        load_run(ok)
    (ok / "history.json").unlink()
    with pytest.raises(ValueError, match=r"no history.json"):
        load_run(ok)


def test_unknown_group_by_key(multirun: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"'partition.beta'"):
        main([str(multirun), "--out", str(tmp_path / "out"), "--group-by", "partition.beta"])


# ============================================================================================ budget, curves
def test_accuracy_at_sim_time_picks_last_evaluated_record(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "r", branching=[8], alpha=0.5, seed=0, final=0.9, dt=2.5, mb=1.0,
                             wall=1.0))
    # Records: round 1 at 2.5 s (0.6), round 2 at 5.0 s (0.91), round 3 at 7.5 s (no test_acc), round 4 at 10 s (0.9).
    assert accuracy_at_sim_time(run, 2.0) is None
    assert accuracy_at_sim_time(run, 2.5) == pytest.approx(0.6)
    assert accuracy_at_sim_time(run, 4.99) == pytest.approx(0.6)
    assert accuracy_at_sim_time(run, 5.0) == pytest.approx(0.91)
    assert accuracy_at_sim_time(run, 9.9) == pytest.approx(0.91)      # round 3 was not evaluated
    assert accuracy_at_sim_time(run, 10.0) == pytest.approx(0.9)
    assert accuracy_at_sim_time(run, 1e9) == pytest.approx(0.9)


def test_interpolate_common_hand_case() -> None:
    # Seed a: (0, 0), (10, 0.5), (20, 0.7); seed b: (5, 0.2), (15, 0.6), (25, 0.8). Common range [5, 20];
    # grid = the knots inside: 5, 10, 15, 20.
    # a at 5: 0.25, at 15: 0.6; b at 10: (0.2 + 0.6) / 2 = 0.4, at 20: (0.6 + 0.8) / 2 = 0.7.
    a = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 0.5, 0.7]))
    b = (np.array([5.0, 15.0, 25.0]), np.array([0.2, 0.6, 0.8]))
    grid, ys = interpolate_common([a, b])
    np.testing.assert_allclose(grid, [5, 10, 15, 20])
    np.testing.assert_allclose(ys, [[0.25, 0.5, 0.6, 0.7], [0.2, 0.4, 0.6, 0.7]])
    assert interpolate_common([a, (np.array([30.0, 40.0]), np.array([0.1, 0.2]))]) is None   # no overlap
    assert interpolate_common([a, (np.array([]), np.array([]))]) is None


def test_align_rounds_keeps_common_rounds() -> None:
    a = (np.array([1.0, 2.0, 4.0]), np.array([0.1, 0.2, 0.4]))
    b = (np.array([2.0, 3.0, 4.0]), np.array([0.3, 0.5, 0.6]))
    grid, ys = align_rounds([a, b])
    np.testing.assert_allclose(grid, [2, 4])
    np.testing.assert_allclose(ys, [[0.2, 0.4], [0.3, 0.6]])


def test_aggregate_curve_mean_and_bands(multirun: Path) -> None:
    groups = group_runs(collect_runs([multirun]))
    runs = groups[LABEL_A]
    xs, ys = run_curve(runs[1], "sim_time")
    np.testing.assert_allclose(xs, [2.5, 5.0, 10.0])                  # round 3 (7.5 s) was not evaluated
    np.testing.assert_allclose(ys, [0.62, 0.93, 0.92])
    # Rounds 1, 2, 4 for every seed: mean at round 4 = 0.92, std 0.02.
    c = aggregate_curve(runs, "round")
    np.testing.assert_allclose(c.x, [1, 2, 4])
    np.testing.assert_allclose(c.mean[-1], 0.92)
    np.testing.assert_allclose(c.hi[-1] - c.mean[-1], 0.02)
    mm = aggregate_curve(runs, "round", band="minmax")
    np.testing.assert_allclose([mm.lo[-1], mm.hi[-1]], [0.90, 0.94])
    # Simulated time: common range [3, 8] (latest start: seed 2 at 3 s; earliest end: seed 0 at 8 s).
    t = aggregate_curve(runs, "sim_time")
    assert t.x[0] == pytest.approx(3.0) and t.x[-1] == pytest.approx(8.0)
    # At 8 s: seed 0 = 0.90 (its round 4); seed 1 between (5, 0.93) and (10, 0.92): 0.924;
    # seed 2 between (6, 0.95) and (12, 0.94): 0.95 - 0.01 / 3.
    assert t.mean[-1] == pytest.approx((0.90 + 0.924 + (0.95 - 0.01 / 3)) / 3)
    # Bits: seed k sends mb_k MB per round; the common MB range is [1.2, 4.0].
    bits = aggregate_curve(runs, "bits")
    assert bits.x[0] == pytest.approx(1.2) and bits.x[-1] == pytest.approx(4.0)


def test_summarize_direct(multirun: Path) -> None:
    groups = group_runs(collect_runs([multirun]), ["partition.alpha"])
    rows = summarize(groups)        # default budget: 8.0 s
    assert [r["setting"] for r in rows] == ["partition.alpha=0.1", "partition.alpha=0.5"]
    assert rows[0]["budget_sim_time_s"] == pytest.approx(8.0)
    assert rows[1]["best_test_acc_pct"]["mean"] == pytest.approx(93.0)
    assert rows[0]["final_test_acc_pct"]["std"] == pytest.approx(math.sqrt(13.0))
    assert rows[1]["rounds"] == {"mean": 4.0, "min": 4, "max": 4}


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_long_setting_labels_are_wrapped_below_the_plot(multirun: Path, tmp_path: Path) -> None:
    runs = group_runs(collect_runs([multirun]))[LABEL_A]
    short, long = tmp_path / "short.png", tmp_path / "long.png"
    assert plot_curves({"a=1": runs}, "round", short) == []
    long_label = ", ".join(f"latency.option_{i}=[0.06, null, null]" for i in range(6))  # ~220 characters
    assert plot_curves({long_label: runs, "b=2": runs}, "round", long) == []
    (w0, h0), (w1, h1) = _png_size(short), _png_size(long)
    assert h1 > h0 + 40  # room for the wrapped legend under the axes
    assert w1 <= 1.1 * w0  # wrapped, not widened to the label's length
