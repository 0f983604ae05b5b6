"""Protocol payloads: flat dicts of numpy arrays and scalars, their checks and their size.

Model weights travel under ``weights/<state_dict key>`` and the teacher's embedding
module under ``teacher/<key>``; everything else is a named array or scalar.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Payload = dict[str, Any]

WEIGHTS = "weights/"
TEACHER = "teacher/"


class PayloadError(ValueError):
    """A payload is malformed; the message names the field."""


def payload_bytes(payload: Payload) -> int:
    """Bytes of tensor data a payload carries (numel x itemsize; framing excluded)."""
    return sum(v.nbytes for v in payload.values() if isinstance(v, np.ndarray))


def pack(prefix: str, arrays: dict[str, np.ndarray]) -> Payload:
    return {prefix + k: v for k, v in arrays.items()}


def unpack(prefix: str, payload: Payload) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in payload.items() if k.startswith(prefix)}


def require_array(payload: Payload, key: str, dtype: type, shape: tuple[int | None, ...],
                  finite: bool = False) -> np.ndarray:
    """The array at ``key`` with the given dtype and shape (None = any size on that axis)."""
    if key not in payload:
        raise PayloadError(f"missing field '{key}'")
    value = payload[key]
    if not isinstance(value, np.ndarray):
        raise PayloadError(f"field '{key}' is {type(value).__name__}, not an array")
    if value.dtype != np.dtype(dtype):
        raise PayloadError(f"field '{key}' has dtype {value.dtype}, expected {np.dtype(dtype)}")
    if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise PayloadError(f"field '{key}' has shape {value.shape}, expected {want}")
    if finite and not np.isfinite(value).all():
        raise PayloadError(f"field '{key}' holds NaN or Inf")
    return value


def require_labels(payload: Payload, key: str, count: int, num_classes: int,
                   shape: tuple[int, ...] = ()) -> np.ndarray:
    """``count`` int64 labels of ``shape`` each (a sequence's: one per position), in [0, num_classes)."""
    labels = require_array(payload, key, np.int64, (count, *shape))
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PayloadError(f"field '{key}' outside [0, {num_classes})")
    return labels


def require_int(payload: Payload, key: str, low: int, high: int | None = None) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PayloadError(f"field '{key}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise PayloadError(f"field '{key}' = {value} out of range [{low}, {high}]")
    return int(value)


def require_keys(payload: Payload, allowed: set[str], prefixes: tuple[str, ...] = ()) -> None:
    extra = sorted(k for k in payload if k not in allowed and not k.startswith(prefixes))
    if extra:
        raise PayloadError(f"unexpected fields {extra}")


def require_weights(payload: Payload, prefix: str, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exactly the arrays of ``reference`` under ``prefix``: same keys, dtypes, shapes, finite."""
    got = set(unpack(prefix, payload))
    if got != set(reference):
        missing, extra = sorted(set(reference) - got), sorted(got - set(reference))
        raise PayloadError(f"fields '{prefix}*' do not match the model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
    return {k: require_array(payload, prefix + k, ref.dtype.type, ref.shape, finite=True)
            for k, ref in reference.items()}
