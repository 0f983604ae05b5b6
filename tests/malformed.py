"""Malformed replies: each mutation of a valid chunk or final reply, the field it breaks,
and a transport that puts one into a whole round."""

from __future__ import annotations

import numpy as np

from fedsplitkd.protocol.rounds import InProcessTransport


class Tampering(InProcessTransport):
    """Replaces device ``target``'s ``at``-th reply (0 = first chunk, -1 = the final reply)
    by ``replace(reply)``: a mutated payload, or an error string for a device that failed."""

    def __init__(self, setups, target, at: int, replace):
        super().__init__(setups)
        self.target, self.at, self.replace = target, at, replace
        self.seen, self.final = 0, False

    def send(self, requests):
        if self.target in requests:
            self.final = bool(requests[self.target].get("final"))
        super().send(requests)

    def receive(self):
        replies = super().receive()
        if self.target in replies and not isinstance(replies[self.target], str):
            if self.final if self.at == -1 else self.seen == self.at:
                replies[self.target] = self.replace(dict(replies[self.target]))
            self.seen += 1
        return replies


def _tile(payload: dict) -> dict:
    """A self-consistent chunk with twice the rows (and batches) of ``payload``."""
    out = dict(payload)
    for k in ("activations", "labels", "teacher-input"):
        out[k] = np.concatenate([payload[k], payload[k]])
    out["batch-sizes"] = np.concatenate([payload["batch-sizes"], payload["batch-sizes"]])
    return out


def _set(key, value):
    return lambda p: {**p, key: value(p) if callable(value) else value}


def _drop(key):
    return lambda p: {k: v for k, v in p.items() if k != key}


def _with_nan(key):
    def mutate(p):
        a = p[key].copy()
        a.flat[3] = np.nan
        return {**p, key: a}
    return mutate


MUTATIONS = {
    "activations-wrong-shape": ("activations", _set("activations", lambda p: p["activations"][:, :-1])),
    "activations-extra-axis": ("activations", _set("activations", lambda p: p["activations"][:, None])),
    "activations-float64": ("activations", _set("activations", lambda p: p["activations"].astype(np.float64))),
    "activations-nan": ("activations", _with_nan("activations")),
    "activations-inf": ("activations", _set("activations", lambda p: np.where(
        np.arange(p["activations"].size).reshape(p["activations"].shape) == 0, np.float32(np.inf),
        p["activations"]).astype(np.float32))),
    "activations-list": ("activations", _set("activations", lambda p: p["activations"].tolist())),
    "activations-missing": ("activations", _drop("activations")),
    "activations-oversize": ("activations", _set("activations", lambda p: (p["activations"] * 0 + 1e9).astype(np.float32))),
    "labels-too-large": ("labels", _set("labels", lambda p: np.where(np.arange(len(p["labels"])) == 5, 10,
                                                                      p["labels"]).astype(np.int64))),
    "labels-negative": ("labels", _set("labels", lambda p: np.where(np.arange(len(p["labels"])) == 0, -1,
                                                                     p["labels"]).astype(np.int64))),
    "labels-missing": ("labels", _drop("labels")),
    "labels-int32": ("labels", _set("labels", lambda p: p["labels"].astype(np.int32))),
    "labels-short": ("labels", _set("labels", lambda p: p["labels"][:-1])),
    "extra-field": ("surprise", _set("surprise", np.zeros(3, dtype=np.float32))),
    "round-wrong": ("round", _set("round", 2)),
    "round-string": ("round", _set("round", "1")),
    "round-missing": ("round", _drop("round")),
    "batch-sizes-sum": ("batch-sizes", _set("batch-sizes", lambda p: p["batch-sizes"] + np.eye(
        len(p["batch-sizes"]), dtype=np.int64)[0])),
    "batch-sizes-empty": ("batch-sizes", _set("batch-sizes", np.zeros(0, dtype=np.int64))),
    "batch-sizes-has-zero": ("batch-sizes", _set("batch-sizes", lambda p: np.concatenate(
        [p["batch-sizes"][:-1], [0], p["batch-sizes"][-1:]]).astype(np.int64))),
    "too-many-rows": ("activations", _tile),
    "remaining-negative": ("remaining", _set("remaining", -1)),
    "teacher-input-missing": ("teacher-input", _drop("teacher-input")),
    "teacher-input-wrong-shape": ("teacher-input", _set("teacher-input", lambda p: p["teacher-input"][:, :1])),
    "teacher-input-wrong-rows": ("teacher-input", _set("teacher-input", lambda p: p["teacher-input"][:-1])),
    "teacher-input-nan": ("teacher-input", _with_nan("teacher-input")),
}


def _weight(mutate_array):
    """Mutate the first device-part weight of a final reply."""
    def mutate(p):
        key = sorted(k for k in p if k.startswith("weights/"))[0]
        return {**p, key: mutate_array(p[key])}
    return mutate


FINAL_MUTATIONS = {
    "final-weight-missing": ("weights", lambda p: {k: v for k, v in p.items()
                                                   if k != sorted(k for k in p if k.startswith("weights/"))[0]}),
    "final-weight-nan": ("weights/", _weight(lambda a: np.full_like(a, np.nan))),
    "final-weight-inf": ("weights/", _weight(lambda a: np.full_like(a, np.inf))),
    "final-weight-wrong-shape": ("weights/", _weight(lambda a: a[:1])),
    "final-weight-float64": ("weights/", _weight(lambda a: a.astype(np.float64))),
    "final-weight-extra": ("weights/", lambda p: {**p, "weights/surprise": np.zeros(2, np.float32)}),
    "final-examples-zero": ("num-examples", _set("num-examples", 0)),
    "final-examples-inflated": ("num-examples", _set("num-examples", lambda p: p["num-examples"] * 100)),
    "final-round-wrong": ("round", _set("round", 9)),
    "final-round-missing": ("round", _drop("round")),
    "final-extra-field": ("activations", _set("activations", np.zeros(1, np.float32))),
}
