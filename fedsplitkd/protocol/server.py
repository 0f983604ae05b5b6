"""The edge-server side of split-KD: one training round over any transport.

A transport sends ``{device key: request}`` and hands back each device's reply, or an
error string. The Flower strategy's transport sends Messages; ``rounds.InProcessTransport``
calls the device handlers directly (the reference the Flower run is measured against).
The round logic, the payload checks and the accounting are this one piece of code for both.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedsplitkd.config import ConfigError
from fedsplitkd.fleet.costs import CostModel, DeviceTraffic, SplitFlops
from fedsplitkd.protocol.device import BACKWARD_KIND, FORWARD_KIND
from fedsplitkd.models.zoo import SplitModel
from fedsplitkd.protocol.payload import (TEACHER, WEIGHTS, Payload, PayloadError, pack, payload_bytes,
                                require_array, require_int, require_keys, require_labels, require_weights)
from fedsplitkd.protocol.runtime import (EdgeRuntime, NonFiniteLoss, OptimizerFactory, evaluate, load_numpy_state,
                                round_lr, state_to_numpy)

log = logging.getLogger("fedsplitkd")


class Transport(Protocol):
    """Carries requests to devices and their replies back.

    ``send`` must not block on the devices; ``receive`` blocks until at least one reply
    (or, for a device that failed or timed out, an error string) is available and returns
    all that are. Every request sent gets exactly one of them.
    """

    def send(self, requests: dict[Hashable, Payload]) -> None: ...

    def receive(self) -> dict[Hashable, Payload | str]: ...


def exchange(transport: Transport, requests: dict[Hashable, Payload]) -> dict[Hashable, Payload | str]:
    """Send every request and wait for all the replies."""
    transport.send(requests)
    replies: dict[Hashable, Payload | str] = {}
    while len(replies) < len(requests):
        replies.update(transport.receive())
    return replies


# A sanity bound far above what the device part yields on standardised inputs: finite but
# huge activations pass every finiteness check and still wreck the server part in one step.
MAX_ACTIVATION = 1e6

CHUNK_FIELDS = {"round", "activations", "labels", "batch-sizes", "remaining"}
TEACHER_FIELDS = {"none": set(), "embedding": {"teacher-input"},
                  "cached": {"teacher-input", "sample-ids", "teacher-ids"}}


@dataclass
class RoundStats:
    """What one round cost and produced, summed over devices; ``traffic`` per device."""

    devices: int = 0
    completed: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_activations: int = 0  # of bytes_up, by kind: the student's cut-layer activations,
    bytes_up_teacher: int = 0      # the teacher's inputs (its embedding's outputs),
    bytes_up_labels: int = 0       # the labels,
    bytes_up_weights: int = 0      # and the trained device parts (the rest is framing and ids)
    exchanges: int = 0
    transport_s: float = 0.0   # wall time waiting for the devices' replies
    server_s: float = 0.0      # wall time of the server's own compute
    dropped: Counter = field(default_factory=Counter)  # by kind (failed, invalid) and stage
    drops: list = field(default_factory=list)  # (device key, stage, kind, reason) per dropped device
    traffic: dict = field(default_factory=dict)  # device key -> DeviceTraffic
    completed_keys: list = field(default_factory=list)
    costs: dict = field(default_factory=dict)        # the cost model's totals (metrics.csv)
    device_costs: list = field(default_factory=list)  # and its per-device rows

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")


class SplitKDServer:
    """Holds the student's server part and the teacher; runs rounds against a transport."""

    def __init__(self, student: SplitModel, teacher: SplitModel | None, cfg,
                 num_classes: int, costs: CostModel | None = None, cut: str | None = None,
                 optimizer: OptimizerFactory | None = None):
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.optimizer_factory = optimizer  # a factory of the server part's optimizer; None: SGD from cfg
        self.cut = cut or cfg.split.cut
        self.mode = cfg.split.teacher_mode
        self.num_classes = num_classes
        mutual = cfg.split.kd_mode == "mutual"
        if self.mode != "none" and cfg.split.teacher_cut not in ("default", *teacher.cut_points):
            raise ConfigError(f"teacher-cut {cfg.split.teacher_cut!r} is not a cut point of the teacher: "
                              f"{teacher.cut_points}")
        self.edge = EdgeRuntime(student, self.cut, teacher if self.mode != "none" else None,
                                cfg.split.kd_alpha, cfg.split.kd_temperature, cfg.train.learning_rate,
                                cfg.train.momentum, mutual, optimizer, cfg.model.precision, cfg.model.compile,
                                cfg.train.grad_clip, cfg.split.teacher_cut, cfg.split.kd_feature_weight)
        self.device_part = student.device_part(self.cut)
        self.flops = SplitFlops.of(student, self.cut, teacher if self.mode != "none" else None, mutual,
                                   cfg.split.teacher_cut)
        stats = student.block_stats()
        self.act_shape = stats[student.cut_index(self.cut) - 1].out_shape
        self.label_shape = stats[-1].out_shape[:-1]  # () for a class, (T,) for a next token per position
        if cfg.split.kd_feature_weight and self.label_shape:
            raise ConfigError("run-config 'kd-feature-weight': feature distillation matches one feature vector a "
                              "sample; this student predicts a label per position (set it to 0)")
        if self.mode != "none":
            embedding = teacher.device_part(cfg.split.teacher_cut)
            self.teacher_weights = state_to_numpy(embedding)
            self.emb_shape = teacher.block_stats()[len(embedding) - 1].out_shape
        self.max_chunk = cfg.split.exchange_batches * cfg.train.batch_size
        # Who holds the teacher's embedding: devices, or the nodes serving bundles of virtual
        # devices (``transport.holder``), which keep one copy for all they serve.
        self.has_teacher: set[Hashable] = set()
        self.teacher_cache: dict[Hashable, dict[int, np.ndarray]] = {}
        self.costs = costs  # prices each round; its deadline may keep stragglers out
        # SplitFed V1: each device trains its own copy of the server part (with its own
        # optimizer), and the copies are averaged by samples at the round's end.
        self.per_device_server = cfg.method.name == "splitfed"
        self.copies: dict[Hashable, tuple[dict, dict]] = {}
        self.siblings: dict[str, SplitKDServer] = {self.cut: self}

    def at_cut(self, cut: str) -> SplitKDServer:
        """The server for another cut of the same student: it shares the student, the teacher,
        the cost model and what devices hold; it has its own server-part optimizer."""
        if cut not in self.siblings:
            sibling = SplitKDServer(self.student, self.teacher, self.cfg, self.num_classes, self.costs, cut,
                                    self.optimizer_factory)
            sibling.has_teacher, sibling.teacher_cache = self.has_teacher, self.teacher_cache
            sibling.siblings = self.siblings
            self.siblings[cut] = sibling
        return self.siblings[cut]

    # ---- checks ---------------------------------------------------------------------------
    def check_chunk(self, reply: Payload, server_round: int) -> None:
        """Raise PayloadError unless ``reply`` is a well-formed chunk of this round."""
        require_keys(reply, CHUNK_FIELDS | TEACHER_FIELDS[self.mode])
        if require_int(reply, "round", 0) != server_round:
            raise PayloadError(f"field 'round' = {reply['round']}, expected {server_round}")
        acts = require_array(reply, "activations", np.float32, (None, *self.act_shape), finite=True)
        n = len(acts)
        if np.abs(acts).max(initial=0.0) > MAX_ACTIVATION:
            raise PayloadError(f"field 'activations' exceeds {MAX_ACTIVATION:g} in magnitude")
        if not 0 < n <= self.max_chunk:
            raise PayloadError(f"field 'activations' has {n} rows, expected 1..{self.max_chunk}")
        require_labels(reply, "labels", n, self.num_classes, self.label_shape)
        sizes = require_array(reply, "batch-sizes", np.int64, (None,))
        if not 0 < len(sizes) <= self.cfg.split.exchange_batches or sizes.min() < 1 or sizes.sum() != n:
            raise PayloadError(f"field 'batch-sizes' {sizes.tolist()[:8]} does not split {n} rows")
        require_int(reply, "remaining", 0)
        if self.mode == "embedding":
            require_array(reply, "teacher-input", np.float32, (n, *self.emb_shape), finite=True)
        elif self.mode == "cached":
            require_array(reply, "sample-ids", np.int64, (n,))
            m = len(require_array(reply, "teacher-ids", np.int64, (None,)))
            require_array(reply, "teacher-input", np.float32, (m, *self.emb_shape), finite=True)
            if not np.isin(reply["teacher-ids"], reply["sample-ids"]).all():
                raise PayloadError("field 'teacher-ids' names samples outside 'sample-ids'")

    def check_final(self, reply: Payload, server_round: int, examples: int | None = None) -> dict[str, np.ndarray]:
        """The device part in a final reply; ``examples``, when given, is how many samples
        the server saw from this device, and the reply must claim exactly that many."""
        require_keys(reply, {"round", "num-examples"}, prefixes=(WEIGHTS,))
        if require_int(reply, "round", 0) != server_round:
            raise PayloadError(f"field 'round' = {reply['round']}, expected {server_round}")
        claimed = require_int(reply, "num-examples", 1)
        if examples is not None and claimed != examples:
            raise PayloadError(f"field 'num-examples' = {claimed}, but the device sent {examples} samples")
        return require_weights(reply, WEIGHTS, state_to_numpy(self.device_part))

    # ---- teacher ----------------------------------------------------------------------------
    def teacher_logits(self, key: Hashable, reply: Payload) -> np.ndarray | None:
        """The teacher's logits for a chunk; under ``kd-mode = mutual`` its inputs, since the
        teacher then changes every step (EdgeRuntime.train_step computes the logits)."""
        if self.mode == "none":
            return None
        if self.edge.mutual:
            return reply["teacher-input"]
        if self.mode == "embedding":
            return self.edge.teacher_logits(reply["teacher-input"])
        cache = self.teacher_cache.setdefault(key, {})
        if len(reply["teacher-ids"]):
            fresh = self.edge.teacher_logits(reply["teacher-input"])
            cache.update(zip(reply["teacher-ids"].tolist(), fresh))
        missing = [i for i in reply["sample-ids"].tolist() if i not in cache]
        if missing:
            raise PayloadError(f"teacher cache miss for {len(missing)} samples (first {missing[0]})")
        return np.stack([cache[i] for i in reply["sample-ids"].tolist()])

    # ---- the round --------------------------------------------------------------------------
    def train_chunks(self, chunks: dict[Hashable, Payload], teacher: dict) -> tuple[dict, float, set]:
        """Server steps over the chunks' minibatches.

        Returns per-device gradients, the summed loss, and the devices whose minibatch gave
        a non-finite loss (that step is skipped; they are dropped from the round).

        ``server-batching = per-device``: one step per device minibatch, device by device
        (sequential split learning on the server side). ``joint``: step j takes minibatch j
        of every device at once (CPSL), fewer and larger server steps. ``interleaved``: one
        step per device minibatch, minibatch j of every device before minibatch j + 1 of any,
        so consecutive steps see different devices' data (label-skewed devices one after
        another drag a momentum SGD towards each device's classes in turn).
        """
        batches = []  # (key, activations, labels, teacher logits) per minibatch
        for key, reply in chunks.items():
            bounds = np.cumsum(reply["batch-sizes"])[:-1]
            t = np.split(teacher[key], bounds) if teacher[key] is not None else [None] * (len(bounds) + 1)
            batches.append(list(zip([key] * (len(bounds) + 1), np.split(reply["activations"], bounds),
                                    np.split(reply["labels"], bounds), t)))
        batching = "per-device" if self.per_device_server else self.cfg.split.server_batching
        depth = range(max(map(len, batches)))
        if batching == "joint":
            steps = [[b[j] for b in batches if j < len(b)] for j in depth]
        elif batching == "interleaved":
            steps = [[b[j]] for j in depth for b in batches if j < len(b)]
        else:
            steps = [[minibatch] for device_batches in batches for minibatch in device_batches]
        grads: dict[Hashable, list[np.ndarray]] = {key: [] for key in chunks}
        loss_sum, diverged = 0.0, set()
        queue = list(steps)
        while queue:
            step = [b for b in queue.pop(0) if b[0] not in diverged]
            if not step:
                continue
            keys, acts, labels, logits = map(list, zip(*step))
            if self.per_device_server:
                self._enter_copy(keys[0])
            try:
                step_grads, step_loss = self.edge.train_step(acts, labels, logits)
            except NonFiniteLoss as err:
                if err.indices is None:  # cannot tell who: retry the devices one by one
                    queue[:0] = [[b] for b in step]
                else:
                    diverged.update(keys[i] for i in err.indices)
                    queue.insert(0, step)  # the others, without the culprits
                continue
            finally:
                if self.per_device_server:
                    self._leave_copy(keys[0])
            loss_sum += step_loss
            for key, g in zip(keys, step_grads):
                grads[key].append(g)
        return {k: np.concatenate(g) for k, g in grads.items() if k not in diverged}, loss_sum, diverged

    def _enter_copy(self, key: Hashable) -> None:
        weights, optimizer = self.copies.get(key, (self.round_start, {}))
        load_numpy_state(self.edge.part, weights)
        if optimizer:
            self.edge.optimizer.load_state_dict(optimizer)
        else:
            self.edge.optimizer.state.clear()

    def _leave_copy(self, key: Hashable) -> None:
        self.copies[key] = (state_to_numpy(self.edge.part), copy.deepcopy(self.edge.optimizer.state_dict()))

    def run_round(self, transport: Transport, keys: list[Hashable], server_round: int) -> RoundStats:
        """One round at this cut: ``train_round``, then the devices are priced (stragglers
        past the deadline dropped) and their parts averaged."""
        stats, finals = self.train_round(transport, keys, server_round)
        price_round(self.costs, stats, finals, self.flops)
        self.aggregate(list(finals.values()))
        if self.per_device_server:  # SplitFed V1: the completed devices' server copies, averaged
            kept = [(self.copies[k][0], n) for k, (_, n) in finals.items() if k in self.copies]
            load_numpy_state(self.edge.part, average([w for w, _ in kept], [n for _, n in kept])
                             if kept else self.round_start)
        return stats

    def train_round(self, transport: Transport, keys: list[Hashable], server_round: int
                    ) -> tuple[RoundStats, dict[Hashable, tuple[dict[str, np.ndarray], int]]]:
        """Chunk exchanges with every device until each returns its device part: the round's
        stats (not priced yet) and, per device that completed, its part and sample count.

        Replies are handled in the order of ``keys`` within each exchange, and exchange j
        before exchange j+1, so the server's steps run in the same order whatever the
        timing. With per-device server steps, the next requests of the devices done so far
        leave together whenever the server would wait for a reply, so it computes while
        the other replies are on their way and pushes few times; a node serving several
        devices (the transport's ``holder``) gets its requests only once all of them are
        done this exchange, in one message. ``joint`` steps wait for the whole exchange.
        """
        stats = RoundStats(devices=len(keys))
        if self.optimizer_factory is None:  # a factory's optimizer keeps its own rate
            self.edge.set_lr(round_lr(self.cfg, server_round))
        if self.costs is not None:
            self.costs.server_round = server_round
        if self.per_device_server:
            self.round_start, self.copies = state_to_numpy(self.edge.part), {}
        finals: dict[Hashable, tuple[dict[str, np.ndarray], int]] = {}
        sent: dict[Hashable, Payload] = {}
        arrived: dict[Hashable, Payload | str] = {}
        seen: Counter = Counter()  # samples trained on per device: its weight in the average
        cursor: Counter = Counter()  # per device, the batch its next chunk starts at

        def send(requests: dict[Hashable, Payload]) -> None:
            if not requests:
                return
            sent.update(requests)
            for key, request in requests.items():
                traffic = stats.traffic.setdefault(key, DeviceTraffic())
                traffic.bytes_down += payload_bytes(request)
                traffic.exchanges += 1
            stats.bytes_down += sum(payload_bytes(r) for r in requests.values())
            transport.send(requests)

        def drop(key: Hashable, kind: str, reason: str, request: Payload) -> None:
            # The stage is what the device was asked to do: start the round with a forward
            # pass, or apply gradients (after it had uploaded activations).
            stage = "forward" if any(k.startswith(WEIGHTS) for k in request) else "backward"
            log.warning("round %d: dropped device %s at %s (%s): %s", server_round, key, stage, kind, reason)
            stats.dropped[kind] += 1
            stats.dropped[stage] += 1
            stats.drops.append((key, stage, kind, reason))
            self.has_teacher.discard(holder(key))

        holder = getattr(transport, "holder", lambda key: key)
        send(self.first_requests(keys, server_round, holder))
        order = list(keys)
        ready: dict[Hashable, Payload] = {}  # next requests computed but not sent yet
        while order:
            stats.exchanges += 1
            groups = [order] if self.cfg.split.server_batching in ("joint", "interleaved") else [[k] for k in order]
            remaining = Counter(holder(k) for k in order)  # per holder, devices still to step this exchange
            order = []
            for group in groups:
                waited = time.perf_counter()
                if any(k not in arrived for k in group):
                    # Send what is ready in one push before waiting: a push costs the
                    # transport far more than the requests in it. Requests that share a
                    # message (``holder``: a node serving several devices) wait for the
                    # rest of it: a node answers one message at a time, so a part sent now
                    # would hold the others back by a whole extra exchange.
                    send({k: r for k, r in ready.items() if not remaining[holder(k)]})
                    ready = {k: r for k, r in ready.items() if remaining[holder(k)]}
                while any(k not in arrived for k in group):
                    arrived.update(transport.receive())
                stats.transport_s += time.perf_counter() - waited
                computed = time.perf_counter()
                chunks, teacher, asked = {}, {}, {}
                for key in group:
                    reply, request = arrived.pop(key), sent.pop(key)
                    if isinstance(reply, str):
                        drop(key, "failed", reply, request)
                        continue
                    stats.bytes_up += payload_bytes(reply)
                    stats.traffic[key].bytes_up += payload_bytes(reply)
                    try:
                        if request.get("final"):
                            finals[key] = (self.check_final(reply, server_round, seen[key]), seen[key])
                            stats.bytes_up_weights += sum(a.nbytes for k, a in reply.items() if k.startswith(WEIGHTS))
                            continue
                        self.check_chunk(reply, server_round)
                        teacher[key] = self.teacher_logits(key, reply)
                    except PayloadError as err:
                        drop(key, "invalid", str(err), request)
                        continue
                    if any(k.startswith(TEACHER) for k in request):
                        self.has_teacher.add(holder(key))
                    stats.bytes_up_activations += reply["activations"].nbytes
                    stats.bytes_up_labels += reply["labels"].nbytes
                    stats.bytes_up_teacher += reply["teacher-input"].nbytes if "teacher-input" in reply else 0
                    chunks[key], asked[key] = reply, request
                if chunks:
                    grads, loss_sum, diverged = self.train_chunks(chunks, teacher)
                    stats.loss_sum += loss_sum
                    for key in diverged:
                        drop(key, "invalid", "non-finite loss on the server", asked[key])
                    follow = {key: {"kind": BACKWARD_KIND, "round": server_round, "grads": grads[key],
                                    "cursor": cursor[key],
                                    "final": reply["remaining"] == 0}
                              for key, reply in chunks.items() if key not in diverged}
                    cursor.update({key: len(chunks[key]["batch-sizes"]) for key in follow})
                    for key in follow:
                        seen[key] += len(chunks[key]["labels"])
                        stats.traffic[key].samples += len(chunks[key]["labels"])
                        if "teacher-input" in chunks[key]:
                            stats.traffic[key].teacher_samples += len(chunks[key]["teacher-input"])
                    stats.samples += sum(len(chunks[key]["labels"]) for key in follow)
                    ready.update(follow)
                    order += list(follow)
                remaining.subtract(holder(k) for k in group)
                stats.server_s += time.perf_counter() - computed
            send(ready)
            ready = {}
        return stats, finals

    def first_requests(self, keys: list[Hashable], server_round: int,
                       holder: Callable[[Hashable], Hashable] | None = None) -> dict[Hashable, Payload]:
        """The global device part (and the teacher embedding, once per device) for each key.

        ``holder`` names who keeps a device's teacher embedding (a node serving several
        devices in one message keeps one copy): only the first device of each holder
        that lacks it (not in ``has_teacher``) carries it.
        """
        global_weights = pack(WEIGHTS, state_to_numpy(self.device_part))
        requests, given = {}, set()
        for key in keys:
            requests[key] = {"kind": FORWARD_KIND, "round": server_round, "cut": self.cut, **global_weights}
            where = holder(key) if holder else key
            if self.mode != "none" and where not in self.has_teacher and where not in given:
                requests[key].update(pack(TEACHER, self.teacher_weights))
                given.add(where)
        return requests

    def aggregate(self, finals: list[tuple[dict[str, np.ndarray], int]]) -> None:
        """Replace the device part by the example-weighted average of the returned ones."""
        if finals:
            load_numpy_state(self.device_part, average([w for w, _ in finals], [n for _, n in finals]))

    def evaluate_replies(self, replies: dict[Hashable, Payload | str], server_round: int
                         ) -> tuple[float, float, int, int]:
        """Accuracy, loss and sample count of the whole student on the devices' validation
        activations, and how many devices dropped out of the evaluation."""
        correct, loss, n, dropped = 0, 0.0, 0, 0
        for key, reply in replies.items():
            try:
                if isinstance(reply, str):
                    raise PayloadError(reply)
                require_keys(reply, {"round", "activations", "labels"})
                acts = require_array(reply, "activations", np.float32, (None, *self.act_shape), finite=True)
                labels = require_labels(reply, "labels", len(acts), self.num_classes, self.label_shape)
            except PayloadError as err:
                log.warning("round %d: evaluation reply of device %s dropped: %s", server_round, key, err)
                dropped += 1
                continue
            acc, mean_loss = evaluate(self.edge.part, acts, labels)
            correct += round(acc * labels.size)  # per label: per token for sequence labels
            loss += mean_loss * labels.size
            n += labels.size
        return (correct / n, loss / n, n, dropped) if n else (float("nan"), float("nan"), 0, dropped)


def price_round(costs: CostModel | None, stats: RoundStats, finals: dict[Hashable, tuple[dict[str, np.ndarray], int]],
                flops: SplitFlops | dict[Hashable, SplitFlops]) -> None:
    """Price a trained round into ``stats`` (``costs``: None prices nothing), dropping from
    ``finals`` the stragglers the deadline keeps out of the average, and count who completed."""
    if costs is not None:
        for key in costs.stragglers(stats.traffic, flops) & set(finals):
            del finals[key]
            stats.dropped["straggler"] += 1
        stats.costs, stats.device_costs = costs.account(stats.traffic, flops)
    stats.completed = len(finals)
    stats.completed_keys = list(finals)


def average(weights: list[dict[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    """Example-weighted average of device parts (FedAvg)."""
    total = float(sum(counts))
    return {k: sum(w[k].astype(np.float64) * (n / total) for w, n in zip(weights, counts)).astype(weights[0][k].dtype)
            for k in weights[0]}
