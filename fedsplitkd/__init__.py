"""fedsplitkd: split knowledge distillation for IoT fleets, on Flower."""

import os as _os

__version__ = "0.1.0"

# The Flower-facing subpackages live at the checkout root (strategies/, clients/,
# baselines/) and install as fedsplitkd.strategies etc. When this package is imported
# from a checkout or from a Flower app bundle, the root sits beside us and must be on
# our __path__, or the bundle's copy of fedsplitkd would hide the installed subpackages.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "strategies", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

# The library API (docs/library.md), imported on first use: ``import fedsplitkd`` stays light.
_LIBRARY = {"SplitKDConfig", "SplitDevice", "edge_server", "split_model", "teacher_accuracy"}
__all__ = sorted(_LIBRARY)


def __getattr__(name: str):
    if name in _LIBRARY:
        from fedsplitkd import library

        return getattr(library, name)
    raise AttributeError(f"module 'fedsplitkd' has no attribute {name!r}")
