"""Rebuild the best full PPO experiment so far (ppo-v13) from nothing, in one command, resumably:

    python scripts/reproduce.py --out runs            # ~3 h on 2 AVX512-BF16 cores
    python scripts/reproduce.py --out runs --dry-run  # print the plan and what is already done

    SFT v3 ─► rm-v7 (bundled rankings) ─► rm-v8 (+ round-2 rankings of the policy's own samples)
      └──────────────────────┬───────────────────────┘
                 ppo-v13 ─► checkpoints 16, 24, 32, 40 and final (+ optional interpolations)
          validation behaviours of SFT and every candidate ─► pick (done-when rule)
          ─► the chosen model, once, on the test behaviours + RM win rate against SFT

Every stage is the project's own command (`loopchat train ...`, `loopchat eval ...`,
scripts/interpolate.py) with the settings recorded in docs/eval/<run>/*-config.yaml; only the
paths change. Why a script: the runs live for hours, machines do not, and a half-finished
chain retyped by hand is where mistakes come from. Run the same command again after a crash:
a stage whose output exists is skipped, a training run that started resumes from its last
checkpoint (`--resume`), and an evaluation reuses each model's results JSON already written.
The timings of each stage go to <out>/reproduce-timings.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path[:0] = [str(ROOT), str(SCRIPTS)]  # loopchat (from a checkout too) and pick_checkpoint.py
# The run folders under --out; each name is also the docs/eval folder its settings come from.
SFT, RM0, RM, PPO = "sft-v3", "rm-v7", "rm-v8", "ppo-v13"
# ppo-v13 saves a checkpoint every iteration (8 optimizer steps); these go to validation with
# final, as in the README's ppo-v13 table. Earlier ones are too close to SFT to be worth decoding.
CHECKPOINTS = (16, 24, 32, 40)
VAL_ITEMS = ROOT / "loopchat/data/bundled/eval/behaviours-val.jsonl"
# The earlier columns of the README's tables: the embedded model and SFT v3 on the test set.
# Saved replies are re-scored with the current rubrics by `eval behaviours`.
TEST_COMPARE = [ROOT / "docs/eval/behaviours-default.json", ROOT / "docs/eval/ppo-v3/behaviours-sft-v3_final.json"]


@dataclass
class Stage:
    name: str
    argv: list[str]
    done: list[Path]  # the stage is done when all of these exist
    resume_dir: Path | None = None  # a training run: add --resume once its folder exists
    needs: list[Path] = field(default_factory=list)

    def is_done(self) -> bool:
        return all(p.exists() for p in self.done)

    def command(self) -> list[str]:
        if self.resume_dir is not None and self.resume_dir.exists():
            return [*self.argv, "--resume"]
        return list(self.argv)


def loopchat(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "loopchat.cli", *map(str, args)]


def repeat(flag: str, values: list) -> list:
    """A list setting on the command line: the flag once per value."""
    return [x for v in values for x in (flag, v)]


def alpha_name(a: float) -> str:
    return f"{PPO}-a{a:g}"


def results_json(out: Path, spec: Path) -> Path:
    """Where `eval behaviours --out out` writes a model's results."""
    from loopchat.evaluate.behaviours import label_of, results_path

    return results_path(out, label_of(str(spec)))


def spec_or_results(out: Path, spec: Path) -> Path:
    """A model's results JSON when it was already evaluated (so a rerun does not decode it
    again), else the model itself."""
    js = results_json(out, spec)
    return js if js.exists() else spec


def training_stages(out: Path) -> list[Stage]:
    sft, rm0, rm, ppo = out / SFT, out / RM0, out / RM, out / PPO
    return [
        # SFT v3: the README's SFT command (39 steps of 8 x 1024 packed tokens).
        Stage(SFT, loopchat("train", "sft", "--model", "default", "--lr", "1.5e-4", "--epochs", "1.5", "--out", sft),
              [sft / "final/config.json"], resume_dir=sft),
        # rm-v7 from the SFT backbone on the bundled rankings, then rm-v8: rm-v7 fine-tuned on
        # round 2 (people's rankings of SFT and ppo-v8 samples; the data path is in its config).
        Stage(RM0, loopchat("train", "rm", "--config", ROOT / f"docs/eval/{RM0}/rm-config.yaml",
                                 "--model", sft / "final", "--out", rm0),
              [rm0 / "final/config.json"], resume_dir=rm0, needs=[sft / "final/config.json"]),
        Stage(RM, loopchat("train", "rm", "--config", ROOT / f"docs/eval/{RM}/rm-config.yaml",
                                "--model", rm0, "--out", rm),
              [rm / "final/config.json"], resume_dir=rm, needs=[rm0 / "final/config.json"]),
        Stage(PPO, loopchat("train", "ppo", "--config", ROOT / f"docs/eval/{PPO}/ppo-config.yaml",
                                 "--model", sft / "final", "--reward", rm, "--out", ppo),
              [ppo / "final/config.json"], resume_dir=ppo, needs=[rm / "final/config.json"]),
    ]


def candidate_stages(out: Path, alphas: list[float]) -> tuple[list[Stage], list[Path]]:
    """The checkpoints to validate, and the interpolations of the final policy toward SFT that
    --alphas asks for (the stages that write them)."""
    sft, ppo = out / SFT, out / PPO
    stages, candidates = [], [*(ppo / f"checkpoint-{n}" for n in CHECKPOINTS), ppo / "final"]
    for a in alphas:
        dst = out / alpha_name(a)
        stages.append(Stage(f"interpolate alpha={a:g}", [sys.executable, str(SCRIPTS / "interpolate.py"), "--base", str(sft / "final"),
                                                           "--policy", str(ppo / "final"), "--alpha", f"{a:g}", "--out", str(dst)],
                            [dst / "config.json"], needs=[ppo / "final/config.json"]))
        candidates.append(dst)
    return stages, candidates


def validation_stage(out: Path, candidates: list[Path]) -> Stage:
    val, sft = out / "val", out / SFT / "final"
    models = [sft, *candidates]
    return Stage("validation behaviours", loopchat("eval", "behaviours", "--items", VAL_ITEMS,
                                                   "--model", spec_or_results(val, sft),
                                                   *repeat("--compare", [spec_or_results(val, c) for c in candidates]), "--out", val),
                 [results_json(val, m) for m in models], needs=[c / "config.json" for c in candidates])


def pick(out: Path, candidates: list[Path]) -> Path:
    """The done-when rule of scripts/pick_checkpoint.py, on the validation results."""
    from pick_checkpoint import load, rank_key

    val = out / "val"
    base = load(str(results_json(val, out / SFT / "final")))
    scored = [(rank_key(load(str(results_json(val, c))), base), c) for c in candidates]
    best_key, best = max(scored, key=lambda kc: kc[0])
    (out / "pick.json").write_text(json.dumps({"chosen": str(best), "key": list(best_key),
                                                "candidates": {str(c): list(k) for k, c in scored}}, indent=2) + "\n")
    return best


def test_stages(out: Path, chosen: Path) -> list[Stage]:
    test = out / "test"
    sft = out / SFT / "final"
    return [
        Stage("test behaviours (chosen model, once)", loopchat("eval", "behaviours", "--model", spec_or_results(test, chosen),
                                                               *repeat("--compare", TEST_COMPARE), "--out", test),
              [results_json(test, chosen)]),
        Stage(f"win rate vs SFT by {RM}", loopchat("eval", "winrate", "--model", chosen, "--baseline", sft,
                                                   "--reward", out / RM, "--out", test),
              [test / "winrate.json"]),
    ]


def run_stage(st: Stage, timings: dict, path: Path, dry: bool) -> None:
    if st.is_done():
        print(f"[done] {st.name}", flush=True)
        return
    cmd = st.command()
    print(f"[run ] {st.name}\n       {' '.join(cmd)}", flush=True)
    if dry:
        return
    missing = [p for p in st.needs if not p.exists()]
    if missing:
        raise SystemExit(f"stage {st.name!r} needs {missing[0]}, which an earlier stage should have written")
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"stage {st.name!r} failed with exit status {rc}; fix it and run the same command again to continue")
    if not st.is_done():
        raise SystemExit(f"stage {st.name!r} exited 0 but did not write {[str(p) for p in st.done if not p.exists()]}")
    timings[st.name] = round((time.perf_counter() - t) / 60, 1)
    path.write_text(json.dumps(timings, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for every run and result (reused to resume)")
    ap.add_argument("--alphas", type=float, nargs="*", default=[],
                    help=f"also try interpolations of {PPO} final toward SFT, θ = (1-α)·θ_SFT + α·θ_PPO, with these weights (0 < α < 1; default none)")
    ap.add_argument("--dry-run", action="store_true", help="print the stages and which are done; run nothing")
    a = ap.parse_args(argv)
    bad = [x for x in a.alphas if not 0.0 < x < 1.0]
    if bad:
        ap.error(f"--alphas must lie strictly between 0 and 1 (0 is SFT, 1 is {PPO} final), got {bad[0]}")
    out = Path(a.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tpath = out / "reproduce-timings.json"
    timings = json.loads(tpath.read_text()) if tpath.exists() else {}

    interp, candidates = candidate_stages(out, a.alphas)
    for st in [*training_stages(out), *interp]:
        run_stage(st, timings, tpath, a.dry_run)
    # Built after training, so that a model already evaluated is passed as its results JSON.
    run_stage(validation_stage(out, candidates), timings, tpath, a.dry_run)
    if a.dry_run:
        print("[then] pick on validation, then the test behaviours and the win rate of the chosen model")
        return 0
    chosen = pick(out, candidates)
    print(f"[pick] {chosen} (see {out / 'pick.json'}; the table: python scripts/pick_checkpoint.py "
          f"--baseline {results_json(out / 'val', out / SFT / 'final')} {out / 'val'}/behaviours-*.json)", flush=True)
    for st in test_stages(out, chosen):
        run_stage(st, timings, tpath, a.dry_run)
    print(f"done: {out / 'test'} (behaviours.html, winrate.json), timings in {tpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
