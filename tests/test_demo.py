"""`loopchat demo` end to end on a tiny model: every stage runs, the report has the three
columns, and a second run keeps the finished stages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loopchat.train.reward import BUNDLED_COMPARISONS


@pytest.mark.skipif(not (BUNDLED_COMPARISONS / "rankings.jsonl").exists(), reason="bundled comparison set not built yet")
def test_demo_end_to_end_and_rerun(tmp_path, tiny_dir):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "loopchat.cli", "demo", "--model", tiny_dir, "--out", str(out), "--sft-steps", "1", "--sft-batch-size", "2",
           "--max-seq-len", "256", "--rm-steps", "1", "--rm-batch-size", "2", "--ppo-iterations", "1", "--rollout-batch", "4",
           "--ppo-batch-size", "4", "--max-new-tokens", "8", "--eval-per-category", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "final" / "config.json").exists(), stage
    html = (out / "report.html").read_text()
    assert all(f">{label}<" in html for label in ("embedded", "SFT", "PPO")) and html.count("<img") >= 3
    t = json.loads((out / "timings.json").read_text())
    assert set(t) == {"sft", "rm", "ppo", "eval", "total"}
    assert "report:" in p.stdout and "[4/4]" in p.stdout
    first = (out / "ppo" / "final" / "model.safetensors").stat().st_mtime
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "ppo" / "final" / "model.safetensors").stat().st_mtime == first  # finished stages are kept
