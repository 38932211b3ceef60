"""scripts/load_serve.py, the load test of issue 24: it refuses bad flags before starting anything,
its acceptance arithmetic holds at the thresholds, its engine rows never hit the prompt cache, and
it runs end to end against a live `zturbo serve` on the tiny model (one server start in CI; the
whole run, engine child and warm restart included, outside CI)."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "load_serve.py"
TINY_RUN = ["--device", "cpu", "--compile", "off", "--large", "64", "--small", "32", "--steps", "1", "--rounds", "3"]


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("load_serve", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ls = load_script()


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def options(**given: Any) -> argparse.Namespace:
    return ls.parse_args(["--model", "tiny-random", *[f"--{k.replace('_', '-')}={v}" for k, v in given.items()]])


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--large", "100"], "--large 100 must be a positive multiple of 16"),
        (["--rounds", "0"], "--rounds 0 must be at least 1"),
        (["--warmup-rounds", "-1"], "--warmup-rounds -1 must be at least 0"),
        (["--model", "/no/such/checkpoint"], "--model /no/such/checkpoint is not a directory"),
        (["--warm-only"], "--warm-only needs --work DIR holding an earlier run's compile-cache; got --work None"),
        (["--max-batch", "2"], "--max-batch 2 must be one of --engine-batches 1,4,8"),
        (["--engine-batches", "1,x"], "--engine-batches 1,x must be comma-separated whole numbers"),
        (["--engine-batches", "0,4"], "--engine-batches 0,4 must be comma-separated numbers of at least 1"),
        (["--start-warm"], "--start-warm needs a warm compile cache"),  # no --work: a new, empty one
        (["--scenarios", "512x2"], "--scenarios item '512x2': want KEY or KEY:ROUNDS, each KEY once, one of 1024x1,"),
        (["--scenarios", "512x1,512x1:4"], "--scenarios item '512x1:4'"),
        (["--scenarios", "512x1:0"], "--scenarios item '512x1:0'"),
    ],
)
def test_a_bad_flag_is_refused_in_one_line_before_anything_starts(tmp_path, flags, named):
    model = [] if "--model" in flags else ["--model", "tiny-random"]
    proc = run_script(*model, *flags, "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"load_serve: error: {named}"), proc.stderr
    assert not (tmp_path / "out").exists()  # refused before the output or any process was made


def test_start_warm_is_refused_where_nothing_fills_the_compile_cache_it_reports_as_warm(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cache = str(work / "compile-cache")
    for flags in ([], ["--engine-cache", str(work / "engine-cache")], ["--engine-cache", cache, "--no-engine"]):
        proc = run_script("--model", "tiny-random", "--start-warm", "--work", str(work), *flags, timeout=60)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip()
        assert line.startswith("load_serve: error: --start-warm needs a warm compile cache") and "\n" not in line
        assert f"got --work {work}" in line
    # The engine's child fills it (the engine rows on), or an earlier run left it filled: both allowed.
    assert ls.parse_args(["--model", "tiny-random", "--start-warm", "--work", str(work), "--engine-cache", cache])
    (work / "compile-cache").mkdir()
    (work / "compile-cache" / "entry").write_text("x")
    assert ls.parse_args(["--model", "tiny-random", "--start-warm", "--work", str(work), "--no-engine"])


def test_start_warm_stops_before_the_start_where_the_engine_left_the_cache_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ls, "measure_engine", lambda *_: {"rows": {}})  # compiled nothing (e.g. --compile off)
    monkeypatch.setattr(ls, "serve_phase", lambda *_a, **_k: pytest.fail("a server started on an empty cache"))
    argv = ["--model", "tiny-random", "--start-warm", "--work", str(tmp_path)]
    args = ls.parse_args([*argv, "--engine-cache", str(tmp_path / "compile-cache")])
    with pytest.raises(SystemExit) as stopped:
        ls.run(args, argv, tmp_path, tmp_path)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"load_serve: error: --start-warm: {tmp_path / 'compile-cache'} is empty after the engine's rows, "
        "so the start would be cold"
    )


def engine_rows(large: dict[str, float], small: dict[str, float]) -> dict[str, Any]:
    return {
        f"{size}x{batch}": {"size": size, "batch": batch, "median_s": batch / ips, "images_per_s": ips}
        for size, rates in ((1024, large), (512, small))
        for batch, ips in ((1, rates["b1"]), (4, rates["b4"]), (8, rates["b8"]))
    }


def results(p50: float, four: float, sixteen: float, warm: float) -> dict[str, Any]:
    """A run whose engine makes 1.25 images/s at 1024² (0.8 s each) and 5 images/s at 512², batch 4
    (6 at batch 8)."""
    rows = engine_rows({"b1": 1.25, "b4": 1.3, "b8": 1.3}, {"b1": 4.0, "b4": 5.0, "b8": 6.0})
    scenario = {"errors": 0, "p90_s": 1.0}
    return {
        "engine": {"rows": rows},
        "scenarios": {
            "1024x1": {**scenario, "size": 1024, "clients": 1, "p50_s": p50, "images_per_s": 1 / p50},
            "1024x4": {
                **scenario,
                "size": 1024,
                "clients": 4,
                "p50_s": 3.3,
                "images_per_s": four,
                "images_per_s_wall": 1.1,
                "steady_images": 28,
                "steady_window_s": 23.0,
                "steady_bursts": 7,
                "steady_burst_sizes": [4, 4, 4, 4, 4, 4, 4],
            },
            "512x1": {**scenario, "size": 512, "clients": 1, "p50_s": 0.26, "images_per_s": 3.8},
            "512x16": {
                **scenario,
                "size": 512,
                "clients": 16,
                "p50_s": 3.2,
                "images_per_s": sixteen,
                "per_batch_s": {"batches": 10.0},  # 76 answers in 10 batches: 7.6 each, nearest engine batch 8
                "account_images": 76,
            },
        },
        "starts": {
            "cold": {"ready_s": 90.0, "ready": {"status": "ready", "workers": {}}},
            "warm": {
                "ready_s": warm,
                "ready": {"status": "ready", "ready_s": warm - 1, "compile_cache": "hit"},
                "warm_s": warm + 4.5,  # the warm-up parts run after ready, done
                "warm": {"status": "ready", "ready_s": warm - 1, "compile_cache": "hit", "warm_s": warm + 3.5},
            },
        },
    }


def test_the_acceptance_checks_hold_at_their_thresholds_and_fail_just_past_them():
    args = options()
    limit = 0.8 * 1.05 + 0.020
    at = ls.checks(results(p50=limit, four=1.25 * 0.97, sixteen=5.0, warm=30.0), args)
    assert [c.met for c in at] == [True] * 4
    past = ls.checks(results(p50=limit + 1e-6, four=1.25 * 0.97 - 1e-6, sixteen=5.0 - 1e-6, warm=30.001), args)
    assert [c.met for c in past] == [False] * 4
    assert [c.engine for c in past] == [0.8, 1.25, 5.0, None]  # batch 1 at 1024², --max-batch 4 at 512²


def test_a_warm_start_whose_worker_compiled_is_no_warm_start_however_quick():
    res = results(p50=0.8, four=1.25, sixteen=5.0, warm=12.0)
    res["starts"]["warm"]["ready"]["compile_cache"] = "miss"
    warm = ls.checks(res, options())[-1]
    assert warm.name == "start to ready, warm compile cache: s" and warm.server == 12.0 and not warm.met
    assert warm.target == "<= 30 s, /ready compile_cache hit (said miss)"
    res["checks"] = [vars(c) for c in ls.checks(res, options())]
    said = "| start to ready, warm compile cache: s | 12.000 | - | <= 30 s, /ready compile_cache hit (said miss) | NO |"
    assert said in ls.markdown(res, options())


def test_the_report_puts_each_server_number_beside_the_engine_and_says_what_missed():
    res = results(p50=0.9, four=1.2, sixteen=5.5, warm=12.0)
    args = options()
    res["checks"] = [vars(c) for c in ls.checks(res, args)]
    md = ls.markdown(res, args)
    assert (
        "| 1024² x 4 client(s) (steady: 28 images in 23.000 s, 7 bursts of 4) | 1.200 | 1.100 | 3.300 | 1.000 "
        "| 1.250 | 1.300 | 96.0 % | 92.3 % | 0.800 | - |"
    ) in md  # the steady-state rate, the bursts it counted, and the wall time's rate beside it
    assert (
        "| 512² x 16 client(s) (10 batches: engine 0.0000, host 0.0000, idle 0.0000 s each) | 5.500 | - | 3.200 "
        "| 1.000 | 4.000 | 5.000 | 137.5 % | 110.0 % | 0.250 | 91.7 % (batch 8; server's mean 7.60) |"
    ) in md  # beside --max-batch's row (the acceptance's) and beside the batch the server ran
    assert "| 1024² one at a time: p50 s | 0.900 | 0.800 | <= 1.05 x engine + 20 ms = 0.860 s | NO |" in md
    assert "| start to ready, warm compile cache: s | 12.000 | - | <= 30 s, /ready compile_cache hit | yes |" in md
    assert "| cold compile cache | 90.0 | - | - |" in md
    warm_said = '{"ready_s": 11.0, "compile_cache": "hit", "warm_s": 15.5}'
    assert f"| warm compile cache | 12.0 | 16.5 | {warm_said} |" in md  # the server's own words
    without_engine = ls.checks({**res, "engine": {}}, args)
    assert [c.name for c in without_engine] == ["start to ready, warm compile cache: s"]  # no ratio without a reference


def test_a_scenario_without_a_steady_window_says_why_and_is_held_to_nothing():
    res = results(p50=0.8, four=1.25, sixteen=5.0, warm=12.0)
    reason = "fewer than two bursts of answers while every client was in its timed requests"
    res["scenarios"]["512x16"] |= {"images_per_s": None, "images_per_s_wall": 4.2, "steady_reason": reason}
    args = options()
    assert "32² 16 clients" not in [c.name for c in ls.checks(res, options(small=32))]
    assert [c.name.split(":")[0] for c in ls.checks(res, args)] == [
        "1024² one at a time",
        "1024² 4 clients",
        "start to ready, warm compile cache",
    ]
    md = ls.markdown(res, args)
    assert f"| 512² x 16 client(s) (no steady rate: {reason}) (10 batches: " in md
    row = next(line for line in md.splitlines() if line.startswith("| 512² x 16"))
    assert "| - | 4.200 | 3.200 |" in row and row.endswith("| - | - | 0.250 | - |")  # no rate: no ratios


def served(clients: int, warmup: int, rounds: int, batch: int = 4, period: float = 0.5) -> list[dict[str, Any]]:
    """The records of clients that each send `warmup` then `rounds` requests back to back to a server
    that answers the first `batch` queued every `period` s, a batch's answers 0-3 ms apart (as the
    clients see them); every client sends its first request at 0."""
    queue = deque((0.0, client, 0) for client in range(clients))
    now, records = 0.0, []
    while queue:
        now += period
        for position, (sent, client, index) in enumerate([queue.popleft() for _ in range(min(batch, len(queue)))]):
            done = now + position * 0.001
            records.append({"client": client, "warmup": index < warmup, "sent": sent, "done": done,
                            "latency_s": done - sent})  # fmt: skip
            if index + 1 < warmup + rounds:
                queue.append((done, client, index + 1))
    return records


def test_the_steady_window_counts_whole_batches_between_the_last_warm_up_and_the_first_client_done():
    records = served(clients=8, warmup=2, rounds=5)
    window = ls.steady_window(records)
    # Batches 1-4 are warm-ups (two groups of 4 clients, two each); group A's timed batches end at
    # 5, 7, ..., 13 periods and group B's at 6, ..., 14: the window is from batch 4's last answer to
    # batch 13's, 9 whole batches, and batch 14 (group B's tail, A done) is out.
    assert window["steady_reason"] is None and window["steady_images"] == 9 * 4
    assert window["steady_window_s"] == pytest.approx(9 * 0.5)
    assert window["images_per_s"] == pytest.approx(4 / 0.5, rel=1e-12)  # the server's rate, exactly
    assert window["steady_bursts"] == 9 and window["steady_burst_sizes"] == [4] * 9  # as /metrics would count
    last_warm_up = max(r["done"] for r in records if r["warmup"])
    first_done = min(max(r["done"] for r in records if r["client"] == c) for c in range(8))
    counted = [r for r in records if not r["warmup"] and last_warm_up < r["done"] <= first_done + 0.003]
    assert len(counted) == window["steady_images"] < 8 * 5  # no warm-up answer, no tail answer
    ramp = ls.steady_window(served(clients=8, warmup=0, rounds=5))  # no warm-up: from the last first send
    assert ramp["images_per_s"] == pytest.approx(8.0, rel=1e-12) and ramp["steady_images"] == 8 * 4
    assert sum(ramp["steady_burst_sizes"]) == ramp["steady_images"] == 4 * ramp["steady_bursts"]


def test_the_wall_rate_runs_from_every_client_timed_to_the_last_answer_tail_included():
    records = served(clients=8, warmup=2, rounds=5)
    wall = ls.wall_rate(records)
    # From batch 4's last answer (the last warm-up) to batch 14's: 10 batches of 4 in 5.0 s, the
    # server's rate; counted from the first timed send (batch 3's end, while group B still warmed
    # up), the same 40 images would make 7.27/s.
    assert wall["wall_images"] == 40 and wall["wall_window_s"] == pytest.approx(5.0)
    assert wall["images_per_s_wall"] == pytest.approx(8.0, rel=1e-12)
    # A tail that one client finishes alone at a sequential pace lowers it, not the steady rate.
    tail = served(clients=2, warmup=1, rounds=6, batch=2, period=0.5)
    tail += [{"client": 0, "warmup": False, "sent": 3.5, "done": 4.5 + i, "latency_s": 1.0} for i in range(3)]
    assert ls.wall_rate(tail)["images_per_s_wall"] < ls.steady_window(tail)["images_per_s"]


def test_scenarios_picks_which_run_in_their_order_each_with_its_rounds():
    assert [(s.key, s.rounds) for s in ls.scenarios(options(rounds=3))] == [
        ("1024x1", 3),
        ("1024x4", 3),
        ("512x1", 3),
        ("512x16", 3),
    ]
    picked = ls.scenarios(options(rounds=3, scenarios="512x1:60,1024x1"))
    assert [(s.key, s.size, s.clients, s.rounds) for s in picked] == [("1024x1", 1024, 1, 3), ("512x1", 512, 1, 60)]


def test_one_client_gets_its_sequential_rate_and_latencies_over_every_timed_request(monkeypatch):
    records = served(clients=1, warmup=2, rounds=5, period=0.25)
    window = ls.steady_window(records)
    assert window["steady_images"] == 5 and window["images_per_s"] == pytest.approx(4.0, rel=1e-12)
    account = {"batches": 0.0, "engine": 0.0}
    readings = {"start": account, "end": {"batches": 5.0, "engine": 1.0}, "start_at": 0.5, "end_at": 1.75}
    monkeypatch.setattr(ls, "drive", lambda *_: (records, readings))
    row = ls.run_scenario("http://x", "k", ls.Scenario("512x1", 512, 1, 5), options(), iter(()))
    assert row["requests"] == row["images"] == row["steady_images"] == 5 and row["errors"] == 0
    assert row["images_per_s"] == row["images_per_s_wall"] == pytest.approx(4.0)  # sequential: both the same
    assert row["p50_s"] == row["p90_s"] == pytest.approx(0.25) and row["wall_s"] == pytest.approx(1.25)
    assert row["wall_window_s"] == pytest.approx(1.25) and row["wall_images"] == 5
    assert row["per_batch_s"] == {"batches": 5.0, "engine": 0.2} and row["account_window_s"] == 1.25
    assert row["account_images"] == 5 and ls.server_batch(row) == 1.0  # answers over batches between readings
    assert row["steady_bursts"] == 5 and row["steady_burst_sizes"] == [1] * 5
    alone = ls.steady_window(served(clients=1, warmup=0, rounds=1))
    assert alone["images_per_s"] is None and alone["steady_reason"] and alone["steady_images"] == 0


def test_only_the_serve_flags_this_checkout_has_are_passed_and_every_compile_cache_is_the_runs(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "zturbo.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=True,
    ).stdout
    features = ls.serve_features(help_text)
    cmd = ls.serve_command(options(), 8000, tmp_path, features)
    assert ("--compile-cache" in cmd) == ("--compile-cache" in help_text)
    assert "--max-batch" not in cmd  # the server's own batching defaults, as a user's server has them
    later = ls.serve_command(options(), 8000, tmp_path, ["--compile-cache"])
    assert later[later.index("--compile-cache") + 1] == str(tmp_path / "compile-cache")
    ray_args = ls.parse_args(["--model", "tiny-random", "--serve-arg=--ray", "--serve-arg=auto"])
    ray = ls.serve_command(ray_args, 8000, tmp_path, [])
    assert ray[-2:] == ["--ray", "auto"]
    env = ls.child_env(tmp_path / "cache", "k")
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path / "cache"))
    assert env["TRITON_CACHE_DIR"].startswith(str(tmp_path / "cache"))
    assert env["ZTURBO_API_KEY"] == "k"


def test_engine_rows_time_every_call_with_new_prompts_of_one_token_length(engine):
    pairs = list(zip(range(3), ls.prompts(99998), strict=False))
    lengths = {len(engine.components.tokenizer(p).input_ids) for _, (p, _) in pairs}
    assert len(lengths) == 1  # 099998, 099999, 100000: one step graph shape for every request
    hits = engine.prompt_cache.hits
    rows = ls.engine_rates(
        engine,
        options(large=48, small=32, max_batch=2, engine_batches="1,2", engine_runs=2, engine_warmup=0, steps=1),
        ls.prompts(),
    )
    assert engine.prompt_cache.hits == hits  # the text encoder ran in every timed call, as it does in the server
    assert set(rows) == {"48x1", "48x2", "32x1", "32x2"}
    for row in rows.values():
        assert len(row["runs_s"]) == 2 and row["images_per_s"] == pytest.approx(row["batch"] / row["median_s"])
        assert 0 < row["stages_s"]["denoise_decode_s"] <= max(row["runs_s"])  # the engine's own stages


def check_run(out: Path, proc: subprocess.CompletedProcess[str], starts: set[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "load.json").read_text())
    assert list(res["scenarios"]) == ["64x1", "64x4", "32x1", "32x16"]
    for sc in res["scenarios"].values():  # every request answered with a decodable image of its size
        assert sc["requests"] == sc["images"] == sc["clients"] * 3 and sc["errors"] == 0, sc
        assert sc["formats"] == ["PNG"] and 0 < sc["p50_s"] <= sc["p90_s"] and sc["images_per_s_wall"] > 0
        # One client's steady window is its timed requests; several clients' may hold too few answers on a CPU.
        steady = sc["clients"] == 1 or sc["images_per_s"] is not None
        assert (sc["images_per_s"] > 0 and sc["steady_reason"] is None) if steady else sc["steady_reason"], sc
        assert 0 < sc["steady_images"] <= sc["images"] if steady else sc["steady_images"] == 0, sc
        sizes = sc["steady_burst_sizes"]  # the bursts the window holds, whole: their answers are its images
        assert len(sizes) == sc["steady_bursts"] and sum(sizes) == sc["steady_images"], sc
        assert 0 < sc["wall_images"] <= sc["images"] and sc["wall_window_s"] > 0, sc
        assert 0 <= sc["account_images"] <= sc["requests"], sc  # read after the last warm-up's answer
        batch = sc["per_batch_s"]  # the workers' own account of the steady window, from /metrics
        assert 0 <= batch["batches"] <= sc["requests"] and sc["account_window_s"] >= 0, batch
        if sc["clients"] == 1:  # one batch per request, counted between the two readings
            assert batch["batches"] >= 1 and batch["engine"] > 0 and batch["host"] >= 0, batch
            assert 0 < batch["stage:denoise_decode_s"] <= batch["engine"], batch  # the engine's stages, per batch
    assert set(res["starts"]) == starts and all(s["ready"]["status"] == "ready" for s in res["starts"].values())
    # Each start waited for the warm-up parts its worker runs after ready, before any timed request.
    assert all(s["warm_s"] >= s["ready_s"] and "small_call_s" in s["warm"]["deferred_warmup_parts"]
               for s in res["starts"].values())  # fmt: skip
    assert (out / "load.md").read_text().strip() in proc.stdout
    return res


def test_one_server_start_under_every_scenario_on_the_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "--model",
        str(tiny_dir),
        *TINY_RUN,
        "--warmup-rounds",
        "1",
        "--no-engine",
        "--no-restart",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
    )
    res = check_run(out, proc, {"cold"})
    assert res["checks"] == []  # no engine rows, no warm start: nothing to hold the server against
    assert (out / "serve-cold.log").exists() and not (out / "engine.log").exists()


@pytest.mark.skipif(bool(os.environ.get("CI")), reason="about a minute of CPU: the engine child and two server starts")
def test_the_whole_run_on_the_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "--model",
        str(tiny_dir),
        *TINY_RUN,
        "--warmup-rounds",
        "1",
        "--engine-runs",
        "1",
        "--engine-warmup",
        "1",
        "--out",
        str(out),
    )
    res = check_run(out, proc, {"cold", "warm"})
    assert set(res["engine"]["rows"]) == {"64x1", "64x4", "64x8", "32x1", "32x4", "32x8"}
    env = res["environment"]
    assert env["scripts_sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:16]
    assert env["dirty"] in (True, False, None) and "machine_id" in env and env["host"]
    assert [c["name"].split(":")[0] for c in res["checks"]] == [
        "64² one at a time",
        "64² 4 clients",
        "32² 16 clients",
        "64² previews on",
        "start to ready, warm compile cache",
    ]
    previews = res["engine"]["previews"]
    assert len(previews["plain_runs_s"]) == len(previews["preview_runs_s"]) == 1 and previews["preview_s"] > 0


def test_a_run_split_over_calls_merges_into_one_report_from_one_machine_only(tmp_path):
    whole = results(p50=0.9, four=1.2, sixteen=5.5, warm=12.0)
    env = {"host": "gpu-1"}
    parts = {
        "serve": {"environment": env, "options": {"large": 1024}, "scenarios": whole["scenarios"], "starts": {}},
        "engine": {"environment": env, "engine": whole["engine"], "scenarios": {}, "starts": {}},
        "warm": {"environment": env, "starts": {"warm": whole["starts"]["warm"]}},
    }
    for name, part in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    merged = ls.merge([str(tmp_path / f"{name}.json") for name in parts])
    assert merged["engine"] == whole["engine"] and merged["scenarios"] == whole["scenarios"]
    assert merged["starts"] == {"warm": whole["starts"]["warm"]} and merged["options"] == {"large": 1024}
    assert [c.met for c in ls.checks(merged, options())] == [False, False, True, True]
    (tmp_path / "other.json").write_text(json.dumps({**parts["warm"], "environment": {"host": "gpu-2"}}))
    with pytest.raises(SystemExit):
        ls.merge([str(tmp_path / "serve.json"), str(tmp_path / "other.json")])


def test_merge_tells_machines_apart_by_machine_id_where_every_file_has_one(tmp_path, capsys):
    def part(name: str, host: str, machine_id: str | None) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"environment": {"host": host, "machine_id": machine_id}, "starts": {}}))
        return str(path)

    # One machine whose container got another host name per call: one machine_id, merged.
    assert ls.merge([part("a", "box-1", "m1"), part("b", "box-2", "m1")])["merged"]
    with pytest.raises(SystemExit):  # one host name, two machines
        ls.merge([part("c", "box", "m1"), part("d", "box", "m2")])
    assert "2 machines by machine_id" in capsys.readouterr().err
    assert ls.merge([part("e", "box", "m1"), part("f", "box", None)])["merged"]  # one without: by host


def test_the_environment_says_which_code_ran_whatever_the_commit_says():
    env = ls.environment()
    assert env["scripts_sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:16]
    assert env["dirty"] in (True, False) and env["commit"]  # this checkout has git
    machine_id = Path("/etc/machine-id")
    assert env["machine_id"] == (machine_id.read_text().strip() or None if machine_id.is_file() else None)


def test_gpus_go_to_the_server_for_replica_scaling(tmp_path):
    cmd = ls.serve_command(options(gpus="0,1"), 8000, tmp_path, [])
    assert cmd[cmd.index("--gpus") + 1] == "0,1"
    assert "--gpus" not in ls.serve_command(options(), 8000, tmp_path, [])


def test_a_start_on_a_cache_the_engine_filled_is_the_warm_start_and_carries_the_scenarios(tmp_path, monkeypatch):
    (tmp_path / "compile-cache").mkdir()
    (tmp_path / "compile-cache" / "entry").write_text("x")
    starts: list[tuple[str, bool]] = []

    def phase(args: Any, work: Path, out: Path, kind: str, during: Any = None) -> dict[str, Any]:
        starts.append((kind, during is not None))
        return {"ready": {}, "ready_s": 1.0, "warm_s": 2.0}

    monkeypatch.setattr(ls, "serve_phase", phase)
    argv = ["--model", "tiny-random", "--no-engine", "--work", str(tmp_path)]
    with pytest.raises(SystemExit):  # a filled cache is no cold start
        ls.run(ls.parse_args(argv), argv, tmp_path, tmp_path)
    res = ls.run(ls.parse_args([*argv, "--start-warm"]), argv, tmp_path, tmp_path)
    assert starts == [("warm", True)] and list(res["starts"]) == ["warm"]  # one start, no restart after it
