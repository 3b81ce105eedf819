"""Loading: YAML presets and files, dotted command-line overrides, validation errors as one-line `UserError`s, and the dump written beside results."""

from __future__ import annotations

import copy
import re
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from mmlg_ray.errors import UserError
from mmlg_ray.method.spec import ConfigError
from mmlg_ray.config.root import Config


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node.get(p, {}), dict):
            raise UserError(
                f"--set {key}",
                f"{'.'.join(parts[:i + 1])} is a setting, not a section",
                f"set {'.'.join(parts[:i + 1])}=VALUE, or check the key against configs/local.yaml",
            )
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise UserError("--set", f"{item!r} is not key=value", "e.g. --set learngene.schedule=convex")
    key, raw = item.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise UserError("--set", f"{item!r} has no valid key before '='", "e.g. --set learngene.schedule=convex")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _loc(parts) -> str:
    out = ""
    for x in parts:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


# a fix for each kind of pydantic error that a wrong value can raise
_FIXES = {
    "greater_than": "use a value > {gt}",
    "greater_than_equal": "use a value >= {ge}",
    "less_than": "use a value < {lt}",
    "less_than_equal": "use a value <= {le}",
    "int_parsing": "give a whole number",
    "int_from_float": "give a whole number",
    "int_type": "give a whole number",
    "float_parsing": "give a number",
    "float_type": "give a number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "give a string (quote it in YAML if it looks like a number)",
    "list_type": "give a YAML list, e.g. [a, b]",
    "tuple_type": "give a YAML list of two numbers, e.g. [0.0001, 0.003]",
    "too_short": "give exactly the number of values the setting takes, e.g. [low, high]",
    "too_long": "give exactly the number of values the setting takes, e.g. [low, high]",
    "missing": "add this setting",
    "dict_type": "give a mapping, e.g. {key: value}",
    "model_type": "give a mapping of this section's settings (see configs/local.yaml)",
    "model_attributes_type": "give a mapping of this section's settings (see configs/local.yaml)",
    "finite_number": "give a finite number",
}


def _format_validation_error(err: ValidationError) -> UserError:
    e = err.errors()[0]
    loc = [x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-"))]
    field = _loc(loc) or "config"
    exc = (e.get("ctx") or {}).get("error")
    if isinstance(exc, ConfigError):  # our validators: field relative to the model, message and fix
        name = exc.field if not loc else f"{field}.{exc.field}" if exc.field else field
        return UserError(name, exc.message, exc.fix)
    msg = e["msg"].removeprefix("Value error, ")
    m = re.match(r"^([a-z_][\w.]*): (.*)$", msg)
    if m and ("." in m.group(1) or not loc):  # model-level validators that name the full field themselves
        return UserError(m.group(1), m.group(2), "see configs/local.yaml for the accepted values")
    if e["type"] == "literal_error":
        allowed = (e.get("ctx") or {}).get("expected", "")
        return UserError(field, f"{e.get('input')!r} is not allowed", f"use one of {allowed}")
    if e["type"] == "extra_forbidden":
        return UserError(field, "unknown setting", "check the spelling against configs/local.yaml")
    if e["type"] == "missing" and loc and isinstance(loc[-1], int):  # a too-short [low, high] pair
        return UserError(
            _loc(loc[:-1]), f"needs more values (value {loc[-1] + 1} is missing)", "give every value, e.g. [low, high]"
        )
    got = e.get("input")
    text = f"{msg} (got {got!r})" if "input" in e and not isinstance(got, dict) and e["type"] != "missing" else msg
    fix = _FIXES.get(e["type"], "see configs/local.yaml for the expected type and values")
    return UserError(
        field, text, fix.format(**{k: v for k, v in (e.get("ctx") or {}).items() if isinstance(v, (int, float, str))})
    )


def config_from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _format_validation_error(err) from None


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def as_overrides(path: str | os.PathLike) -> list[str]:
    """A YAML config (or a preset's name) as the dotted overrides that give the same config, to be
    extended with more: load_config(None, as_overrides("tiny") + ["seed=1"]). Mapping keys must be plain
    names (no dots); an empty mapping is given as {} (an override replaces, where YAML would merge)."""

    def walk(tree: dict, prefix: str) -> list[str]:
        out = []
        for k, v in tree.items():
            if isinstance(v, dict) and v:
                out += walk(v, f"{prefix}{k}.")
            else:  # the value as YAML that reads back as itself (1e-5 as 1.0e-05, a list in flow style)
                text = yaml.safe_dump(v, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()
                out.append(f"{prefix}{k}={text}")
        return out

    return walk(yaml.safe_load(resolve_config_path(path).read_text()) or {}, "")


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A YAML file, or the name of a preset under configs/ (`--config paper_vitb16`)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return p
    if os.sep not in str(path) and (PRESETS_DIR / f"{p.stem}.yaml").is_file() and p.suffix in ("", ".yaml"):
        return PRESETS_DIR / f"{p.stem}.yaml"
    what = "is a folder, not a YAML file" if p.is_dir() else "is neither a file nor a preset"
    raise UserError(
        "--config", f"{str(path)!r} {what}", f"pass a YAML file, or a preset: {', '.join(presets()) or 'none found'}"
    )


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then dotted overrides, each merged key by key."""
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(
                "--config",
                f"{p} is not valid YAML{where}: {what}",
                "fix the YAML syntax there (configs/local.yaml is a valid example)",
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(
                "--config",
                f"cannot read {p}: {getattr(e, 'strerror', None) or type(e).__name__}",
                "pass a readable YAML text file",
            ) from None
        if not isinstance(data, dict):
            raise UserError(
                "--config",
                f"{p} must hold a mapping at top level",
                "write `key: value` lines, as in configs/local.yaml",
            )
    data = _merge(Config.model_construct().model_dump(mode="json", warnings=False), data)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return config_from_dict(data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
