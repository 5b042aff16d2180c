"""The report's ``index.html``: run metadata, the results table and the sheets."""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from wsss.report.draw import COLUMNS


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def html_value(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: dicts as key/value tables, lists of dicts as tables with one column per key."""
    if depth > 6:
        return html.escape(json.dumps(value)[:200])
    if isinstance(value, dict):
        if not value:
            return "<i>empty</i>"
        body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html_value(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f"<table>{body}</table>"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            keys: list[str] = []
            for row in value:
                keys += [k for k in row if k not in keys]
            head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
            body = "".join(
                "<tr>" + "".join(f"<td>{html_value(row[k], depth + 1) if k in row else ''}</td>" for k in keys) + "</tr>"
                for row in value
            )
            return f"<table><tr>{head}</tr>{body}</table>"
        if any(isinstance(v, (dict, list)) for v in value):
            return "<ol>" + "".join(f"<li>{html_value(v, depth + 1)}</li>" for v in value) + "</ol>"
        return ", ".join(_fmt(v) for v in value)
    if value is None:
        return "<i>none</i>"
    return _fmt(value)


_CSS = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #bbb;padding:2px 6px;text-align:left;vertical-align:top;font-size:13px}
th{background:#eee}img{max-width:100%;border:1px solid #ccc;margin:.5em 0}"""


def render_index(title: str, meta: dict[str, Any], results: dict | None, results_problem: str | None,
                 sheet_names: Sequence[str], columns: Sequence[tuple] = COLUMNS) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>", html_value(meta), "<h2>Results</h2>"]
    if results is None:
        parts.append(f"<p><i>{html.escape(results_problem or 'no results')}</i></p>")
    else:
        ordered = {k: results[k] for k in ("rows",) if k in results}
        ordered.update({k: v for k, v in results.items() if k != "rows"})
        if "rows" in ordered:
            parts.append(html_value(ordered.pop("rows")))
        if ordered:
            parts.append(html_value(ordered))
    parts.append("<h2>Per-image maps</h2>")
    parts.append("<p>Columns: " + ", ".join(html.escape(c[0]) for c in columns) + ". CAM tiles show the map of the "
                 "image's first image-level class (named on the tile) as a jet heatmap over the image; label tiles "
                 "show VOC colours and list the classes present; grey n/a tiles mark missing inputs.</p>")
    if not sheet_names:
        parts.append("<p><i>no images to show</i></p>")
    for name in sheet_names:
        parts.append(f"<p><a href='{html.escape(name)}'><img src='{html.escape(name)}' alt='{html.escape(name)}'></a></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


