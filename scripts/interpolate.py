"""Interpolate a fine-tuned policy back toward the model it started from (WiSE-FT / the
"LITI" step of WARP): theta = (1 - alpha) * theta_base + alpha * theta_policy.

    python scripts/interpolate.py --base runs/sft-v3/final --policy runs/ppo-v8/final \
        --alpha 0.5 --out runs/ppo-v8-a0.5

Why: PPO moves a small policy the reward model's way in some behaviours and away from SFT
in others; a point on the straight line between the two often keeps most of the reward gain
at a fraction of the KL. alpha = 1 is the policy, alpha = 0 the base. Choose alpha on the
validation behaviours (scripts/pick_checkpoint.py), never on the test set.
The output is a normal Hugging Face checkpoint with the policy's tokenizer and chat template.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def interpolate_state(base: dict, policy: dict, alpha: float) -> dict:
    """(1 - alpha) * base + alpha * policy, parameter by parameter; both must have the same names
    and shapes (the same architecture), or the error names the first that differs."""
    if not 0.0 <= alpha <= 1.0:
        raise SystemExit(f"--alpha must be in [0, 1], got {alpha}")
    missing = sorted(set(base) ^ set(policy))
    if missing:
        raise SystemExit(f"the two checkpoints have different parameters, e.g. {missing[0]!r}: not the same architecture")
    out = {}
    for name, b in base.items():
        p = policy[name]
        if b.shape != p.shape:
            raise SystemExit(f"parameter {name!r}: shape {tuple(b.shape)} in base, {tuple(p.shape)} in policy")
        if not torch.is_floating_point(p):
            out[name] = p.clone()  # integer buffers (none in Llama-shaped models) are taken from the policy
            continue
        # mix in fp32 so bf16 checkpoints do not lose the small differences PPO made
        out[name] = ((1.0 - alpha) * b.float() + alpha * p.float()).to(p.dtype)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the starting model (e.g. the SFT checkpoint)")
    ap.add_argument("--policy", required=True, help="the fine-tuned model (e.g. the PPO checkpoint)")
    ap.add_argument("--alpha", type=float, required=True, help="weight of the policy, in [0, 1]")
    ap.add_argument("--out", required=True, help="folder for the interpolated checkpoint")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in (args.base, args.policy):
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    # tied embeddings appear once in the state dict and stay tied after load_state_dict
    merged = interpolate_state(base.state_dict(), policy.state_dict(), args.alpha)
    policy.load_state_dict(merged)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    AutoTokenizer.from_pretrained(args.policy).save_pretrained(out)
    (out / "interpolation.json").write_text(
        json.dumps({"base": str(args.base), "policy": str(args.policy), "alpha": args.alpha}, indent=1) + "\n"
    )
    print(f"wrote {out} = {1 - args.alpha:g} x {args.base} + {args.alpha:g} x {args.policy}")
    return out


if __name__ == "__main__":
    main()
