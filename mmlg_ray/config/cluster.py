"""Ray settings: extraction on Ray Train, the sweep on Ray Tune (search space, resources, logging), the cluster."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from mmlg_ray.method.spec import ConfigError, _Strict


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
