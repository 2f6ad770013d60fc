"""Pure ML and Hub code for model management: no Django imports, plain arguments in and
plain results out, so it runs in a notebook and in pytest without a database.

What other apps use of it (the loading API): `load_saved` reloads a ready model in its
format, `compute_device` says where it runs, `module_map` finds its blocks and sublayers."""

from .architecture import module_map
from .quantize import compute_device, load_saved

__all__ = ["compute_device", "load_saved", "module_map"]
