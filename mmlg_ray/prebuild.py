"""Pre-build DeepSpeed's C++ ops used on CPU at install time (else built on first use): the
shared-memory comm op (~25 s) and CPU Adam for optimizer offload (~50 s on 2 cores).

    python -m mmlg_ray.prebuild
"""
import sys


def main() -> int:
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
