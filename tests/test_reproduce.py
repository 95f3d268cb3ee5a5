"""scripts/reproduce.py: the resumable SFT -> RM -> RM round 2 -> PPO -> checkpoints (and
interpolations) -> validation pick -> test chain. The runs themselves take hours; these tests
check the plan: every command it would run parses and validates against today's settings (a
renamed setting in a recorded config breaks here, not two hours into a run), finished stages
are skipped, started runs resume, and the pick follows the done-when rule on validation
results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["reproduce"]


def _all_stages(rep, out):
    interp, cands = rep.candidate_stages(out, [0.25, 0.5])
    return [*rep.training_stages(out), *interp, rep.validation_stage(out, cands), *rep.test_stages(out, out / "ppo-v13/checkpoint-24")], cands


def test_every_loopchat_command_of_the_plan_parses_and_validates(rep, tmp_path):
    from loopchat import cli
    from loopchat.config import resolve_config
    from loopchat.evaluate.behaviours import BehavioursConfig
    from loopchat.evaluate.winrate import WinRateConfig
    from loopchat.train.ppo import PPOConfig
    from loopchat.train.reward import RMConfig
    from loopchat.train.sft import SFTConfig

    config_of = {cli.cmd_train_sft: SFTConfig, cli.cmd_train_rm: RMConfig, cli.cmd_train_ppo: PPOConfig,
                 cli.cmd_eval_behaviours: BehavioursConfig, cli.cmd_eval_winrate: WinRateConfig}
    stages, _ = _all_stages(rep, tmp_path)
    seen = set()
    for st in stages:
        argv = st.command()
        if argv[1:3] != ["-m", "loopchat.cli"]:
            assert Path(argv[1]).name == "interpolate.py" and Path(argv[1]).exists()
            continue
        args = cli.build_parser().parse_args(argv[3:])
        cfg = resolve_config(config_of[args.func], args)  # raises on an unknown key or a wrong type
        seen.add(type(cfg).__name__)
        if isinstance(cfg, (SFTConfig, RMConfig, PPOConfig)):
            assert Path(cfg.out).is_relative_to(tmp_path), f"{st.name} writes outside --out: {cfg.out}"
    assert seen == {"SFTConfig", "RMConfig", "PPOConfig", "BehavioursConfig", "WinRateConfig"}
    # the recorded settings are the ones used, only the paths change
    ppo = next(st for st in stages if st.name == "ppo-v13")
    cfg = resolve_config(PPOConfig, cli.build_parser().parse_args(ppo.command()[3:]))
    assert (cfg.iterations, cfg.rollout_batch, cfg.kl_coef, cfg.question_bonus) == (8, 48, 0.05, 0.5)
    assert cfg.category_weights == {"clarify": 3, "edgy_harmless": 2}
    assert cfg.model == str(tmp_path / "sft-v3/final") and cfg.reward == str(tmp_path / "rm-v8")
    # rm-v8 continues from rm-v7 on the round-2 rankings
    rm = next(st for st in stages if st.name == "rm-v8")
    cfg = resolve_config(RMConfig, cli.build_parser().parse_args(rm.command()[3:]))
    assert cfg.model == str(tmp_path / "rm-v7") and [Path(d).name for d in cfg.data] == ["rankings.jsonl"]
    assert Path(cfg.data[0]).parent.name == "onpolicy"
    # the winner is scored by the reward model PPO trained against
    wr = stages[-1].command()
    assert wr[wr.index("--reward") + 1] == str(tmp_path / "rm-v8")


def test_finished_stages_are_skipped_and_started_runs_resume(rep, tmp_path):
    sft, rm0, rm, _ = rep.training_stages(tmp_path)
    assert not sft.is_done() and "--resume" not in sft.command()
    (tmp_path / "sft-v3").mkdir()
    assert "--resume" in sft.command()  # a run that started continues instead of refusing the folder
    (tmp_path / "sft-v3/final").mkdir()
    (tmp_path / "sft-v3/final/config.json").write_text("{}")
    assert sft.is_done() and not rm0.is_done() and not rm.is_done()

    out = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce.py"), "--out", str(tmp_path), "--dry-run", "--alphas", "0.5"],
                         capture_output=True, text=True, check=True).stdout
    assert "[done] sft-v3" in out and "[run ] rm-v7" in out and "[run ] rm-v8" in out and "[run ] interpolate alpha=0.5" in out
    assert not (tmp_path / "rm-v7").exists(), "a dry run must not start anything"


def test_an_evaluated_model_is_passed_as_its_results_file(rep, tmp_path):
    _, cands = rep.candidate_stages(tmp_path, [0.5])
    val = tmp_path / "val"
    before = rep.validation_stage(tmp_path, cands).command()
    assert str(tmp_path / "sft-v3/final") in before
    val.mkdir()
    js = rep.results_json(val, tmp_path / "sft-v3/final")
    assert js.name == "behaviours-sft-v3_final.json"  # the name `eval behaviours` writes
    js.write_text("{}")
    after = rep.validation_stage(tmp_path, cands).command()
    assert str(js) in after and str(tmp_path / "sft-v3/final") not in after


def test_pick_applies_the_done_when_rule_on_validation(rep, tmp_path):
    def res(name, passed, refusal=0.0):
        return {"model": name, "summary": {"passed": sum(passed.values()), "refusal_rate": refusal,
                                           "by_category": {c: {"passed": n} for c, n in passed.items()}}}

    _, cands = rep.candidate_stages(tmp_path, [0.25])  # checkpoint-16 ... 40, final, a0.25
    assert [c.name for c in cands] == ["checkpoint-16", "checkpoint-24", "checkpoint-32", "checkpoint-40", "final", "ppo-v13-a0.25"]
    (tmp_path / "val").mkdir()
    rows = {tmp_path / "sft-v3/final": res("sft", {"a": 5, "b": 5, "c": 5}),
            cands[0]: res("c16", {"a": 5, "b": 5, "c": 4}),  # worse on c
            cands[1]: res("c24", {"a": 5, "b": 6, "c": 5}),  # >= everywhere, better on one
            cands[2]: res("c32", {"a": 6, "b": 7, "c": 7}, refusal=0.2),  # better, but refuses harmless prompts
            cands[3]: res("c40", {"a": 9, "b": 9, "c": 3}),  # most passes, but worse on c
            cands[4]: res("final", {"a": 4, "b": 5, "c": 5}),
            cands[5]: res("a0.25", {"a": 5, "b": 5, "c": 5})}  # >= everywhere, better on none
    for spec, d in rows.items():
        rep.results_json(tmp_path / "val", spec).write_text(json.dumps(d))
    assert rep.pick(tmp_path, cands) == cands[1]
    saved = json.loads((tmp_path / "pick.json").read_text())
    assert saved["chosen"] == str(cands[1]) and len(saved["candidates"]) == 6


def test_alphas_outside_the_open_interval_are_refused():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce.py"), "--out", "/nonexistent-never-created", "--alphas", "1.0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--alphas must lie strictly between 0 and 1" in r.stderr
    assert not Path("/nonexistent-never-created").exists()
