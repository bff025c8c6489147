"""Schedules against transformers.get_scheduler, step by step."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from train.schedule import build_scheduler, warmup_steps_for


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("N, ratio, wsteps", [(100, 0.03, 0), (37, 0.1, 0), (20, 0.0, 5), (7, 0.5, 0)])
def test_equal_to_transformers_get_scheduler(name, N, ratio, wsteps):
    W = warmup_steps_for(N, wsteps, ratio)
    p1 = torch.nn.Parameter(torch.zeros(1))
    p2 = torch.nn.Parameter(torch.zeros(1))
    o1 = torch.optim.SGD([p1], lr=2e-4)
    o2 = torch.optim.SGD([p2], lr=2e-4)
    ours = build_scheduler(name, o1, N, wsteps, ratio)
    ref = transformers.get_scheduler(name, o2, num_warmup_steps=W, num_training_steps=N)
    for step in range(N + 3):
        assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"], (step, o1.param_groups[0]["lr"])
        o1.step(); o2.step(); ours.step(); ref.step()


def test_warmup_steps_like_training_arguments():
    assert warmup_steps_for(100, 0, 0.03) == 3
    assert warmup_steps_for(10, 0, 0.03) == 1          # ceil
    assert warmup_steps_for(100, 7, 0.03) == 7         # warmup_steps wins
    # transformers 5 folds warmup_ratio into a fractional warmup_steps; the count is the same
    for n in (10, 100, 333):
        args = transformers.TrainingArguments(output_dir="/tmp/x", warmup_steps=0.03, report_to=[])
        assert args.get_warmup_steps(n) == warmup_steps_for(n, 0, 0.03)


def test_unknown_schedule():
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="unknown lr_scheduler_type 'step'"):
        build_scheduler("step", o, 10)
