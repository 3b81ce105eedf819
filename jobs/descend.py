"""Grow one descendant from a learngene file and write it as an open_clip local-dir checkpoint.

    python jobs/descend.py --learngene LG.safetensors --modality image_text \
        --image-depth 4 --text-depth 4 --width 128 --out DIR
    python -c "import open_clip; open_clip.create_model('local-dir:DIR')"
"""

import sys

from mmlg_ray.cli.descend import main

if __name__ == "__main__":
    sys.exit(main())
