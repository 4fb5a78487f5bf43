"""The examples run end to end (quick mode) as the scripts users run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args, tmp_path, folder="examples", **env_vars):
    """Run ``<folder>/<script> --quick`` as a user would; it must exit cleanly. Its output lines."""
    env = dict(os.environ, MPLBACKEND="Agg", **env_vars)
    result = subprocess.run(
        [sys.executable, str(ROOT / folder / script), "--quick", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()


def _run_benchmark(script, tmp_path, *args):
    """Run ``benchmarks/<script> --quick``: it must exit cleanly and write its plot; returns its
    JSON report."""
    _run(script, "--label", "smoke", *args, tmp_path=tmp_path, folder="benchmarks")
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    return json.loads((tmp_path / "smoke.json").read_text())


@pytest.fixture(autouse=True)
def _once(x64):
    # The examples pick their own precision; running them in the float32 session too adds nothing.
    if not x64:
        pytest.skip("examples run in the float64 session only")


@pytest.mark.slow  # the README's run command runs it too
def test_camera_rays_recovers_indices(tmp_path):
    lines = _run("camera_rays.py", tmp_path=tmp_path)
    last = lines[-1]
    assert last.startswith("index error: ")
    before, after = (float(v) for v in last.removeprefix("index error: ").split(" -> "))
    assert after * 5 <= before, last
    assert (tmp_path / "camera_rays.png").stat().st_size > 10_000
    assert any("lbfgs iter" in line for line in lines)


@pytest.mark.slow
def test_camera_rays_learns_kernel_jointly(tmp_path):
    lines = _run("camera_rays.py", "--learn-kernel", "--no-plots", tmp_path=tmp_path)
    before, after = (float(v) for v in lines[-1].removeprefix("index error: ").split(" -> "))
    assert after * 5 <= before, lines[-1]


@pytest.mark.slow
def test_gplvm_improves_the_layout(tmp_path):
    lines = _run("gplvm.py", tmp_path=tmp_path)
    before, after = (float(v) for v in lines[-1].removeprefix("layout error (Procrustes): ").split(" -> "))
    assert after < before, lines[-1]
    assert (tmp_path / "gplvm.png").stat().st_size > 10_000


@pytest.mark.slow
def test_digits_gplvm_both_paths_separate_the_digits(tmp_path):
    pytest.importorskip("sklearn")  # the data set; .ci/run installs the examples' extra
    lines = _run("digits_gplvm.py", tmp_path=tmp_path)
    last = lines[-1]
    assert last.startswith("5-NN accuracy: PCA ")
    pca = float(last.split("PCA ")[1].split(" ->")[0])
    exact = float(last.split("exact ")[1].split(",")[0])
    bound = float(last.rsplit(" ", 1)[1])
    assert exact > pca + 0.1 and bound > pca + 0.1, last
    assert (tmp_path / "digits_gplvm.png").stat().st_size > 10_000


@pytest.mark.slow
def test_large_gplvm_learns_the_layout_with_the_bound(tmp_path):
    lines = _run("large_gplvm.py", tmp_path=tmp_path)
    before, after = (float(v) for v in lines[-1].removeprefix("layout error (Procrustes): ").split(" -> "))
    assert after < 0.8 * before, lines[-1]
    assert any(line.startswith("iter ") for line in lines)
    assert (tmp_path / "large_gplvm.png").stat().st_size > 10_000


@pytest.mark.slow
def test_many_curves_in_one_vmapped_step(tmp_path):
    lines = _run("many_curves.py", tmp_path=tmp_path)
    before, after = (float(v) for v in lines[-1].removeprefix("index error: ").split(" -> "))
    assert after * 3 <= before, lines[-1]
    assert (tmp_path / "many_curves.png").stat().st_size > 5_000


@pytest.mark.slow
def test_many_curves_sharded_over_four_host_devices(tmp_path):
    one = _run("many_curves.py", "--no-plots", tmp_path=tmp_path)
    flags = "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"
    four = _run("many_curves.py", "--devices", "4", "--no-plots", tmp_path=tmp_path, XLA_FLAGS=flags)
    assert "collectives in the compiled step: none" in four
    assert any("on 4 device(s) (2 per device)" in line for line in four), four
    assert four[-1] == one[-1] and four[-1].startswith("index error: ")


@pytest.mark.slow
def test_long_curve_recovers_indices_with_the_markov_solver(tmp_path):
    lines = _run("long_curve.py", tmp_path=tmp_path)
    last = lines[-1]
    assert last.startswith("index error: ")
    before, after = (float(v) for v in last.removeprefix("index error: ").split(" -> "))
    assert after * 5 <= before, last
    assert (tmp_path / "long_curve.png").stat().st_size > 10_000
    assert any("lbfgs iter" in line for line in lines)


@pytest.mark.slow
def test_jittered_times_recovers_time_stamps(tmp_path):
    lines = _run("jittered_times.py", tmp_path=tmp_path)
    last = lines[-1]
    assert last.startswith("time-stamp error: ")
    before, after = (float(v) for v in last.removeprefix("time-stamp error: ").split(" -> "))
    assert after * 1.5 <= before, last
    assert (tmp_path / "jittered_times.png").stat().st_size > 10_000


@pytest.mark.slow
def test_co2_example_learns_the_year_and_repairs_dates(tmp_path):
    pytest.importorskip("statsmodels")  # the data set; .ci/run installs the examples' extra
    lines = _run("co2_time_stamps.py", tmp_path=tmp_path)
    learned = next(line for line in lines if line.startswith("learned:"))
    period = float(learned.split("period ")[1].split(",")[0])
    assert abs(period - 1.0) < 0.01, learned
    last = lines[-1]
    assert last.startswith("time-stamp error: ")
    before, after = (float(v) for v in last.removeprefix("time-stamp error: ").split(" -> "))
    assert after <= 0.85 * before, last
    assert (tmp_path / "co2_time_stamps.png").stat().st_size > 10_000


@pytest.mark.slow
def test_time_series_benchmark_quick_mode_writes_json_and_plot(tmp_path):
    report = _run_benchmark("time_series.py", tmp_path)
    for row in report["rows"]:
        assert row["checks"]["gradient_vs_autodiff"] < 1e-8
        assert row["checks"].get("gradient_vs_tinygp", 0.0) < 1e-8


@pytest.mark.slow
def test_inducing_benchmark_quick_mode_writes_json_and_plot(tmp_path):
    report = _run_benchmark("inducing.py", tmp_path)
    for row in report["rows"]:
        checks = row["checks"]
        assert checks["grad_x_vs_autodiff"] < 1e-8 and checks["grad_lengthscale_vs_autodiff"] < 1e-8, checks
        assert checks["grad_z_vs_autodiff"] < 1e-6, checks  # Z near data points: K_zz is ill-conditioned
        if "value_vs_GPy" in checks:  # the peer, where installed
            assert checks["value_vs_GPy"] < 1e-9 and checks["grad_x_vs_GPy"] < 1e-5, checks


@pytest.mark.slow
def test_benchmark_quick_mode_writes_json_and_plot(tmp_path):
    report = _run_benchmark("run.py", tmp_path, "--no-peers")
    assert {e["case"] for e in report["results"]} == {"curve_1d", "curve_3d", "se_1d"}
    for entry in report["results"]:
        agreement = entry["gradient_max_relative_difference"]
        worst = max(agreement.values()) if isinstance(agreement, dict) else agreement
        assert worst < 1e-6


@pytest.mark.slow
def test_state_space_benchmark_quick_mode_writes_json_and_plot(tmp_path):
    report = _run_benchmark("state_space.py", tmp_path, "--no-peers")
    (curve,) = report["curve_3d"]
    assert max(curve["gradient_max_relative_difference_vs_autodiff"].values()) < 1e-8
    assert report["matern32_1d"]["checks"]["gradient_vs_autodiff"] < 1e-8
    check = report["parallel_check"]
    assert check["value_relative_difference"] < 1e-10 and check["gradient_relative_difference"] < 1e-8
    (forms,) = report["forms"]
    assert set(forms) == {"n", "float32", "float64"}
    assert {r["kind"] for r in report["draws"]} == {"matern32_1d", "curve_3d"}


@pytest.mark.slow
def test_float32_benchmark_quick_mode_writes_json_and_plot(tmp_path):
    report = _run_benchmark("float32.py", tmp_path)
    rows = [r for family in report["span"].values() for r in family] + report["size"]
    assert all(r["square_root"]["finite"] for r in rows)
    assert all(r["square_root"]["meets_targets"] for r in report["span"]["helix n=40"])
    assert report["estimate_summary"]["problems"] == 12
    assert report["dense_summary"]["problems"] == 12
    missed = [r for r in report["dense"] if r["dense"]["finite"] and not r["dense"]["meets_targets"]]
    assert all(r["warned"] for r in missed), missed


@pytest.mark.slow
def test_batched_benchmark_quick_mode_writes_json_and_plot(tmp_path):
    report = _run_benchmark("batched.py", tmp_path)
    for entry in report["results"]:
        assert entry["gradient_relative_difference"]["written out"] < 1e-8
        assert set(entry["series"]) == {"written out", "LAPACK one at a time", "single problem (LAPACK)", "LAPACK batched"}


@pytest.mark.slow
def test_native_benchmark_quick_mode_writes_json_and_plot(tmp_path):
    report = _run_benchmark("native.py", tmp_path)
    (entry,) = report["rows"]
    assert len(entry["series"]) == 12 and all(v > 0 for v in entry["native_speedup"].values())


def _value_pair(line, label, other):
    """``label: VALUE (other: VALUE)`` → the two values."""
    assert line.startswith(f"{label}: ") and f"({other}: " in line, line
    first, second = line.removeprefix(f"{label}: ").removesuffix(")").split(f" ({other}: ")
    return float(first), float(second)


@pytest.mark.slow
def test_distributed_gplvm_on_two_processes(tmp_path):
    """Two processes on localhost, the points split between them: the one-process bound."""
    lines = _run("distributed_gplvm.py", "--processes", "2", tmp_path=tmp_path)
    cluster, alone = _value_pair(lines[-1], "bound", "one process")
    assert abs(cluster - alone) <= 1e-9 * abs(alone), lines[-1]
    before, after = (float(v) for v in lines[-2].removeprefix("layout error (Procrustes): ").split(" -> "))
    assert after < before, lines[-2]


@pytest.mark.slow
def test_distributed_series_on_four_devices(tmp_path):
    lines = _run("distributed_series.py", "--devices", "4", tmp_path=tmp_path)
    on_mesh, alone = _value_pair(lines[-1], "log density", "one device")
    assert abs(on_mesh - alone) <= 1e-9 * abs(alone), lines[-1]
    assert "P('time',)" in lines[-2], lines[-2]
