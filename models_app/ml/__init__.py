"""Pure ML and Hub code for model management: no Django imports, plain arguments in and
plain results out, so it runs in a notebook and in pytest without a database.

What other apps use of it (the loading API): `load_saved` reloads a ready model in its
format, `tokenizer_for` gives its tokenizer, `compute_device` says where it runs,
`check_architecture` judges a config, and
`decoder` finds a loaded model's blocks and what each sublayer adds to the stream."""

from . import decoder
from .loading import check_architecture, tokenizer_for
from .quantize import compute_device, load_saved

__all__ = ["check_architecture", "compute_device", "decoder", "load_saved", "tokenizer_for"]
