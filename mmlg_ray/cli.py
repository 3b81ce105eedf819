"""Shared argument handling for the jobs/ entry points (they parse, then call the library)."""
from __future__ import annotations

import argparse

from .config import Config, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults = configs/local.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set learngene.schedule=convex (repeatable)")


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)
