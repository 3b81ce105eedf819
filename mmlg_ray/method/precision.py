"""Mixed precision for every training and evaluation loop of the core library (no Ray here).

`precision` (the top-level config setting) is one of

  fp32  plain float32 everywhere (the default; with `tf32: true` CUDA matmuls use TF32 tensor cores)
  bf16  autocast to bfloat16: matmuls and convolutions in bf16, master weights and optimizer in fp32
  fp16  autocast to float16 with dynamic loss scaling (torch.amp.GradScaler), for GPUs without bf16

The core loops (train.TorchEngine / run_loop) keep fp32 master weights and run forward passes under
`autocast`, so saved artifacts are fp32. The DeepSpeed layer maps the same setting onto DeepSpeed's
own bf16 / fp16 modes (mmlg_ray.distributed.extract). Losses and metrics are computed in fp32
(`in_float32`), whatever the forward's precision.

torch 2.14 supports CPU autocast in bf16 and fp16 and a CPU GradScaler, so every path runs on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    try:
        return DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}") from None


def _device_type(device) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


@functools.lru_cache(maxsize=None)
def autocast_supported(device_type: str, precision: str) -> bool:
    """Whether torch.autocast really runs in this precision on this device type (torch disables
    autocast with a warning, instead of failing, for an unsupported dtype)."""
    if precision == "fp32":
        return True
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    if device_type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=DTYPES[precision]):
                return (
                    torch.is_autocast_enabled(device_type)
                    and torch.get_autocast_dtype(device_type) == DTYPES[precision]
                )
        except (RuntimeError, ValueError):
            return False


def autocast(device, precision: str):
    """The forward context for (device, precision): torch.autocast in bf16 / fp16, nothing in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dt = _device_type(device)
    if not autocast_supported(dt, precision):
        from mmlg_ray.errors import UserError

        raise UserError(
            "precision",
            f"{precision} autocast is not supported on {dt} with torch {torch.__version__}",
            "use precision=bf16 or fp32",
        )
    return torch.autocast(dt, dtype=DTYPES[precision])


def grad_scaler(device, precision: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (disabled, i.e. a pass-through, in fp32 and bf16)."""
    return torch.amp.GradScaler(_device_type(device), enabled=precision == "fp16")


def set_tf32(enabled: bool) -> bool:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions, on CUDA only. Returns whether the
    switch was applied. Uses torch's legacy flags, which set the new fp32_precision state as well
    (libraries that read the legacy flags would fail on a mix of the two APIs)."""
    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return True


def in_float32(fn):
    """Run a loss / metric function in fp32: floating tensor arguments are cast to float32 and
    autocast is off inside, so the logits of a bf16 forward are still formed in fp32. In fp32 runs
    this changes nothing (the casts return the same tensors)."""

    def cast(x):
        return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        args = tuple(cast(a) for a in args)
        kw = {k: cast(v) for k, v in kw.items()}
        dev = next((a.device.type for a in (*args, *kw.values()) if torch.is_tensor(a)), "cpu")
        if not torch.is_autocast_enabled(dev):
            return fn(*args, **kw)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kw)

    return wrapper
