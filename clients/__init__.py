"""Flower ClientApps of fedsplitkd (import as ``fedsplitkd.clients``)."""

if __name__ != "fedsplitkd.clients":
    raise ImportError("import this package as 'fedsplitkd.clients', not as 'clients'")

from fedsplitkd.clients.device_app import register_device

__all__ = ["register_device"]
