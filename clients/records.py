"""How protocol payloads ride in Flower records: arrays in an ArrayRecord, scalars in a ConfigRecord."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsplitkd.payload import Payload, PayloadError

ARRAYS, SCALARS = "arrays", "config"


def to_records(payload: Payload) -> RecordDict:
    arrays = {k: Array(np.ascontiguousarray(v)) for k, v in payload.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in payload.items() if not isinstance(v, np.ndarray)}
    return RecordDict({ARRAYS: ArrayRecord(array_dict=arrays), SCALARS: ConfigRecord(scalars)})


def from_records(records: RecordDict) -> Payload:
    """The payload in ``records``; PayloadError on unknown record names or types."""
    unknown = sorted(set(records) - {ARRAYS, SCALARS})
    if unknown:
        raise PayloadError(f"unexpected records {unknown}")
    payload: Payload = {}
    if ARRAYS in records:
        if not isinstance(records[ARRAYS], ArrayRecord):
            raise PayloadError(f"record '{ARRAYS}' is not an ArrayRecord")
        try:
            payload.update({k: v.numpy() for k, v in records[ARRAYS].items()})
        except Exception as err:  # a corrupt array must not escape as a crash
            raise PayloadError(f"record '{ARRAYS}' holds an unreadable array: {err}") from err
    if SCALARS in records:
        if not isinstance(records[SCALARS], ConfigRecord):
            raise PayloadError(f"record '{SCALARS}' is not a ConfigRecord")
        payload.update(dict(records[SCALARS]))
    return payload
