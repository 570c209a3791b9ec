"""benchmarks/multi_gpu.py, the GPU benchmark of issue 19, run in its --tiny mode: the same orchestration on the
CPU, accelerate's two processes on gloo. Five short trainer runs (~50 s on 2 cores): one scaling run on 2
processes, the correctness trio (1 process with accumulation 2, 2 processes with and without shared noise) and a
resume of the 2-process run on 1 process. The fewest that still reach every part of results.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_multi_gpu_script_runs_all_its_parts_on_two_cpu_processes(tmp_path):
    out = tmp_path / "mgpu"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--tiny", "--out", str(out), "--archs", "sd15",
           "--gpus", "2", "--sigmas", "0.1", "--steps", "4", "--check-steps", "2", "--check-every", "1",
           "--resume-to", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    parts = json.loads((out / "results.json").read_text())["archs"]["sd15"]

    (row,) = parts["scaling"]["rows"]
    assert row["processes"] == 2 and row["images_per_s"] > 0 and row["written_once"], row
    assert row["cuda_graph_log"] == "CUDA graph off: no CUDA device" and not row["cuda_graph"]
    assert row["flat_path_log"].startswith("Flat-LoRA path: reference") and not row["flat_fused"]

    check = parts["correctness"]
    assert all(r["written_once"] for r in check["runs"].values()), check["runs"]
    # fp32 on one CPU: the two summation orders of two gradients are the same sum, so the files are equal
    assert check["A_vs_B"]["tensors"] > 0 and check["A_vs_B"]["max_abs"] < 1e-6, check["A_vs_B"]
    assert check["A_equals_B"] and check["B_much_closer_than_C"] and check["A_vs_C"]["rel_fro"] > 1e-3
    assert check["shared_noise_equal_on_all_processes"] and check["own_noise_differs_on_every_process"]
    assert len(check["runs"]["C"]["noise_fingerprints"]) == 2

    (resumed,) = parts["resume"]["runs"]
    assert resumed["processes"] == 1 and parts["resume"]["saved_by_processes"] == 2
    assert resumed["resumed_at_checkpoint"] and resumed["reached_final_step"] and resumed["written_once"], resumed
    assert "correctness" in (out / "summary.md").read_text()
