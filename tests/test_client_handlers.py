"""The ClientApp handlers called directly with Flower Messages, and the server's reply checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd import config as config_lib
from fedsplitkd.run import experiment
from fedsplitkd.clients.client_app import STATE_PREFIX, evaluate, split_backward, split_forward
from fedsplitkd.clients.records import from_records, to_records
from fedsplitkd.protocol.device import device_setup
from fedsplitkd.protocol.payload import TEACHER, WEIGHTS, PayloadError, unpack
from fedsplitkd.protocol.runtime import state_to_numpy
from fedsplitkd.protocol.rounds import InProcessTransport

from conftest import tiny
from malformed import MUTATIONS

RUN_ID, SERVER_NODE, DEVICE_NODE = 7, 1, 1234
FORWARD, BACKWARD, EVALUATE = "train.split_forward", "train.split_backward", "evaluate"
NODE_CONFIG = {"partition-id": 0, "num-partitions": 4}
OVERRIDES = tiny(exchange_batches=8, batch_size=32, teacher_input="embedding")  # what a bundle of virtual devices uses


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a running app need the task identity (restored afterwards)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SERVER_NODE)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def cfg():
    return config_lib.resolve(OVERRIDES)


@pytest.fixture(scope="module")
def exp(cfg):
    return experiment.build(cfg)


def run_config() -> dict:
    return {**config_lib.DEFAULTS, **OVERRIDES}


def new_context() -> Context:
    return Context(run_id=RUN_ID, node_id=DEVICE_NODE, node_config=dict(NODE_CONFIG), state=RecordDict(),
                   run_config=run_config())


def message(payload: dict, message_type: str) -> Message:
    return Message(to_records(payload), dst_node_id=DEVICE_NODE, message_type=message_type)


def call(handler, payload: dict, context: Context, message_type: str) -> dict:
    msg = message(payload, message_type)
    reply = handler(msg, context)
    assert isinstance(reply, Message)
    assert reply.metadata.message_type == message_type
    assert reply.metadata.dst_node_id == SERVER_NODE and reply.metadata.src_node_id == DEVICE_NODE
    assert reply.metadata.run_id == RUN_ID
    assert reply.has_content() and not reply.has_error()
    return from_records(reply.content)


def act_shape(exp) -> tuple[int, ...]:
    """The cut's activation shape, computed independently of the server."""
    part = exp.student.device_part(exp.cfg["cut"])
    with torch.no_grad():
        return tuple(part(torch.zeros(1, *exp.dataset.input_shape)).shape[1:])


@pytest.fixture(scope="module")
def first_chunk(exp):
    """A valid first forward reply (the payload), from a fresh context."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIdentity, "_run_id", RUN_ID)
        mp.setattr(TaskIdentity, "_node_id", SERVER_NODE)
        mp.setattr(TaskIdentity, "_task_id", 1)
        request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
        return call(split_forward, request, new_context(), FORWARD)


# ---- the handlers ---------------------------------------------------------------------------

def test_first_request_carries_weights_and_teacher(exp):
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    assert request["round"] == 1
    assert set(unpack(WEIGHTS, request)) == set(exp.student.device_part(exp.cfg["cut"]).state_dict())
    assert unpack(TEACHER, request)
    # records round-trip the request unchanged
    back = from_records(to_records(request))
    assert set(back) == set(request)
    for k, v in request.items():
        np.testing.assert_array_equal(back[k], v)


def test_forward_reply_has_cut_activations_and_passes_check(exp, cfg, first_chunk):
    acts = first_chunk["activations"]
    assert acts.dtype == np.float32
    assert acts.shape == (cfg["exchange-batches"] * cfg["batch-size"], *act_shape(exp))
    assert first_chunk["labels"].shape == (len(acts),)
    assert first_chunk["teacher-input"].shape[0] == len(acts)
    assert first_chunk["round"] == 1
    assert first_chunk["batch-sizes"].tolist() == [cfg["batch-size"]] * cfg["exchange-batches"]
    exp.server.check_chunk(first_chunk, 1)  # does not raise


def test_forward_backward_until_final_and_state_persists(exp, cfg):
    context = new_context()
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    global_weights = state_to_numpy(exp.student.device_part(cfg["cut"]))
    reply = call(split_forward, request, context, FORWARD)
    exp.server.check_chunk(reply, 1)

    # the device's state lives in context.state between calls
    assert {STATE_PREFIX + "packed", STATE_PREFIX + "config"} <= set(context.state)
    stored = context.state[STATE_PREFIX + "config"]
    assert stored["round"] == 1 and stored["cursor"] == cfg["exchange-batches"]
    assert stored["in-flight"] == cfg["exchange-batches"]

    setup = device_setup(cfg, NODE_CONFIG["partition-id"], NODE_CONFIG["num-partitions"])
    total, chunks = len(setup.data.y_train), 1
    seen, cursor = len(reply["labels"]), 0
    while True:
        final = reply["remaining"] == 0
        grads = np.zeros_like(reply["activations"])
        cursor, start = cursor + len(reply["batch-sizes"]), cursor
        reply = call(split_backward, {"kind": "backward", "round": 1, "grads": grads, "cursor": start, "final": final}, context,
                     BACKWARD)
        if final:
            break
        exp.server.check_chunk(reply, 1)
        assert context.state[STATE_PREFIX + "config"]["cursor"] > stored["cursor"]
        chunks += 1
        seen += len(reply["labels"])
    assert chunks == -(-total // (cfg["exchange-batches"] * cfg["batch-size"]))
    assert seen == total

    weights = exp.server.check_final(reply, 1)
    assert reply["num-examples"] == total
    # zero gradients with SGD + momentum leave the device part exactly where it started
    assert set(weights) == set(global_weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(v, global_weights[k])
    # after the final reply the round is over: another backward is refused
    with pytest.raises(PayloadError):
        split_backward(message({"kind": "backward", "round": 1, "grads": grads, "cursor": 0, "final": True}, BACKWARD), context)


def test_backward_applies_nonzero_gradients(exp, cfg):
    context = new_context()
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    reply = call(split_forward, request, context, FORWARD)
    grads = np.ones_like(reply["activations"])
    nxt = call(split_backward, {"kind": "backward", "round": 1, "grads": grads, "cursor": 0, "final": False}, context, BACKWARD)
    exp.server.check_chunk(nxt, 1)
    moved = unpack(WEIGHTS, from_records(RecordDict({"packed": context.state[STATE_PREFIX + "packed"]})))
    initial = unpack(WEIGHTS, request)
    assert any(not np.array_equal(moved[k], initial[k]) for k in initial)


def test_backward_without_prior_forward_raises(exp):
    grads = np.zeros((32, *act_shape(exp)), dtype=np.float32)
    with pytest.raises(PayloadError, match="round"):
        split_backward(message({"kind": "backward", "round": 1, "grads": grads, "final": False}, BACKWARD), new_context())


def test_backward_for_another_round_raises(exp, first_chunk):
    context = new_context()
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    reply = call(split_forward, request, context, FORWARD)
    with pytest.raises(PayloadError, match="round"):
        split_backward(message({"kind": "backward", "round": 2, "grads": np.zeros_like(reply["activations"]), "final": False},
                               BACKWARD), context)


@pytest.mark.parametrize("rows", [255, 257, 32])
def test_backward_with_wrong_number_of_rows_raises(exp, rows):
    context = new_context()
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    reply = call(split_forward, request, context, FORWARD)
    assert len(reply["activations"]) != rows
    before = {k: copy.deepcopy(dict(v)) for k, v in context.state.items() if k.endswith("config")}
    grads = np.zeros((rows, *reply["activations"].shape[1:]), dtype=np.float32)
    with pytest.raises(PayloadError, match="grads"):
        split_backward(message({"kind": "backward", "round": 1, "grads": grads, "cursor": 0, "final": False}, BACKWARD), context)
    # the failed call left the stored state alone
    assert {k: dict(v) for k, v in context.state.items() if k.endswith("config")} == before


def test_gradients_for_another_chunk_are_refused_even_when_the_rows_match(exp):
    """A device whose stored state lost an update (it is one chunk behind the server) must
    not apply the next chunk's gradients to the chunk it thinks is in flight."""
    context = new_context()
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    reply = call(split_forward, request, context, FORWARD)
    stale = copy.deepcopy(context)  # the state before the first backward: the update that gets lost
    grads = np.zeros_like(reply["activations"])
    call(split_backward, {"kind": "backward", "round": 1, "grads": grads, "cursor": 0, "final": False}, context, BACKWARD)
    # The next chunk's gradients, with as many rows as the chunk the stale state holds in flight.
    with pytest.raises(PayloadError, match="field 'cursor' = 8, but the chunk in flight starts at batch 0"):
        split_backward(message({"kind": "backward", "round": 1, "grads": grads, "cursor": 8,
                                "final": False}, BACKWARD), stale)


def test_a_request_names_its_kind(exp):
    """The kind is explicit: a request without it, or a forward request without weights, is refused."""
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    assert request["kind"] == "forward"
    with pytest.raises(PayloadError, match="field 'kind' = None"):
        split_forward(message({k: v for k, v in request.items() if k != "kind"}, FORWARD), new_context())
    with pytest.raises(PayloadError, match="'forward' request for round 1 carries no weights"):
        split_forward(message({"kind": "forward", "round": 1}, FORWARD), new_context())


def test_unknown_record_name_raises_from_records():
    records = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"round": 1}),
                          "bogus": ConfigRecord({"x": 1})})
    with pytest.raises(PayloadError, match="bogus"):
        from_records(records)


def test_unknown_record_name_in_a_message_raises_in_the_handler(exp):
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    records = to_records(request)
    records["extra"] = ConfigRecord({"x": 1})
    msg = Message(records, dst_node_id=DEVICE_NODE, message_type=FORWARD)
    context = new_context()
    with pytest.raises(PayloadError, match="extra"):
        split_forward(msg, context)
    assert not any(k.startswith(STATE_PREFIX) for k in context.state)


def test_record_of_wrong_type_raises_from_records():
    with pytest.raises(PayloadError, match="arrays"):
        from_records(RecordDict({"arrays": ConfigRecord({"round": 1})}))


def test_evaluate_handler_returns_validation_activations(exp, cfg):
    request = {"round": 3, **exp.server.first_requests([DEVICE_NODE], 3)[DEVICE_NODE]}
    request = {k: v for k, v in request.items() if not k.startswith(TEACHER)}
    payload = call(evaluate, request, new_context(), EVALUATE)
    setup = device_setup(cfg, NODE_CONFIG["partition-id"], NODE_CONFIG["num-partitions"])
    n_val = len(setup.data.y_val)
    assert n_val > 0
    assert payload["round"] == 3
    assert payload["activations"].shape == (n_val, *act_shape(exp))
    np.testing.assert_array_equal(payload["labels"], setup.data.y_val)
    acc, loss, n, _ = exp.server.evaluate_replies({DEVICE_NODE: payload}, 3)
    assert n == n_val and 0.0 <= acc <= 1.0 and np.isfinite(loss)


def test_handler_without_partition_config_raises(exp):
    context = Context(run_id=RUN_ID, node_id=DEVICE_NODE, node_config={}, state=RecordDict(),
                      run_config=run_config())
    request = exp.server.first_requests([DEVICE_NODE], 1)[DEVICE_NODE]
    with pytest.raises(ValueError, match="partition-id"):
        split_forward(message(request, FORWARD), context)


# ---- server-side rejection of malformed forward replies ---------------------------------------

def test_mutations_change_the_payload(first_chunk):
    assert len(MUTATIONS) >= 10
    for name, (_, mutate) in MUTATIONS.items():
        bad = mutate(first_chunk)
        same = set(bad) == set(first_chunk) and all(
            type(bad[k]) is type(first_chunk[k]) and np.array_equal(bad[k], first_chunk[k])
            and getattr(bad[k], "dtype", None) == getattr(first_chunk[k], "dtype", None) for k in bad)
        assert not same, name


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_check_chunk_rejects_mutated_reply(exp, first_chunk, name):
    field, mutate = MUTATIONS[name]
    exp.server.check_chunk(first_chunk, 1)  # the unmutated reply is fine
    bad = mutate(first_chunk)
    with pytest.raises(PayloadError) as err:
        exp.server.check_chunk(bad, 1)
    assert field in str(err.value), str(err.value)
    # the mutation did not touch the shared valid reply
    exp.server.check_chunk(first_chunk, 1)


def test_check_final_rejects_bad_weights(exp, cfg):
    weights = state_to_numpy(exp.student.device_part(cfg["cut"]))
    good = {"round": 1, "num-examples": 10, **{WEIGHTS + k: v for k, v in weights.items()}}
    exp.server.check_final(good, 1)
    key = WEIGHTS + next(iter(weights))
    cases = {
        "missing weight": ({k: v for k, v in good.items() if k != key}, "weights"),
        "nan weight": ({**good, key: np.full_like(good[key], np.nan)}, key),
        "wrong shape": ({**good, key: good[key][:1]}, key),
        "zero examples": ({**good, "num-examples": 0}, "num-examples"),
        "wrong round": ({**good, "round": 4}, "round"),
        "extra field": ({**good, "activations": np.zeros(1, np.float32)}, "activations"),
    }
    for name, (bad, field) in cases.items():
        with pytest.raises(PayloadError) as err:
            exp.server.check_final(bad, 1)
        assert field in str(err.value), name


# ---- a corrupted reply inside a whole round ----------------------------------------------------

def test_round_drops_a_device_with_a_corrupted_reply(exp, cfg):
    server = copy.deepcopy(exp.server)  # keep the module's experiment untouched
    corrupted = []

    class Corrupting(InProcessTransport):
        def receive(self):
            replies = super().receive()
            if 1 in replies and not corrupted and "activations" in replies[1]:
                reply = dict(replies[1])
                acts = reply["activations"].copy()
                acts[0, 0] = np.nan
                reply["activations"] = acts
                replies[1] = reply
                corrupted.append(reply)
            return replies

    transport = Corrupting({k: device_setup(cfg, k, 4) for k in (0, 1)})

    before = state_to_numpy(server.device_part)
    stats = server.run_round(transport, [0, 1], 1)
    assert corrupted, "the transport never corrupted a reply"
    assert stats.devices == 2
    assert stats.completed == 1
    assert stats.dropped["invalid"] == 1
    assert stats.dropped["failed"] == 0
    assert stats.samples == len(device_setup(cfg, 0, 4).data.y_train)
    assert 1 not in server.has_teacher and 0 in server.has_teacher
    # the surviving device's part was aggregated
    after = state_to_numpy(server.device_part)
    assert any(not np.array_equal(after[k], before[k]) for k in before)


# ---- virtual devices: several devices per message -----------------------------------------

def test_a_bundle_serves_each_virtual_device_apart_and_keeps_the_teacher_once(exp):
    from fedsplitkd.clients.client_app import TEACHER_STATE
    from fedsplitkd.clients.records import from_bundle, to_bundle

    context = Context(run_id=RUN_ID, node_id=DEVICE_NODE, node_config={}, state=RecordDict(),
                      run_config={**run_config(), "virtual-devices": 8})

    def send(handler, requests: dict, message_type: str) -> dict:
        reply = handler(Message(to_bundle(requests), dst_node_id=DEVICE_NODE, message_type=message_type), context)
        assert not reply.has_error()
        return from_bundle(reply.content)

    server = exp.server
    server.has_teacher.clear()
    requests = server.first_requests([2, 5], 1)
    replies = send(split_forward, {**requests, 99: requests[2]}, FORWARD)
    assert set(replies) == {2, 5, 99}
    assert "outside virtual-devices" in replies[99]["error"]  # one bad section fails alone
    for device in (2, 5):
        server.check_chunk(replies[device], 1)
    assert not np.array_equal(replies[2]["labels"], replies[5]["labels"])  # each its own data
    # The teacher's embedding is kept once per node, not per device.
    assert any(k.startswith(TEACHER_STATE) for k in context.state)
    device_state = from_records(RecordDict({"packed": context.state["fedsplitkd.device-2.packed"]}))
    assert device_state and not any(k.startswith(TEACHER) for k in device_state)

    server.has_teacher.add(6)  # the server knows this node holds it: no teacher in the request
    later = server.first_requests([6], 1)
    assert not unpack(TEACHER, later[6])
    assert "teacher-input" in send(split_forward, later, FORWARD)[6]

    # A device's state goes once its round is over.
    finals = send(split_backward, {d: {"kind": "backward", "round": 1, "grads": np.zeros_like(replies[d]["activations"]),
                                      "cursor": 0, "final": True} for d in (2, 5)}, BACKWARD)
    for device in (2, 5):
        server.check_final(finals[device], 1)
        assert not any(k.startswith(f"fedsplitkd.device-{device}.") for k in context.state)
    assert any(k.startswith("fedsplitkd.device-6.") for k in context.state)
    server.has_teacher.clear()
