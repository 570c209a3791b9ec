"""The end-to-end benchmarks' GPU clock samples: parsed from nvidia-smi's lines onto the perf_counter clock, and
summed up per validation round of a job (benchmarks/e2e_models.py, e2e_job.py)."""

import os
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from e2e_job import job_summary  # noqa: E402
from e2e_models import gpu_figures, parse_clock_line  # noqa: E402


def test_a_clock_line_lands_on_the_perf_counter_clock_and_other_lines_are_skipped():
    stamp = "2026/12/08 05:14:58.250"
    epoch = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
    t, mhz, temp, watts = parse_clock_line(f"{stamp}, 1980, 61, 412.37\n", perf_minus_epoch=-epoch + 7.0)
    assert abs(t - 7.0) < 1e-6  # 250 ms kept: the sample's time is the stamp's, moved by the offset
    assert (mhz, temp, watts) == (1980.0, 61.0, 412.37)
    assert parse_clock_line(f"{stamp}, 1980, 61, [N/A]", 0.0) is None
    assert parse_clock_line("timestamp, clocks.sm [MHz], temperature.gpu, power.draw [W]", 0.0) is None
    assert parse_clock_line("", 0.0) is None


def test_the_summary_keeps_only_the_window_s_samples():
    samples = [(1.0, 1980, 50, 300), (2.0, 1500, 70, 700), (3.0, 1600, 72, 690), (4.0, 1980, 55, 310)]
    assert gpu_figures(samples, 1.5, 3.5) == {"gpu": {"sm_mhz_median": 1550.0, "sm_mhz_min": 1500,
                                                      "temp_c_max": 72, "power_w_max": 700}}
    assert gpu_figures(samples)["gpu"]["sm_mhz_min"] == 1500
    assert gpu_figures(samples, 10, 20) == {}


def test_each_validation_round_of_a_job_gets_the_clock_of_its_own_denoising(tmp_path):
    times = [10.0 + i for i in range(10)]  # ten optimizer steps, one a second
    events = [  # two rounds (pipelines 1 and 2), after steps 2 and 7, two denoising calls each
        {"event": "denoise", "pipeline": 1, "start": 11.2, "end": 11.4, "steps": 25, "images": 2},
        {"event": "denoise", "pipeline": 1, "start": 11.5, "end": 11.8, "steps": 25, "images": 2},
        {"event": "denoise", "pipeline": 2, "start": 16.2, "end": 16.9, "steps": 25, "images": 4},
    ]
    clocks = [(11.3, 1980, 60, 500), (11.7, 1960, 61, 520), (14.0, 1700, 65, 600), (16.5, 1410, 80, 700)]
    run = {"wall": 12.0, "start": 9.0, "end": 21.0, "peak": 0, "clocks": clocks}
    summary = job_summary(tmp_path, run, times, events)
    first, second = summary["validation_rounds"]
    assert first["gpu"] == {"sm_mhz_median": 1970.0, "sm_mhz_min": 1960, "temp_c_max": 61, "power_w_max": 520}
    assert second["gpu"]["sm_mhz_median"] == 1410 and second["images"] == 4
    assert summary["gpu"]["sm_mhz_min"] == 1410 and summary["gpu"]["temp_c_max"] == 80


def test_a_run_without_clock_samples_reports_no_gpu_figures(tmp_path):
    events = [{"event": "denoise", "pipeline": 1, "start": 1.5, "end": 1.8, "steps": 25}]
    summary = job_summary(tmp_path, {"wall": 3.0, "start": 0.0, "end": 3.0, "peak": 0, "clocks": []}, [1.0, 2.0],
                          events)
    assert "gpu" not in summary and "gpu" not in summary["validation_rounds"][0]


def test_the_sampler_asks_nvidia_smi_for_the_query_at_the_interval(tmp_path, monkeypatch):
    from e2e_models import nvidia_smi_every

    fake = tmp_path / "nvidia-smi"  # prints its arguments, then one sample line
    fake.write_text('#!/bin/sh\necho "$@"\necho "2026/12/08 05:14:58.250, 1980, 61, 412.37"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    proc = nvidia_smi_every("timestamp,clocks.sm", 100)
    lines = proc.stdout.read().splitlines()
    assert proc.wait(timeout=10) == 0
    assert lines[0].split() == ["--query-gpu=timestamp,clocks.sm", "--format=csv,noheader,nounits", "-i", "0",
                                "-lms", "100"]
    assert parse_clock_line(lines[1], 0.0)[1:] == (1980.0, 61.0, 412.37)


def test_both_samplers_read_every_line_of_their_nvidia_smi(tmp_path, monkeypatch):
    import e2e_models

    fake = tmp_path / "nvidia-smi"  # memory.used lines for PeakMemory, clock lines for GpuClocks
    fake.write_text('#!/bin/sh\ncase "$1" in *memory.used*) printf "1200\\n5678\\n3000\\n";;\n'
                    '*) echo "2026/12/08 05:14:58.250, 1410, 80, 700.5"; echo "[N/A], 1, 1, 1";; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(e2e_models.torch.cuda, "is_available", lambda: True)
    with e2e_models.PeakMemory() as mem, e2e_models.GpuClocks() as clocks:
        mem._proc.wait(timeout=10)
        clocks._proc.wait(timeout=10)
    assert mem.peak == 5678
    assert [s[1:] for s in clocks.samples] == [(1410.0, 80.0, 700.5)]
