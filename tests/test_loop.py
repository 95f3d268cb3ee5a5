"""The shared training loop: schedule, data order, exact resume after SIGKILL, and the same
result on 1 and 2 processes (accelerate launch, gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loopchat.config import ConfigError
from loopchat.train.loop import MetricsLog, epoch_order, lr_lambda, split_eval, step_indices
from loopchat.train.sft import SFTConfig, run_sft

from test_sft import conversations, write_jsonl

REPO = Path(__file__).resolve().parent.parent

# A child process that runs SFT from a JSON config. KILL_AT_STATE=N makes it SIGKILL itself in
# the middle of saving the state of step N: the state is written to its temp folder but not
# yet published, the worst moment for a crash.
CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from loopchat.train import loop
from loopchat.train.sft import SFTConfig, run_sft

kill_at = int(os.environ.get("KILL_AT_STATE", "0"))
if kill_at:
    publish = loop._publish_dir
    def killing_publish(tmp, final):
        if final.name == f"step-{kill_at:07d}":
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, final)
    loop._publish_dir = killing_publish
run_sft(SFTConfig.model_validate(json.loads(sys.argv[1])))
"""


def child_env(**extra) -> dict:
    env = {**os.environ, "THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO), **extra}
    for k in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def cfg_for(tmp_path: Path, tiny_dir: str, out: str, **kw) -> SFTConfig:
    data = tmp_path / "demos.jsonl"
    if not data.exists():
        write_jsonl(data, conversations(12))
    base = dict(
        model=tiny_dir, data=[str(data)], out=str(tmp_path / out), max_seq_len=96, batch_size=4, grad_accum=2,
        pack=False, lr=3e-3, warmup_ratio=0.2, epochs=2, eval_fraction=0.2, eval_every=3, save_every=2, log_every=1,
        bf16=False, seed=0,
    )
    base.update(kw)
    return SFTConfig(**base)


def losses(run: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in MetricsLog(run / "metrics.jsonl").read() if key in r]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, tiny_dir) -> tuple[Path, Path]:
    """(data folder, run): one uninterrupted single-process run that the resumed and the
    two-process runs of the same config must reproduce."""
    tmp = tmp_path_factory.mktemp("loop")
    return tmp, run_sft(cfg_for(tmp, tiny_dir, "ref"))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


# ----------------------------------------------------------------------------- pure pieces


def test_schedule_warmup_then_cosine():
    f = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    ramp = [f(s) for s in range(5)]
    assert ramp == sorted(ramp) and ramp[0] < 0.25 and ramp[4] == 1.0
    decay = [f(s) for s in range(4, 21)]
    assert decay == sorted(decay, reverse=True)
    assert f(20) == pytest.approx(0.1) and f(12) == pytest.approx(0.55)


def test_data_order_seeded_and_complete():
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert epoch_order(10, 0, 1) != epoch_order(10, 1, 1) != epoch_order(10, 0, 2)
    # 10 items, batches of 4: 3 steps per epoch, the last wraps to the epoch's start
    seen = [step_indices(10, 4, s, seed=3) for s in range(3)]
    assert all(e == 0 for e, _ in seen)
    flat = [i for _, idx in seen for i in idx]
    assert sorted(set(flat)) == list(range(10)) and flat[10:] == flat[:2]
    assert step_indices(10, 4, 3, seed=3)[0] == 1


def test_split_eval_disjoint_and_seeded():
    tr, ev = split_eval(list(range(40)), 0.1, seed=5)
    assert len(ev) == 4 and not set(tr) & set(ev) and sorted(tr + ev) == list(range(40))
    assert split_eval(list(range(40)), 0.1, seed=5) == (tr, ev)
    assert split_eval([1], 0.5, 0) == ([1], [])


def test_effective_batch_must_divide(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="multiple of grad_accum"):
        run_sft(cfg_for(tmp_path, tiny_dir, "bad", batch_size=3, grad_accum=2))


# ----------------------------------------------------------------------------- resume


def killed_run(cfg: SFTConfig) -> SFTConfig:
    """Run cfg in a child process that SIGKILLs itself while saving the state of step 4."""
    p = subprocess.run([sys.executable, "-c", CHILD, cfg.model_dump_json()], env=child_env(KILL_AT_STATE="4"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    return cfg


def test_resume_after_sigkill_matches_uninterrupted(ref_run, tiny_dir):
    # 10 train rows, batch 4 -> 3 steps/epoch, 2 epochs = 6 steps; state saved at 2 and 4.
    tmp_path, ref = ref_run
    cfg = killed_run(cfg_for(tmp_path, tiny_dir, "killed"))
    run = Path(cfg.out)
    state = run / "state"
    assert (state / "latest").read_text().strip() == "step-0000002"
    assert (state / ".tmp-step-0000004").is_dir()  # the interrupted save, never published
    assert not (run / "final").exists()
    assert max(s for s, _ in losses(run)) == 4  # it logged steps 3 and 4 before dying

    resumed = run_sft(cfg.model_copy(update={"resume": True}))
    assert resumed == run
    assert losses(resumed) == losses(ref)  # steps 3-4 replayed exactly, no duplicates
    assert losses(resumed, "eval_loss") == losses(ref, "eval_loss")
    w_ref, w_res = weights(ref), weights(resumed)
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    assert not (state / ".tmp-step-0000004").exists()
    assert [d.name for d in state.iterdir() if d.is_dir()] == ["step-0000006"]


def test_resume_with_gradient_checkpointing_gives_the_same_run(ref_run, tiny_dir):
    # a run that grew short of memory resumes with activations recomputed, to the same result
    tmp_path, ref = ref_run
    cfg = killed_run(cfg_for(tmp_path, tiny_dir, "gc"))
    resumed = run_sft(cfg.model_copy(update={"resume": True, "gradient_checkpointing": True}))
    got, want = losses(resumed), losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)
    w_ref, w_res = weights(ref), weights(resumed)
    assert all(torch.allclose(w_ref[k], w_res[k], atol=1e-5) for k in w_ref)


def test_resume_refuses_changed_settings(tmp_path, tiny_dir):
    cfg = cfg_for(tmp_path, tiny_dir, "r", epochs=1, save_every=0, eval_fraction=0)
    run_sft(cfg)
    with pytest.raises(ConfigError, match="lr"):
        run_sft(cfg.model_copy(update={"resume": True, "lr": 1e-3}))
    with pytest.raises(ConfigError, match="already holds a run"):
        run_sft(cfg)
    run_sft(cfg.model_copy(update={"resume": True}))  # a finished run resumes to a no-op


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(ref_run, tiny_dir):
    """accelerate launch --multi_gpu --num_processes 2 on a machine without CUDA (DDP over
    gloo): per-process micro-batches halve, the effective batch and data order stay, so loss
    and weights match one process. (`--cpu --num_processes 2` would start ONE process.)"""
    tmp_path, one = ref_run
    cfg = cfg_for(tmp_path, tiny_dir, "two")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port", str(free_port()),
        str(script), cfg.model_dump_json(),
    ]
    p = subprocess.run(cmd, env=child_env(THREADS="1"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    two = Path(cfg.out)
    assert (two / "final" / "model.safetensors").exists()
    state = json.loads((two / "state" / "step-0000006" / "trainer_state.json").read_text())
    assert state["world"] == 2  # really two processes
    la, lb = losses(one), losses(two)
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
    for (_, a), (_, b) in zip(la, lb):
        assert a == pytest.approx(b, rel=1e-4)
    for (_, a), (_, b) in zip(losses(one, "eval_loss"), losses(two, "eval_loss")):
        assert a == pytest.approx(b, rel=1e-4)
    # Adam barely sees a wrongly scaled gradient; the logged gradient norm does.
    for (_, a), (_, b) in zip(losses(one, "grad_norm"), losses(two, "grad_norm")):
        assert a == pytest.approx(b, rel=1e-3)
    wa, wb = weights(one), weights(two)
    base = load_file(Path(tiny_dir) / "model.safetensors")
    for k in wa:
        moved = (wa[k] - base[k]).abs().max()
        assert (wa[k] - wb[k]).abs().max() <= 1e-3 * max(1.0, float(moved)), k
    summary = json.loads((two / "data_summary.json").read_text())
    assert summary["train_rows"] == 10


def test_default_run_folder_and_resume_latest(tmp_path, tiny_dir, monkeypatch):
    from loopchat.train.loop import latest_run, runs_dir

    monkeypatch.setenv("LOOPCHAT_HOME", str(tmp_path / "home"))
    cfg = cfg_for(tmp_path, tiny_dir, "unused", epochs=1, save_every=0, eval_fraction=0).model_copy(update={"out": None})
    with pytest.raises(ConfigError, match="no run of kind 'sft'"):
        run_sft(cfg.model_copy(update={"resume": True}))
    run = run_sft(cfg)
    assert run.parent == runs_dir() and run.name.startswith("sft-") and latest_run("sft") == run
    assert run_sft(cfg.model_copy(update={"resume": True})) == run


def test_bf16_default_follows_the_hardware(monkeypatch):
    """bf16 unset -> on only where it is native (emulated bf16 on an AVX2 CPU is >10x slower); set -> as given."""
    import loopchat.models as models
    from loopchat.train.loop import use_bf16

    assert models.native_bf16("cuda") is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    for native in (True, False):
        monkeypatch.setattr(models, "native_bf16", lambda device, native=native: native)
        assert use_bf16(None, torch.device("cpu")) is native
        assert use_bf16(True, torch.device("cpu")) is True
        assert use_bf16(False, torch.device("cpu")) is False
