"""FedGKT's pieces: the server's training on features and the upload checks."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd.baselines.fedgkt import upload_of
from fedsplitkd.config import resolve
from fedsplitkd.training.gkt import device_head, server_optimizer, train_server
from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.models.zoo import build_student
from fedsplitkd.protocol.payload import PayloadError


def test_server_training_fits_the_devices_logits():
    torch.manual_seed(0)
    cfg = resolve({"learning-rate": 0.05, "server-epochs": 5})
    student = build_student("cnn2d", (1, 8, 8), 10)
    upper = student.server_part("conv1")
    features = np.random.default_rng(0).normal(size=(128, 16, 8, 8)).astype(np.float32)
    labels = np.arange(128) % 10
    logits = np.eye(10, dtype=np.float32)[labels] * 5

    def loss():
        with torch.no_grad():
            return float(kd_loss(upper(torch.from_numpy(features)), torch.from_numpy(logits),
                                 torch.from_numpy(labels), 0.5, 3.0))

    def agreement():
        with torch.no_grad():
            return (upper(torch.from_numpy(features)).argmax(-1).numpy() == logits.argmax(-1)).mean()

    before, agree_before = loss(), agreement()
    train_server(upper, server_optimizer(upper, cfg), features, logits, labels, cfg, server_round=1)
    assert loss() < 0.7 * before  # the soft term keeps a floor: the teacher's entropy at T = 3
    assert agree_before < 0.3 and agreement() > 0.9  # it took on the devices' knowledge
    assert device_head((16, 8, 8), 10)(torch.zeros(2, 16, 8, 8)).shape == (2, 10)


@pytest.fixture
def identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def reply(**arrays):
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})}), dst_node_id=1,
                   message_type="train.fedgkt")


def test_uploads_are_checked(identity):
    good = dict(features=np.zeros((4, 16, 8, 8), np.float32), logits=np.zeros((4, 10), np.float32),
                labels=np.arange(4))
    assert [a.shape for a in upload_of(reply(**good), (16, 8, 8), 10)] == [(4, 16, 8, 8), (4, 10), (4,)]
    bad = [{**good, "features": np.full((4, 16, 8, 8), np.nan, np.float32)},
           {**good, "logits": np.zeros((3, 10), np.float32)},
           {**good, "labels": np.array([0, 1, 2, 10])},
           {k: v for k, v in good.items() if k != "labels"}]
    for arrays in bad:
        with pytest.raises(PayloadError):
            upload_of(reply(**arrays), (16, 8, 8), 10)
