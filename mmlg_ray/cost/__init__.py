"""The cost model: what each method costs, in FLOPs, device-hours and money, against pre-training
every size.

Modules: `flops` (analytic parameter and FLOP counts), `prices` (the price table, peak FLOP/s,
money), `methods` (cost per method and stage, who pays for what), `calibrate` (measured steps).
"""

from mmlg_ray.cost.flops import (
    extraction_flops,
    forward_flops,
    layer_params,
    model_params,
    tokens,
    tower_forward_flops,
    tower_params,
    train_flops,
)
from mmlg_ray.cost.prices import (
    PEAK_DTYPES,
    device_hours,
    load_prices,
    money,
    peak_flops,
    price_table,
    run_dtype,
    stage_dtypes,
)
from mmlg_ray.cost.methods import ANCESTOR_FREE, ANCESTOR_RULES, method_costs, stage_arm, stage_costs
from mmlg_ray.cost.calibrate import calibrate_utilization, counted_flops, measure_training_step, time_step

__all__ = [
    "ANCESTOR_FREE",
    "ANCESTOR_RULES",
    "PEAK_DTYPES",
    "calibrate_utilization",
    "counted_flops",
    "device_hours",
    "extraction_flops",
    "forward_flops",
    "layer_params",
    "load_prices",
    "measure_training_step",
    "method_costs",
    "model_params",
    "money",
    "peak_flops",
    "price_table",
    "run_dtype",
    "stage_arm",
    "stage_costs",
    "stage_dtypes",
    "time_step",
    "tokens",
    "tower_forward_flops",
    "tower_params",
    "train_flops",
]
