"""``SplitKDConfig``: every setting of the split-KD protocol, typed, grown from the run-config schema.

The config app reads all of ``fedsplitkd.config.SCHEMA``; a library user's app (their own
model, teacher and data) needs only the protocol's part of it. Which part is decided by the
schema's sections, so a key added to a protocol section appears here without an edit:

- protocol: the ``train``, ``split``, ``fleet`` and ``faults`` sections, and the ``model``
  section's server-compute keys (``torch-device``, ``precision``, ``compile``);
- the config app's alone: ``method``, ``data``, ``output``, the zoo's model keys, and its
  wiring (``virtual-devices``, ``checkpoint-every``, ``resume``), which the library's
  one-node-per-device handlers do not serve.

``python -m fedsplitkd.splitkd_config`` prints the protocol keys as a ``[tool.flwr.app.config]``
block to paste into an app's pyproject.toml (Flower refuses ``--run-config`` keys an app does
not declare).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from fedsplitkd.config import DEFAULTS, SCHEMA, WHERE, ConfigError, RunConfig, SECTIONS, resolve

# Flower's logger: the apps' own log lines go there (a plain "fedsplitkd" logger's INFO is unseen).
log = logging.getLogger("flwr")

PROTOCOL_SECTIONS = ("train", "split", "fleet", "faults")
# The model section names the zoo's models, except these: how the edge server computes.
SERVER_COMPUTE_KEYS = ("torch-device", "precision", "compile")
# The config app's own wiring: virtual devices need its bundling handlers, checkpoints its
# results directory, evaluate-every its metrics rows; the library serves one node per device,
# keeps nothing on disk, and a user's own evaluate_fn decides when it tests.
CONFIG_APP_KEYS = ("virtual-devices", "checkpoint-every", "resume", "evaluate-every")
PROTOCOL_KEYS: tuple[str, ...] = tuple(
    name for name, (section, _) in WHERE.items()
    if (section in PROTOCOL_SECTIONS or name in SERVER_COMPUTE_KEYS) and name not in CONFIG_APP_KEYS)
# A key in no schema is taken for a misspelling of a protocol key that difflib rates this
# close and that two typed characters (edits) turn it into: 'kd-alfa' (0.80, 2 edits) is one
# of 'kd-alpha'; an app's own 'teacher-checkpoint' (0.71 against 'teacher-input') is not, while
# 'teacher-ckpt' is taken for 'teacher-cut' (2 edits; app_keys= says it is the app's).
MISSPELLING_CUTOFF = 0.75
MISSPELLING_EDITS = 2


def field_name(key: str) -> str:
    return key.replace("-", "_")


def edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions from ``a`` to ``b``."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def misspelled(key: str) -> str | None:
    """The protocol key ``key`` looks like a misspelling of, if any."""
    close = difflib.get_close_matches(key, PROTOCOL_KEYS, n=3, cutoff=MISSPELLING_CUTOFF)
    return next((k for k in close if edits(key, k) <= MISSPELLING_EDITS), None)


def _field_type(key: str) -> str:
    section, attr = WHERE[key]
    return next(f.type for f in dataclasses.fields(SECTIONS[section]) if f.name == attr)


def split_run_config(run_config: Mapping[str, Any], app_keys: Iterable[str] = ()
                     ) -> tuple[dict[str, Any], list[str]]:
    """(the protocol's keys and values, the keys left to the app) of a Flower run config.

    A key that is in no schema but close to a protocol key is a misspelling until the app
    says otherwise: it raises, naming the key it resembles. ``app_keys`` names the app's
    own keys, which are never taken for misspellings.
    """
    own = set(app_keys)
    protocol, ignored = {}, []
    for key, value in run_config.items():
        if key in PROTOCOL_KEYS:
            protocol[key] = value
            continue
        if key not in SCHEMA and key not in own:
            close = misspelled(key)
            if close:
                raise ConfigError(f"run-config {key!r}: not a split-KD key; did you mean {close!r}? "
                                  f"(an app key of your own: from_run_config(..., app_keys=[{key!r}]))")
        ignored.append(key)
    return protocol, ignored


class _SplitKDConfigMethods:
    """What ``SplitKDConfig`` does besides holding its fields (the fields come from the schema)."""

    ignored_keys: ClassVar[tuple[str, ...]] = ()  # from_run_config: the run config's keys left to the app

    def __post_init__(self) -> None:
        resolved = self._resolve()  # raises ConfigError naming the bad key
        for key in PROTOCOL_KEYS:  # a TOML 32.0 for an integer key is the int 32, as resolved
            if type(DEFAULTS[key]) is int and isinstance(getattr(self, field_name(key)), float):
                object.__setattr__(self, field_name(key), resolved[key])
        # Other values stay as given (an 'auto' the resolved config decides stays 'auto', so a
        # dataclasses.replace of another key decides it again).
        object.__setattr__(self, "_resolved", resolved)

    def _resolve(self) -> RunConfig:
        values = {key: getattr(self, field_name(key)) for key in PROTOCOL_KEYS}
        kd = values["kd-alpha"] > 0 or values["kd-feature-weight"] > 0
        return resolve({**values, "method": "splitkd" if kd else "split"})

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], app_keys: Iterable[str] = ()):
        """The protocol's settings from a Flower run config (``context.run_config``) or a ``RunConfig``.

        The app's own keys are left alone; which they were is in ``config.ignored_keys`` and
        logged. A key close to a protocol key but not one ('kd-alfa') raises, unless
        ``app_keys`` names it.
        """
        if isinstance(run_config, RunConfig):
            return cls(**{field_name(k): run_config[k] for k in PROTOCOL_KEYS})
        protocol, ignored = split_run_config(run_config, app_keys)
        config = cls(**{field_name(k): v for k, v in protocol.items()})
        object.__setattr__(config, "ignored_keys", tuple(ignored))
        if ignored:
            log.info("fedsplitkd: run-config keys left to the app (not split-KD's): %s", ", ".join(ignored))
        return config

    def run_config(self) -> RunConfig:
        """The full resolved run config these settings stand for (the protocol code reads it)."""
        return self._resolved  # type: ignore[attr-defined]

    def checked(self):
        """Itself: a SplitKDConfig is checked when it is made (kept for callers that ask)."""
        return self

    def as_run_config(self) -> dict[str, Any]:
        """The settings as run-config keys and values (what ``from_run_config`` reads back)."""
        return {key: getattr(self, field_name(key)) for key in PROTOCOL_KEYS}


def _doc() -> str:
    lines = ["The split protocol's settings, typed; each field is a run-config key with '_' for '-'.",
             "",
             "Grown from ``fedsplitkd.config.SCHEMA`` (its defaults and checks; a bad value raises",
             "ConfigError naming the key). Both sides of a run must use the same settings: build",
             "both from the same run config with ``SplitKDConfig.from_run_config``.",
             "",
             "Fields:"]
    lines += [f"    {field_name(key)} = {DEFAULTS[key]!r}: {SCHEMA[key].accepts}" for key in PROTOCOL_KEYS]
    return "\n".join(lines)


SplitKDConfig = dataclasses.make_dataclass(
    "SplitKDConfig",
    [(field_name(key), _field_type(key), dataclasses.field(default=DEFAULTS[key])) for key in PROTOCOL_KEYS],
    bases=(_SplitKDConfigMethods,), frozen=True,
    namespace={"__module__": __name__, "__qualname__": "SplitKDConfig", "__doc__": _doc()})


def as_run_config(config: SplitKDConfig | RunConfig | Mapping[str, Any] | None) -> RunConfig:
    """The whole run config the protocol code reads, from any form a user may hold its settings in:
    a ``SplitKDConfig``, a ``RunConfig`` (the config app's), a Flower run config, or None (defaults)."""
    if config is None:
        return SplitKDConfig().run_config()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, _SplitKDConfigMethods):
        return config.run_config()
    if isinstance(config, Mapping):
        return SplitKDConfig.from_run_config(config).run_config()
    raise TypeError(f"config: give a SplitKDConfig, a RunConfig or a run-config mapping, "
                    f"not {type(config).__name__}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def app_config_block(keys: Iterable[str] = PROTOCOL_KEYS) -> str:
    """``[tool.flwr.app.config]`` lines declaring the protocol keys at their defaults: an app must
    declare a key before ``flwr run --run-config`` may override it."""
    lines = ["[tool.flwr.app.config]", "# split-KD's protocol keys (fedsplitkd.SplitKDConfig.from_run_config reads "
             "them), at their defaults"]
    lines += [f"{key} = {toml_value(DEFAULTS[key])}" for key in keys]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsplitkd.splitkd_config",
                                     description="Print split-KD's protocol keys as a [tool.flwr.app.config] "
                                                 "block for an app's pyproject.toml.")
    parser.add_argument("--keys", nargs="*", metavar="KEY", help="only these keys (default: every protocol key)")
    args = parser.parse_args(argv)
    unknown = [k for k in args.keys or () if k not in PROTOCOL_KEYS]
    if unknown:
        parser.error(f"not a split-KD protocol key: {unknown[0]!r} (known: {', '.join(PROTOCOL_KEYS)})")
    print(app_config_block(args.keys or PROTOCOL_KEYS), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
