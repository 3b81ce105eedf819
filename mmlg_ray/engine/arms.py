"""Arms and grid cells: the names every table, file and trial uses (no torch, no Ray).

An arm is a method with its extraction mode (mmlg/elastic) or pre-training budget (pt_ft@0.5x); a
cell is an arm at one descendant shape (modality, depth, width). One definition, read by the
pipeline, both executors and the report."""

from __future__ import annotations

from dataclasses import dataclass

from mmlg_ray.config import LEARNGENE_METHODS, PRETRAINED_METHODS


def arm_name(method: str, extraction: str = "", pt_budget: float = 0.0) -> str:
    """The name tables show: the plain method for a fixed extraction, method/elastic, pt_ft@0.5x."""
    if method == "pt_ft":
        return f"pt_ft@{float(pt_budget):g}x"
    if method in LEARNGENE_METHODS and extraction and extraction != "fixed":
        return f"{method}/{extraction}"
    return method


def parse_arm(arm: str) -> tuple[str, str, float]:
    """arm_name's inverse: (method, extraction, pt_budget)."""
    if arm.startswith("pt_ft@"):
        return "pt_ft", "", float(arm[len("pt_ft@") :].rstrip("x"))
    method, _, mode = arm.partition("/")
    if method in LEARNGENE_METHODS:
        return method, mode or "fixed", 0.0
    return method, "", 1.0 if method == "csm" else 0.0


@dataclass(frozen=True)
class Cell:
    modality: str
    depth: int
    width: int
    method: str
    extraction: str = ""  # learngene methods: fixed | elastic
    pt_budget: float = 0.0  # pt_ft: multiple of the extraction's sample budget; csm: 1

    @property
    def arm(self) -> str:
        return arm_name(self.method, self.extraction, self.pt_budget)

    @property
    def tag(self) -> str:
        return f"{self.arm}-{self.modality}-d{self.depth}-w{self.width}"

    @property
    def key(self) -> str:
        """The cell's key in the sweep's plan and its trials' configs: arm|modality|depth|width."""
        return f"{self.arm}|{self.modality}|{self.depth}|{self.width}"

    @property
    def shape(self) -> str:
        """The descendant shape this cell grows: every arm of one shape is searched on the same
        hyper-parameter candidates (common random numbers)."""
        return f"{self.modality}|{self.depth}|{self.width}"

    @property
    def learngene_key(self) -> str | None:
        """The learngene this cell grows from (one per method and extraction mode)."""
        return arm_name(self.method, self.extraction) if self.method in LEARNGENE_METHODS else None

    @property
    def pretrained_key(self) -> tuple[str, float] | None:
        return (self.method, self.pt_budget) if self.method in PRETRAINED_METHODS else None

    @classmethod
    def of(cls, key: str) -> "Cell":
        """Cell.key's inverse."""
        arm, mod, d, w = key.split("|")
        return cls(mod, int(d), int(w), *parse_arm(arm))
