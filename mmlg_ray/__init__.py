"""mmlg_ray: extract a multimodal learngene from a large CLIP and grow descendant CLIPs from it.

The core (this package minus `distributed`) is plain PyTorch + open_clip and imports no Ray.
"""

__version__ = "0.1.0"
