"""``accelerate launch`` with two CPU processes runs the training script; ranks stay identical.

Invariant: DDP averages gradients across ranks before every optimizer step and the EMA is a
deterministic function of the (identical) student, so after a few steps both ranks hold
bit-identical student and teacher tensors even though they trained on different images and
noise. The run also leaves an atomic checkpoint, a pipeline-format LoRA and a log.

accelerate 1.15 spawns several CPU processes with ``--cpu`` only through MPI, so the test uses
the torchrun launcher with ``ACCELERATE_USE_CPU=true`` (``paper_repro/accelerate/cpu_2proc.yaml``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import make_folder

ROOT = Path(__file__).resolve().parents[2]


def test_two_cpu_processes_end_with_identical_parameters(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed next to the interpreter")
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "paper_repro/accelerate/cpu_2proc.yaml"),
           "--main_process_port", "29517", "-m", "paper_repro.train",
           "--config", str(ROOT / "paper_repro/configs/tiny_zimage.yaml"),
           "--set", f"data.root={data}", "--set", f"output_dir={out}", "--set", "train.steps=3",
           "--set", "train.checkpoint_every=2", "--no-resume", "--dump-rank-params"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-4000:]
    r0 = torch.load(out / "rank0_params.pt", weights_only=True)
    r1 = torch.load(out / "rank1_params.pt", weights_only=True)
    for role in ("student", "teacher"):
        assert r0[role].keys() == r1[role].keys() and r0[role]
        for k in r0[role]:
            assert torch.equal(r0[role][k], r1[role][k]), (role, k)
    assert any(v.abs().max() > 0 for k, v in r0["student"].items() if "lora_B" in k)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logs if "step" in m] == [1, 2, 3]
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000003\n"
    assert {p.name for p in ck.iterdir()} == {"step_00000002", "step_00000003", "latest"}
    # tensors in safetensors; accelerate's optimizer.bin / random_states_R.pkl are loaded weights_only
    assert sorted(p.name for p in (ck / "step_00000003").iterdir()) == [
        "adapters.safetensors", "manifest.json", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
        "rng-rank0.json", "rng-rank0.safetensors", "rng-rank1.json", "rng-rank1.safetensors", "state.json"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
