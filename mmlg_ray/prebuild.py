"""Pre-build DeepSpeed's shared-memory comm op at install time (else ~25 s on first use).

    python -m mmlg_ray.prebuild
"""
import sys


def main() -> int:
    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        ShareMemCommBuilder().load(verbose=False)
        print("DeepSpeed shared-memory comm op: built")
    except Exception as e:  # a GPU image has NCCL; the op is an optimisation on CPU only
        print(f"DeepSpeed shared-memory comm op not pre-built ({type(e).__name__}: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
