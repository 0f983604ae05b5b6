"""Federated distillation's core math on hand cases."""

import numpy as np
import torch

from fedsplitkd.training.local import class_logits, class_targets, merge_class_logits


def test_class_logits_are_per_class_means():
    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = np.array([[1, 0], [3, 0], [0, 2]], dtype=np.float32)
    y = np.array([0, 0, 2])
    logits, counts = class_logits(model, x, y, 3)
    np.testing.assert_allclose(logits[0], [2.0, 0.0, 2.0])   # mean of (1,0,1) and (3,0,3)
    np.testing.assert_allclose(logits[2], [0.0, 2.0, 2.0])
    np.testing.assert_allclose(logits[1], [0.0, 0.0, 0.0])   # no samples of class 1
    assert counts.tolist() == [2, 0, 1]


def test_merge_weights_each_class_by_its_counts():
    a = (np.array([[1.0, 1.0], [0.0, 0.0]], np.float32), np.array([1, 0]))
    b = (np.array([[4.0, 0.0], [2.0, 2.0]], np.float32), np.array([3, 2]))
    logits, counts = merge_class_logits([a, b])
    np.testing.assert_allclose(logits, [[3.25, 0.25], [2.0, 2.0]])
    assert counts.tolist() == [4, 2]


def test_class_targets_mask_unseen_classes():
    targets = class_targets(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.array([5, 0]))
    out = targets(np.arange(3), torch.zeros(3, 7), torch.tensor([0, 1, 0]))
    np.testing.assert_allclose(out[0].numpy(), [1.0, 2.0])
    assert torch.isnan(out[1]).all() and not torch.isnan(out[2]).any()
