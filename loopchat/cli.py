"""`loopchat`: one command, one subcommand per stage. Imports are lazy so `--help` is instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loopchat import __version__
from loopchat.config import ConfigError, add_config_args, resolve_config


def cmd_chat(args) -> int:
    from loopchat.chat import ChatConfig, run_chat

    return run_chat(resolve_config(ChatConfig, args))


def cmd_model_convert(args) -> int:
    from loopchat import models

    r = models.resolve_spec(args.spec)
    print(r.path)
    return 0


def cmd_model_info(args) -> int:
    from loopchat import models

    model, tok = models.load(args.spec)
    info = model.loopchat_load_info
    n = sum(p.numel() for p in model.parameters())
    print(f"spec:       {info['spec']}\npath:       {info['path']}\nparameters: {n / 1e6:.1f}M\n"
          f"dtype:      {next(model.parameters()).dtype}\nload time:  {info['seconds']:.2f}s{' (converted GGUF)' if info['converted'] else ''}\n"
          f"eos / pad:  {tok.eos_token!r} / {tok.pad_token!r}\ncontext:    {getattr(model.config, 'max_position_embeddings', '?')}")
    return 0


def cmd_data_import(args) -> int:
    from loopchat.data.formats import import_file
    from loopchat.data.store import Store

    store = Store(args.db)
    user_id = store.user(args.user, role="trainer") if args.user else None
    stats = import_file(store, args.file, args.format, user_id=user_id)
    print(f"imported {stats.conversations} conversations, {stats.messages} messages, {stats.rankings} rankings from {args.file} into {store.url}")
    return 0


def cmd_data_export(args) -> int:
    from loopchat.data.formats import export_file
    from loopchat.data.store import Store

    store = Store(args.db)
    n = export_file(store, args.file, args.format)
    print(f"wrote {n} lines of {args.format} to {args.file}")
    return 0


def cmd_train_sft(args) -> int:
    from loopchat.train.sft import SFTConfig, run_sft

    run = run_sft(resolve_config(SFTConfig, args))
    print(f"run folder: {run}")
    return 0


def cmd_train_rm(args) -> int:
    from loopchat.train.reward import RMConfig, run_rm

    run = run_rm(resolve_config(RMConfig, args))
    print(f"run folder: {run}")
    return 0


def cmd_train_ppo(args) -> int:
    from loopchat.train.ppo import PPOConfig, run_ppo

    run = run_ppo(resolve_config(PPOConfig, args))
    print(f"run folder: {run}")
    return 0


def cmd_rm_score(args) -> int:
    from loopchat.evaluate.rm import score_file

    score_file(args.reward, args.data, batch_size=args.batch_size)
    return 0


def cmd_eval_rm(args) -> int:
    from loopchat.evaluate.rm import RMEvalConfig, run_eval_rm

    run_eval_rm(resolve_config(RMEvalConfig, args))
    return 0


def cmd_demo(args) -> int:
    from loopchat.demo import DemoConfig, run_demo

    run_demo(resolve_config(DemoConfig, args))
    return 0


def cmd_eval_winrate(args) -> int:
    from loopchat.evaluate.winrate import WinRateConfig, run_winrate

    run_winrate(resolve_config(WinRateConfig, args))
    return 0


def cmd_eval_behaviours(args) -> int:
    from loopchat.evaluate.behaviours import BehavioursConfig, run_behaviours

    run_behaviours(resolve_config(BehavioursConfig, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loopchat", description="Build, align and serve your own assistant: SFT -> reward model -> PPO -> chat.")
    ap.add_argument("--version", action="version", version=f"loopchat {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from loopchat.chat import ChatConfig

    p = sub.add_parser("chat", help="multi-turn terminal chat (streaming, /regen, /reset, /quit); saved in the store")
    add_config_args(p, ChatConfig)
    p.set_defaults(func=cmd_chat)

    pm = sub.add_parser("model", help="load, convert and inspect models").add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = pm.add_parser("convert", help="convert a GGUF (or 'default') once into a cached safetensors checkpoint; prints its folder")
    p.add_argument("spec", help="'default' or a path to a .gguf file")
    p.set_defaults(func=cmd_model_convert)
    p = pm.add_parser("info", help="load a model spec and print what it is")
    p.add_argument("spec", nargs="?", default="default", help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    p.set_defaults(func=cmd_model_info)

    pd = sub.add_parser("data", help="import and export datasets").add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fmts = "messages, preference, ranking, hh-rlhf, oasst, ultrafeedback"
    p = pd.add_parser("import", help=f"import a dataset file into the store in one transaction ({fmts})")
    p.add_argument("file", type=Path)
    p.add_argument("--format", default=None, help=f"one of {fmts} (default: detected from the first record)")
    p.add_argument("--db", default=None, help="store URL (default: SQLite under $LOOPCHAT_HOME/data)")
    p.add_argument("--user", default=None, help="attribute the data to this trainer")
    p.set_defaults(func=cmd_data_import)
    p = pd.add_parser("export", help="export the store as messages, preference or ranking JSONL")
    p.add_argument("file", type=Path)
    p.add_argument("--format", required=True, choices=["messages", "preference", "ranking"])
    p.add_argument("--db", default=None, help="store URL (default: SQLite under $LOOPCHAT_HOME/data)")
    p.set_defaults(func=cmd_data_export)

    from loopchat.train.sft import SFTConfig

    pt = sub.add_parser("train", help="the three training stages").add_subparsers(dest="train_command", metavar="STAGE", required=True)
    p = pt.add_parser("sft", help="step 1: supervised fine-tuning on demonstrations (loss on assistant turns only)")
    add_config_args(p, SFTConfig)
    p.set_defaults(func=cmd_train_sft)
    from loopchat.train.reward import RMConfig

    p = pt.add_parser("rm", help="step 2: reward model from rankings of K replies (all K-choose-2 pairs, InstructGPT's loss)")
    add_config_args(p, RMConfig)
    p.set_defaults(func=cmd_train_rm)
    from loopchat.train.ppo import PPOConfig

    p = pt.add_parser("ppo", help="step 3: PPO from the SFT checkpoint against the reward model (per-token KL penalty to the SFT model)")
    add_config_args(p, PPOConfig)
    p.set_defaults(func=cmd_train_ppo)

    pr = sub.add_parser("rm", help="use a reward model").add_subparsers(dest="rm_command", metavar="ACTION", required=True)
    p = pr.add_parser("score", help="print the reward of every reply in a file (JSON lines: reward = raw - offset)")
    p.add_argument("--reward", required=True, help="reward model: an rm run folder or checkpoint")
    p.add_argument("--data", required=True, help="ranking, preference or messages file")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_rm_score)

    from loopchat.evaluate.behaviours import BehavioursConfig

    pe = sub.add_parser("eval", help="evaluate models").add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    p = pe.add_parser("behaviours", help="score the seed's behaviours (follow-ups, false premises, refusals, ...) side by side")
    add_config_args(p, BehavioursConfig)
    p.set_defaults(func=cmd_eval_behaviours)
    from loopchat.evaluate.rm import RMEvalConfig

    p = pe.add_parser("rm", help="held-out pairwise accuracy (per category) and a calibration plot of a reward model")
    add_config_args(p, RMEvalConfig)
    p.set_defaults(func=cmd_eval_rm)
    from loopchat.evaluate.winrate import WinRateConfig

    p = pe.add_parser("winrate", help="new model vs baseline on held-out prompts, judged by the reward model; KL, length, diversity")
    add_config_args(p, WinRateConfig)
    p.set_defaults(func=cmd_eval_winrate)
    from loopchat.demo import DemoConfig

    p = sub.add_parser("demo", help="the whole recipe on the embedded model: SFT -> reward model -> PPO -> side-by-side evaluation (~15 min on 2 cores)")
    add_config_args(p, DemoConfig)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, LookupError, FileNotFoundError) as e:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"loopchat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
