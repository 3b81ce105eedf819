"""Shared argument handling for the jobs/ entry points (they parse, then call the library)."""
from __future__ import annotations

import argparse
import re

from .config import Config, load_config
from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (a missing or unknown flag, a value of the wrong type or not among the
    choices) are UserErrors: one line naming the flag, exit code 2, like every other bad input."""

    def error(self, message: str):
        m = re.match(r"argument ([^:]+): (.*)", message)
        if m:
            field, message = m.group(1).split("/")[-1], m.group(2)
        else:  # "the following arguments are required: --out, --modality", "unrecognized arguments: --x 1"
            named = message.split(":", 1)[-1].replace(",", " ").split()
            field = named[0] if ":" in message and named else "arguments"
        raise UserError(field, message, f"see {self.prog} --help")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults = configs/local.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set learngene.schedule=convex (repeatable)")


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)
