"""`loopchat eval behaviours`: the seed's behaviours, scored by transparent rubrics.

Greedy replies from each model to the held-out prompts in the bundled eval set
(loopchat/data/bundled/eval/behaviours.jsonl), checked by loopchat.evaluate.rubric, written
as one JSON per model plus a per-category table and an HTML page with the replies side by
side (like the seed's ChatGPT | InstructGPT table).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import Field
from tqdm import tqdm

from loopchat.config import Config
from loopchat.evaluate import report, rubric


class BehavioursConfig(Config):
    model: str = Field("default", description="model spec to evaluate")
    compare: list[str] = Field(default_factory=list, description="other model specs, or results JSON files written earlier, shown side by side")
    out: str = Field("runs/eval", description="folder for results JSON and the HTML report")
    items: str | None = Field(None, description="eval items JSONL (default: the bundled behaviours set)")
    category: list[str] = Field(default_factory=list, description="only these categories")
    limit: int | None = Field(None, description="at most this many items (per category when categories are given)")
    max_new_tokens: int = Field(192, description="reply budget in tokens")
    batch_size: int = Field(16, description="prompts generated together")


def label_of(spec: str) -> str:
    """A short column name for a model spec."""
    p = Path(spec)
    if p.name in ("final", "model") or p.name.startswith("checkpoint-"):
        return f"{p.parent.name}/{p.name}"
    return p.name or spec


def select_items(cfg: BehavioursConfig) -> list[dict]:
    items = rubric.load_items(cfg.items)
    if cfg.category:
        unknown = set(cfg.category) - {it["category"] for it in items}
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}")
        items = [it for it in items if it["category"] in cfg.category]
    if cfg.limit is not None:
        if cfg.category:
            kept, seen = [], {}
            for it in items:
                if seen.get(it["category"], 0) < cfg.limit:
                    kept.append(it)
                    seen[it["category"]] = seen.get(it["category"], 0) + 1
            items = kept
        else:
            items = items[: cfg.limit]
    if not items:
        raise ValueError("no eval items selected")
    return items


def replies_for(spec: str, items: list[dict], max_new_tokens: int, batch_size: int, gen=None) -> list[str]:
    """Greedy replies, batched; prompts sorted by length so batches waste little padding."""
    from loopchat.generate import Generator, SamplingParams

    if gen is None:
        from loopchat import models

        import torch

        # fp32 so greedy replies are exactly the model's (bf16 can flip near-ties)
        gen = Generator(*models.load(spec), fast_dtype=torch.float32)
    order = sorted(range(len(items)), key=lambda i: len(gen.encode(items[i]["messages"])))
    replies: list[str] = [""] * len(items)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    bar = tqdm(total=len(items), desc=f"eval {label_of(spec)}", unit="prompt")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        outs = gen.generate([items[i]["messages"] for i in idx], params)
        for i, group in zip(idx, outs):
            replies[i] = group[0].text.strip()
        bar.update(len(idx))
    bar.close()
    return replies


def evaluate_model(spec: str, items: list[dict], max_new_tokens: int = 192, batch_size: int = 16, gen=None) -> dict:
    results = rubric.score(items, replies_for(spec, items, max_new_tokens, batch_size, gen))
    return {"model": spec, "summary": rubric.summarise(results), "results": results}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def results_path(out: Path, label: str) -> Path:
    """Where `eval behaviours --out out` writes the results of the model shown as `label`."""
    return out / f"behaviours-{_safe(label)}.json"


def load_or_run(spec: str, items: list[dict], cfg: BehavioursConfig) -> dict:
    if spec.endswith(".json") and Path(spec).is_file():
        data = json.loads(Path(spec).read_text())
        if not isinstance(data, dict) or "results" not in data:
            raise ValueError(f"{spec}: not a behaviours results file (no 'results')")
        # Re-score the saved replies with the current rubrics, so that columns written earlier
        # are judged by the same rules as the one generated now.
        replies = {r["id"]: r["reply"] for r in data["results"]}
        kept = [it for it in items if it["id"] in replies]
        data["results"] = rubric.score(kept, {it["id"]: replies[it["id"]] for it in kept})
        data["summary"] = rubric.summarise(data["results"])
        return data
    return evaluate_model(spec, items, cfg.max_new_tokens, cfg.batch_size)


def run_behaviours(cfg: BehavioursConfig) -> dict[str, dict]:
    items = select_items(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    for spec in [cfg.model, *cfg.compare]:
        data = load_or_run(spec, items, cfg)
        label = label_of(data["model"])
        while label in runs:
            label += "'"
        runs[label] = data
        if not spec.endswith(".json"):
            path = results_path(out, label)
            path.write_text(json.dumps(data, ensure_ascii=False, indent=1))
            print(f"wrote {path}")
    summaries = {label: d["summary"] for label, d in runs.items()}
    print(rubric.format_table(summaries))
    html = report.write_html(out / "behaviours.html", {label: d["results"] for label, d in runs.items()}, title="loopchat behaviour evaluation")
    print(f"side-by-side report: {html}")
    return runs
