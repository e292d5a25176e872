"""Storage backends. Each is a plugin found by URL scheme; see :mod:`meterkit.stores.base`."""

from meterkit.stores.base import Store

__all__ = ["Store"]
