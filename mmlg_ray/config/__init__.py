"""One typed config tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/local.yaml", ["learngene.schedule=convex"])

Every model forbids unknown keys, so a typo is an error naming the field, not a silently
ignored setting. Validation problems become `UserError` (one line, exit code 2 in jobs/).

Modules: `base` (the vocabulary, listed once, and shared settings), `datasets`, `stages`, `cluster`
(Ray), `root` (`Config`), `load`.
"""

from mmlg_ray.method.spec import ConfigError, ModelSpec
from mmlg_ray.config.base import (
    AncestorConfig,
    AncestorPretrain,
    EXTRACTIONS,
    IN_MEMORY_KINDS,
    KINDS,
    LEARNGENE_METHODS,
    METHODS,
    MODALITIES,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    PRETRAINED_METHODS,
    SCHEDULES,
    SELECTION_METHODS,
    STREAMED_KINDS,
    Seed,
    TrainConfig,
    dig,
)
from mmlg_ray.config.datasets import DataConfig, DatasetConfig, local_corpus
from mmlg_ray.config.stages import (
    DescendantsConfig,
    ExtractionConfig,
    FinetuneConfig,
    GridConfig,
    LearngeneConfig,
    drop_defaults_added_later,
)
from mmlg_ray.config.cluster import (
    ExtractionRayConfig,
    MLflowSettings,
    RayConfig,
    SearchSpace,
    TuneSettings,
    custom_resources,
)
from mmlg_ray.config.root import Config, ReportConfig, URI_SCHEMES
from mmlg_ray.config.load import (
    PRESETS_DIR,
    as_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    presets,
    resolve_config_path,
)

__all__ = [
    "AncestorConfig",
    "AncestorPretrain",
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "DescendantsConfig",
    "EXTRACTIONS",
    "ExtractionConfig",
    "ExtractionRayConfig",
    "FinetuneConfig",
    "GridConfig",
    "IN_MEMORY_KINDS",
    "KINDS",
    "LEARNGENE_METHODS",
    "LearngeneConfig",
    "METHODS",
    "MLflowSettings",
    "MODALITIES",
    "ModelSpec",
    "NonNegFloat",
    "NonNegInt",
    "PRESETS_DIR",
    "PosFloat",
    "PosInt",
    "PRETRAINED_METHODS",
    "RayConfig",
    "ReportConfig",
    "SCHEDULES",
    "SELECTION_METHODS",
    "STREAMED_KINDS",
    "SearchSpace",
    "Seed",
    "TrainConfig",
    "TuneSettings",
    "URI_SCHEMES",
    "as_overrides",
    "config_from_dict",
    "custom_resources",
    "dig",
    "drop_defaults_added_later",
    "dump_config",
    "load_config",
    "local_corpus",
    "parse_override",
    "presets",
    "resolve_config_path",
]
