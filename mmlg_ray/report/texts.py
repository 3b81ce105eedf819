"""The report's prose, kept out of the code: mmlg_ray/templates/report_texts.yaml holds every section
title and every explanatory paragraph by key, with {fields} that the sections fill in. A section and
a paragraph made here carry their key, so the report's structure can be checked without its words."""

from __future__ import annotations

import functools
import importlib.resources

import yaml

from mmlg_ray.report.render import Para, Section


@functools.cache
def texts() -> dict:
    return yaml.safe_load(importlib.resources.files("mmlg_ray").joinpath("templates/report_texts.yaml").read_text())


def words(key: str, **fields) -> str:
    """A paragraph's text alone, filled in."""
    return texts()["paras"][key]["text"].strip().format(**fields)


def para(key: str, **fields) -> Para:
    t = texts()["paras"][key]
    return Para(words(key, **fields), lead=t.get("lead", "").format(**fields), key=key)


def title(key: str, **fields) -> str:
    return texts()["sections"][key].format(**fields)


def section(key: str, blocks: list, group: str = "", **fields) -> Section:
    """Section `key`, titled from the texts; `group`: the key of its contents group's title."""
    return Section(title(key, **fields), blocks, group=title(group) if group else "", key=key)
