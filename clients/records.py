"""How protocol payloads ride in Flower records.

On the wire every array of a payload is packed into one byte string (record ``packed``:
the bytes and a JSON layout of names, dtypes and shapes) next to the scalars (record
``config``). The SuperLink stores and forwards each Array of a message as a separate
object, one HTTP request each, so a message with six arrays cost six times the requests
of a message with one: packing keeps a split exchange at a fixed, small request count.
The device state in ``context.state`` is packed the same way: reading it back is one
``frombuffer`` per array, where an ``Array`` per array costs an ``np.load`` each
(``experiments/bench_node.py`` measures a node's handler). ``from_records`` still reads an
ArrayRecord ``arrays``, one Array per array.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedsplitkd.protocol.payload import Payload, PayloadError

ARRAYS, SCALARS, PACKED = "arrays", "config", "packed"

# The split protocol's message kinds. Flower routes "category.action" to the ClientApp's
# @app.category("action"), so the protocol's handlers sit beside an app's own train/evaluate.
DESCRIBE = "query.describe"              # which device a node is (partition id, count)
FORWARD = "train.split_forward"          # a round's first request: the global device part
BACKWARD = "train.split_backward"        # a chunk's cut-layer gradients
SPLIT_EVALUATE = "evaluate.split"        # split inference on the device's validation split
# Only plain numeric and boolean arrays travel: never object arrays, whatever a reply claims.
WIRE_DTYPES = {np.dtype(t).str for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                         np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


def to_records(payload: Payload) -> RecordDict:
    arrays = {k: np.ascontiguousarray(v) for k, v in payload.items() if isinstance(v, np.ndarray)}
    scalars = ConfigRecord({k: v for k, v in payload.items() if not isinstance(v, np.ndarray)})
    layout = [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]
    blob = b"".join(v.tobytes() for v in arrays.values())
    return RecordDict({PACKED: ConfigRecord({"layout": json.dumps(layout), "data": blob}), SCALARS: scalars})


def _unpack(record: ConfigRecord) -> Payload:
    try:
        layout, data = json.loads(record["layout"]), record["data"]
        if not isinstance(data, bytes) or not isinstance(layout, list):
            raise TypeError("layout must be a JSON list and data bytes")
        buffer, offset, arrays = bytearray(data), 0, {}  # a writable copy: handlers update state in place
        for name, dtype, shape in layout:
            if np.dtype(dtype).str not in WIRE_DTYPES:
                raise TypeError(f"array {name!r} has dtype {dtype!r}")
            dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise ValueError(f"array {name!r} has shape {shape}")
            count = int(np.prod(shape, dtype=np.int64))
            if offset + count * dtype.itemsize > len(buffer):
                raise ValueError(f"array {name!r} runs past the {len(buffer)} bytes sent")
            arrays[str(name)] = np.frombuffer(buffer, dtype, count, offset).reshape(shape)
            offset += count * dtype.itemsize
        if offset != len(buffer):
            raise ValueError(f"{len(buffer) - offset} bytes left over after the arrays")
        return arrays
    except (KeyError, TypeError, ValueError) as err:
        raise PayloadError(f"record '{PACKED}' is malformed: {err}") from err


def from_records(records: RecordDict) -> Payload:
    """The payload in ``records``; PayloadError on unknown record names or types."""
    unknown = sorted(set(records) - {ARRAYS, SCALARS, PACKED})
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
    if PACKED in records:
        if not isinstance(records[PACKED], ConfigRecord):
            raise PayloadError(f"record '{PACKED}' is not a ConfigRecord")
        payload.update(_unpack(records[PACKED]))
    if SCALARS in records:
        if not isinstance(records[SCALARS], ConfigRecord):
            raise PayloadError(f"record '{SCALARS}' is not a ConfigRecord")
        payload.update(dict(records[SCALARS]))
    return payload


def bundle(sections: dict[int, RecordDict]) -> RecordDict:
    """Several virtual devices' records in one message, each record named
    ``<device>/<record>``: a node serving k devices costs the engine one message, not k."""
    return RecordDict({f"{device}/{name}": record for device, section in sections.items()
                       for name, record in section.items()})


def unbundle(records: RecordDict) -> dict[int, RecordDict]:
    """Each device's records in a bundle; PayloadError for a record outside any device section."""
    sections: dict[int, RecordDict] = {}
    for name in records:
        device, slash, record = name.partition("/")
        if not slash or not device.isdigit():
            raise PayloadError(f"record {name!r} is not '<device>/<record>'")
        sections.setdefault(int(device), RecordDict())[record] = records[name]
    return sections


def to_bundle(payloads: dict[int, Payload]) -> RecordDict:
    """Several virtual devices' payloads in one message (records ``<device>/packed`` and
    ``<device>/config``)."""
    return bundle({device: to_records(payload) for device, payload in payloads.items()})


def from_bundle(records: RecordDict) -> dict[int, Payload | PayloadError]:
    """Each device's payload in a bundle, or the PayloadError that makes its section invalid.

    A record outside any device section makes the whole bundle invalid (PayloadError).
    """
    payloads: dict[int, Payload | PayloadError] = {}
    for device, section in unbundle(records).items():
        try:
            payloads[device] = from_records(section)
        except PayloadError as err:
            payloads[device] = err
    return payloads


def load_state(context: Context, prefix: str) -> Payload:
    """The payload kept in ``context.state`` under ``prefix``."""
    return from_records(RecordDict({name: context.state[prefix + name] for name in (PACKED, SCALARS)
                                    if prefix + name in context.state}))


def store_state(context: Context, prefix: str, state: Payload) -> None:
    for name, record in to_records(state).items():
        if state:
            context.state[prefix + name] = record
        elif prefix + name in context.state:  # nothing left to keep (the device's round is over)
            del context.state[prefix + name]
