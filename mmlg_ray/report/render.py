"""A report as data, rendered twice from the same data: HTML (jinja2 template, pandas tables, plots
embedded as data URIs: one self-contained file) and Markdown (jinja2 template, plots as PNG files
beside it). No markup is parsed: a section is a list of typed blocks.

    Section("My section", [Para("what it shows", lead="In short."), Table(df), Figure("x.png", png)])

Sections that share a `group` (one per task, say) share one entry of the table of contents, with a
sub-entry each; the contents list only the sections present.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Para:
    text: str
    lead: str = ""  # a bold opening phrase
    key: str = ""  # its key in mmlg_ray/templates/report_texts.yaml (see report.texts)
    kind: str = field(default="para", init=False)


@dataclass
class Table:
    df: pd.DataFrame
    caption: str = ""
    floatfmt: str = ".3g"
    kind: str = field(default="table", init=False)


@dataclass
class Bullets:
    items: list[str]
    kind: str = field(default="bullets", init=False)


@dataclass
class Code:
    text: str
    lang: str = ""
    kind: str = field(default="code", init=False)


@dataclass
class Figure:
    name: str  # file name beside report.md
    png: bytes
    alt: str = ""
    kind: str = field(default="figure", init=False)


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)
    group: str = ""  # sections of one group share a contents entry
    anchor: str = ""  # set by render (unique per report)
    key: str = ""  # its key in mmlg_ray/templates/report_texts.yaml (see report.texts)

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _anchor(sections: list[Section]) -> None:
    seen: set[str] = set()
    for s in sections:
        a, i = _slug(s.title), 2
        while a in seen:
            a, i = f"{_slug(s.title)}-{i}", i + 1
        seen.add(a)
        s.anchor = a


def contents(sections: list[Section]) -> list[dict]:
    """The table of contents of the sections present: [{title, anchor, children: [{title, anchor}]}];
    a group's entry points at its first section, each member is a child named by its title's rest."""
    _anchor(sections)
    toc, groups = [], {}
    for s in sections:
        if not s.group:
            toc.append({"title": s.title, "anchor": s.anchor, "children": []})
            continue
        if s.group not in groups:
            groups[s.group] = {"title": s.group, "anchor": s.anchor, "children": []}
            toc.append(groups[s.group])
        rest = s.title[len(s.group) :].lstrip(" :-") if s.title.startswith(s.group) else s.title
        groups[s.group]["children"].append({"title": rest or s.title, "anchor": s.anchor})
    return toc


def display_frame(df: pd.DataFrame, floatfmt: str = ".3g") -> pd.DataFrame:
    """The cells as strings, one way for both outputs: floats to `floatfmt` (NaN blank, inf spelled),
    integers of 5+ digits with thousands separators."""

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return format(v, floatfmt)
        if isinstance(v, (int,)) and not isinstance(v, bool) and abs(v) >= 10000:
            return f"{v:,}"
        return str(v)

    out = df.copy()
    for c in out.columns:
        out[c] = [cell(v.item() if hasattr(v, "item") else v) for v in out[c]]
    return out


def table_html(t: Table) -> str:
    if t.df.empty:
        return "<p><i>(none)</i></p>"
    return display_frame(t.df, t.floatfmt).to_html(index=False, border=0, classes="data", escape=True, na_rep="")


def table_md(t: Table) -> str:
    """A pipe table (report.md's own output: pandas' to_markdown needs tabulate, which is not pinned)."""
    if t.df.empty:
        return "_(none)_"
    d = display_frame(t.df, t.floatfmt)
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in d.columns) + " |", "|" + "---|" * len(d.columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join(lines)


def _env():
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mmlg_ray", "templates"),
        autoescape=jinja2.select_autoescape(["html.j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["table_html"] = lambda t: Markup(table_html(t))
    env.filters["table_md"] = table_md
    env.filters["b64"] = lambda b: base64.b64encode(b).decode()
    return env


def render_html(sections: list[Section], title: str = "mmlg_ray sweep report", css: str = "") -> str:
    toc = contents(sections)
    return _env().get_template("report.html.j2").render(title=title, sections=sections, toc=toc, extra_css=css)


def render_md(sections: list[Section], title: str = "mmlg_ray sweep report") -> str:
    toc = contents(sections)
    return _env().get_template("report.md.j2").render(title=title, sections=sections, toc=toc)
