"""Flower server-side strategies of fedsplitkd (import as ``fedsplitkd.strategies``)."""

if __name__ != "fedsplitkd.strategies":
    raise ImportError("import this package as 'fedsplitkd.strategies', not as 'strategies'")

from fedsplitkd.strategies.splitkd import SplitKD

__all__ = ["SplitKD"]
