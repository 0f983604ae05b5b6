"""Baseline methods run on the same partitions and accounting (import as ``fedsplitkd.baselines``)."""

if __name__ != "fedsplitkd.baselines":
    raise ImportError("import this package as 'fedsplitkd.baselines', not as 'baselines'")
