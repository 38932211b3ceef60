"""GPU clock sampling for the benchmark (`zturbo.bench.clocks`), with a stand-in nvidia-smi on PATH."""

from __future__ import annotations

import os
import stat
import time

import pytest
import torch

from zturbo.bench import clocks, common, report

# A stand-in for nvidia-smi: like a driver that knows only the older field names when OLD_NAMES
# is set; prints one sample per call, or loops every 10 ms under -lms until terminated.
FAKE_SMI = """#!/usr/bin/env bash
case "$*" in *clocks_event_reasons*) [ -n "$OLD_NAMES" ] && { echo "Field is not a valid field" >&2; exit 2; };; esac
case "$*" in
  *-lms*) i=0; while true; do
      if [ $((i % 2)) = 0 ]; then echo "1410, 699.50, Active, Not Active"
      else echo "1530, 650.00, Not Active, Not Active"; fi
      echo "[N/A], [N/A], [N/A], [N/A]"; i=$((i + 1)); sleep 0.01; done;;
  *) echo "1980, 120.00, Not Active, Not Active";;
esac
"""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    path = tmp_path / "nvidia-smi"
    path.write_text(FAKE_SMI)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(clocks, "_gpu_id", lambda device: "GPU-0000")
    return path


def test_summary_reports_clock_power_and_cap_shares_and_skips_unreadable_rows():
    lines = ["1410, 699.5, Active, Not Active", "[N/A], [N/A], [N/A], [N/A]", "", "1530, 650.0, Not Active, Active",
             "1200, 701.0, Active, Not Active", "some warning"]  # fmt: skip
    got = clocks.summarize(lines)
    assert got == {
        "samples": 3,
        "sm_mhz_median": 1410.0,
        "sm_mhz_min": 1200.0,
        "power_w_median": 699.5,
        "power_w_max": 701.0,
        "power_capped_share": 2 / 3,
        "hw_slowdown_share": 1 / 3,
    }
    assert clocks.summarize([]) is None and clocks.summarize(["[N/A], [N/A], [N/A], [N/A]"]) is None


@pytest.mark.parametrize("old_names", [False, True])
def test_sampler_polls_nvidia_smi_while_open(fake_smi, monkeypatch, old_names):
    if old_names:
        monkeypatch.setenv("OLD_NAMES", "1")
    with clocks.ClockSampler(torch.device("cpu")) as sampler:
        time.sleep(0.5)
    summary = sampler.summary()
    assert summary is not None and summary["samples"] >= 4
    assert summary["sm_mhz_min"] == 1410.0 and 0 < summary["power_capped_share"] < 1
    assert sampler.proc is not None and sampler.proc.poll() is not None  # stopped on exit


def test_no_sampling_without_a_cuda_device_or_nvidia_smi(monkeypatch):
    with clocks.ClockSampler(torch.device("cpu")) as sampler:  # the real _gpu_id: a CPU has none
        pass
    assert sampler.proc is None and sampler.summary() is None
    monkeypatch.setattr(clocks, "_gpu_id", lambda device: "GPU-0000")
    monkeypatch.setenv("PATH", "")
    with clocks.ClockSampler(torch.device("cpu")) as sampler:
        pass
    assert sampler.proc is None and sampler.summary() is None


def test_timed_rows_carry_the_clocks_and_the_table_shows_them(fake_smi):
    row = common.timed(lambda: time.sleep(0.1), torch.device("cpu"), runs=3, warmup=0)
    assert row["gpu_clocks"]["sm_mhz_median"] in (1410.0, 1470.0, 1530.0)
    assert report.clock_cell(row["gpu_clocks"]).endswith(" %)")
    assert report.clock_cell({"sm_mhz_median": 1432.5, "power_capped_share": 1.0}) == "1432 (100 %)"
    assert report.clock_cell(None) == "-"
