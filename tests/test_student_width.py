"""`student-width`: a built-in student with more capacity, the same model at width 1."""

import pytest
import torch

from conftest import tiny
from fedsplitkd.config import ConfigError, resolve
from fedsplitkd.models.zoo import build_student
from fedsplitkd.run.experiment import run_inprocess


def test_width_one_is_the_model_as_before_and_width_two_doubles_every_layer():
    torch.manual_seed(0)
    one = build_student("lenet", (3, 32, 32), 10)
    torch.manual_seed(0)
    also_one = build_student("lenet", (3, 32, 32), 10, width=1)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), also_one.state_dict().values()))
    assert sum(p.numel() for p in one.parameters()) == 62_006
    two = build_student("lenet", (3, 32, 32), 10, width=2)
    widths = [m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
              for m in two.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert widths == [12, 32, 240, 168, 10]
    assert two.cut_points == one.cut_points  # the same cut names for the cost model and the config


@pytest.mark.parametrize("family, shape", [("mlp", (12,)), ("cnn1d", (3, 32)), ("cnn2d", (1, 8, 8))])
def test_every_built_in_family_grows_with_the_width(family, shape):
    small, wide = (sum(p.numel() for p in build_student(family, shape, 4, width=w).parameters()) for w in (1, 2))
    assert wide > 2 * small


def test_the_config_checks_the_width_and_the_gpt_student_refuses_it():
    with pytest.raises(ConfigError, match="'student-width'"):
        resolve({"student-width": 0})
    with pytest.raises(ValueError, match="'student-width' = 2: the GPT student's size is 'gpt-student'"):
        build_student("gpt", (16,), 30, width=2)


def test_a_run_with_a_wider_student_learns_and_trains_the_wider_model():
    exp, rows = run_inprocess(tiny(num_rounds=3, student_width=2), 3)
    assert rows[-1]["test_accuracy"] > 0.3
    narrow = build_student("auto", exp.dataset.input_shape, exp.dataset.num_classes)
    head = [m for m in exp.server.edge.part.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.in_features == 2 * [m for m in narrow.modules() if isinstance(m, torch.nn.Linear)][-1].in_features
