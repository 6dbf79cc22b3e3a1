"""Registers the Ferret codec (``compression.codec = "ferret"``); the code lives in ``ferret.py``."""

from stamen.sketching.ferret import FerretCodec  # noqa: F401  (registration side effect)
