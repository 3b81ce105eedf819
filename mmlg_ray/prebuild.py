"""Pre-build DeepSpeed's C++ ops used on CPU at install time (else built on first use): the
shared-memory comm op (~25 s) and CPU Adam for optimizer offload (~50 s on 2 cores).

    python -m mmlg_ray.prebuild
"""

import os
import sys
from pathlib import Path


def venv_ninja_first() -> None:
    """Put this interpreter's bin folder (where pip's ninja lives) first on PATH, in every process that
    builds or loads a DeepSpeed op. Two ninjas on one machine (pip's 1.13 and Debian's 1.11) hash a
    command differently in the build folder's shared .ninja_log, so each sees the other's build as
    stale and compiles the op again: 35 s at the start of every extraction whose Ray workers found
    a different ninja on PATH than the process that built the op last (`make run` paid it every time)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bin_dir) / "ninja").exists() and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


def main() -> int:
    venv_ninja_first()
    for label, name in (("shared-memory comm op", "ShareMemCommBuilder"), ("CPU Adam op", "CPUAdamBuilder")):
        try:
            from deepspeed.ops.op_builder import cpu

            getattr(cpu, name)().load(verbose=False)
            print(f"DeepSpeed {label}: built")
        except Exception as e:  # a GPU image has NCCL and its own builds; these are optimisations on CPU
            print(f"DeepSpeed {label} not pre-built ({type(e).__name__}: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
