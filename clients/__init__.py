"""Flower ClientApps of fedsplitkd (import as ``fedsplitkd.clients``)."""

if __name__ != "fedsplitkd.clients":
    raise ImportError("import this package as 'fedsplitkd.clients', not as 'clients'")

from fedsplitkd.clients import timing as _timing

_timing.mark("import")  # our share of a ClientApp process's start begins here

from fedsplitkd.clients.device_app import register_device  # noqa: E402

__all__ = ["register_device"]
