"""A side-by-side HTML report of behaviour-eval results, like the seed's "ChatGPT | InstructGPT" table.

One self-contained page: inline CSS and JS, no external assets, every piece of text HTML-escaped,
images (e.g. training-curve PNGs) embedded as base64 data URIs. It shows a per-category score
table (one column per model), then every item: the conversation so far and each model's reply
in a column, with a pass/fail badge and the rubric's reasons for a fail. Buttons filter items by
category, and a checkbox shows only items on which the models disagree.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path
from typing import Any, Iterable

from loopchat.evaluate.rubric import CATEGORIES, summarise, table_rows

_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
}

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:1.5rem;color:#1f2328;background:#f6f8fa;line-height:1.45}
h1{margin:0 0 .3rem;font-size:1.6rem}
h2{font-size:1.2rem;margin:1.6rem 0 .6rem}
.meta{color:#57606a;font-size:.9rem;margin-bottom:1rem}
table.scores{border-collapse:collapse;background:#fff;font-size:.92rem}
table.scores th,table.scores td{border:1px solid #d0d7de;padding:.35rem .7rem;text-align:right}
table.scores th:first-child,table.scores td:first-child{text-align:left}
table.scores thead th{background:#eaeef2}
table.scores tr.total td{font-weight:600;background:#f6f8fa}
td.best{background:#dafbe1}
.figs img{max-width:100%;border:1px solid #d0d7de;background:#fff;margin:.4rem .4rem .4rem 0}
.filters{position:sticky;top:0;background:#f6f8fa;padding:.5rem 0;z-index:2;border-bottom:1px solid #d0d7de}
.filters button{border:1px solid #d0d7de;background:#fff;border-radius:1rem;padding:.2rem .7rem;margin:.15rem;cursor:pointer;font-size:.85rem}
.filters button.on{background:#0969da;color:#fff;border-color:#0969da}
.filters label{font-size:.85rem;margin-left:.6rem}
.item{background:#fff;border:1px solid #d0d7de;border-radius:8px;margin:1rem 0;padding:.8rem 1rem}
.item .head{display:flex;gap:.6rem;align-items:baseline;margin-bottom:.5rem}
.item .id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85rem;color:#57606a}
.cat{font-size:.75rem;background:#ddf4ff;color:#0550ae;border-radius:1rem;padding:.05rem .55rem}
.turn{white-space:pre-wrap;margin:.25rem 0;padding:.4rem .6rem;border-radius:6px;font-size:.92rem}
.turn.user{background:#f6f8fa;font-weight:600}
.turn.assistant{background:#fff8c5}
.turn.system{background:#eaeef2;font-style:italic}
.role{font-size:.7rem;text-transform:uppercase;color:#57606a;display:block;font-weight:400;font-style:normal}
.replies{display:grid;gap:.7rem;margin-top:.6rem}
.reply{border:1px solid #d0d7de;border-radius:6px;padding:.5rem .7rem}
.reply.pass{border-left:4px solid #1a7f37}
.reply.fail{border-left:4px solid #cf222e}
.reply .model{font-weight:600;font-size:.85rem;margin-bottom:.3rem;display:flex;justify-content:space-between;gap:.5rem}
.reply .text{white-space:pre-wrap;font-size:.92rem}
.reply .missing{color:#57606a;font-style:italic}
.badge{font-size:.72rem;font-weight:700;border-radius:4px;padding:.05rem .45rem;color:#fff}
.badge.pass{background:#1a7f37}
.badge.fail{background:#cf222e}
.reasons{margin:.4rem 0 0;padding-left:1.1rem;color:#cf222e;font-size:.8rem}
.hidden{display:none}
"""

_JS = """
(function(){
  var buttons=document.querySelectorAll('.filters button');
  var disagree=document.getElementById('disagree');
  var current='all';
  function apply(){
    document.querySelectorAll('.item').forEach(function(el){
      var show=(current==='all'||el.dataset.category===current);
      if(disagree&&disagree.checked&&el.dataset.disagree!=='1'){show=false;}
      el.classList.toggle('hidden',!show);
    });
  }
  buttons.forEach(function(b){
    b.addEventListener('click',function(){
      current=b.dataset.category;
      buttons.forEach(function(x){x.classList.toggle('on',x===b);});
      apply();
    });
  });
  if(disagree){disagree.addEventListener('change',apply);}
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _data_uri(path: str | Path) -> str:
    p = Path(path)
    mime = _MIME.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def _score_table(summaries: dict[str, dict[str, Any]]) -> str:
    models, rows = table_rows(summaries)
    out = ['<table class="scores"><thead><tr><th>category</th>']
    out += [f"<th>{_e(m)}</th>" for m in models]
    out.append("</tr></thead><tbody>")
    cats = set()
    for s in summaries.values():
        cats.update(s["by_category"])
    for label, cells in rows:
        # Highlight the best model per category row (pass rates only, and only with >1 model).
        best: set[int] = set()
        if label in cats and len(models) > 1:
            rates = [summaries[m]["by_category"].get(label, {}).get("pass_rate") for m in models]
            valid = [r for r in rates if r is not None]
            if valid and max(valid) > min(valid):
                best = {i for i, r in enumerate(rates) if r == max(valid)}
        cls = ' class="total"' if label == "overall" else ""
        best_attr = ' class="best"'
        tds = "".join(f"<td{best_attr if i in best else ''}>{_e(c)}</td>" for i, c in enumerate(cells))
        out.append(f"<tr{cls}><td>{_e(label)}</td>{tds}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _conversation(messages: Iterable[dict[str, Any]]) -> str:
    parts = []
    for m in messages:
        role = str(m.get("role", ""))
        parts.append(
            f'<div class="turn {_e(role)}"><span class="role">{_e(role)}</span>{_e(m.get("content", ""))}</div>'
        )
    return "".join(parts)


def _reply(model: str, r: dict[str, Any] | None) -> str:
    if r is None:
        return f'<div class="reply"><div class="model">{_e(model)}</div><div class="missing">(no reply)</div></div>'
    ok = bool(r.get("passed"))
    state = "pass" if ok else "fail"
    reasons = r.get("reasons") or []
    reasons_html = ""
    if reasons and not ok:
        reasons_html = '<ul class="reasons">' + "".join(f"<li>{_e(x)}</li>" for x in reasons) + "</ul>"
    return (
        f'<div class="reply {state}"><div class="model"><span>{_e(model)}</span>'
        f'<span class="badge {state}">{state.upper()}</span></div>'
        f'<div class="text">{_e(r.get("reply", ""))}</div>{reasons_html}</div>'
    )


def render_html(
    results_by_model: dict[str, list[dict[str, Any]]],
    title: str,
    images: list[str | Path] | None = None,
) -> str:
    """The report as one HTML string (see :func:`write_html`)."""
    if not results_by_model:
        raise ValueError("results_by_model is empty: nothing to report")
    models = list(results_by_model)
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    order: list[str] = []
    first: dict[str, dict[str, Any]] = {}
    for m in models:
        by_model[m] = {}
        for r in results_by_model[m]:
            by_model[m][r["id"]] = r
            if r["id"] not in first:
                first[r["id"]] = r
                order.append(r["id"])
    summaries = {m: summarise(results_by_model[m]) for m in models}

    cats: list[str] = []
    for i in order:
        c = first[i]["category"]
        if c not in cats:
            cats.append(c)
    cats.sort(key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else len(CATEGORIES), c))

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="meta">{len(order)} items, {len(cats)} categories, models: {_e(", ".join(models))}</div>',
        "<h2>Scores by category</h2>",
        _score_table(summaries),
    ]
    if images:
        out.append('<h2>Figures</h2><div class="figs">')
        for p in images:
            out.append(f'<img src="{_data_uri(p)}" alt="{_e(Path(p).name)}" title="{_e(Path(p).name)}">')
        out.append("</div>")

    out.append("<h2>Conversations</h2>")
    out.append('<div class="filters"><button class="on" data-category="all">all</button>')
    for c in cats:
        n = sum(1 for i in order if first[i]["category"] == c)
        out.append(f'<button data-category="{_e(c)}">{_e(c)} ({n})</button>')
    if len(models) > 1:
        out.append('<label><input type="checkbox" id="disagree"> only where models disagree</label>')
    out.append("</div>")

    cols = f"grid-template-columns:repeat({len(models)},minmax(0,1fr))"
    for i in order:
        base = first[i]
        outcomes = {bool(by_model[m][i]["passed"]) for m in models if i in by_model[m]}
        disagree = "1" if len(outcomes) > 1 else "0"
        out.append(
            f'<div class="item" id="{_e(i)}" data-category="{_e(base["category"])}" data-disagree="{disagree}">'
            f'<div class="head"><span class="id">{_e(i)}</span><span class="cat">{_e(base["category"])}</span></div>'
            f'{_conversation(base.get("messages") or [])}'
            f'<div class="replies" style="{cols}">'
        )
        for m in models:
            out.append(_reply(m, by_model[m].get(i)))
        out.append("</div></div>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)


def write_html(
    path: str | Path,
    results_by_model: dict[str, list[dict[str, Any]]],
    title: str,
    images: list[str | Path] | None = None,
) -> Path:
    """Write the side-by-side report to ``path`` and return it.

    ``results_by_model`` maps a model name to its results, each
    {"id", "category", "messages", "reply", "passed", "reasons"} (what ``rubric.score`` returns).
    Items are shown in the order of first appearance; a model without a reply for an item
    gets an empty cell.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results_by_model, title, images), encoding="utf-8")
    return path
