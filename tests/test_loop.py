"""The run loop's policy, shared by both runners: log steps, checkpoint steps and the final save, the pace."""

import time

import pytest

from vgim_dist.config import load_config
from vgim_dist.train.loop import LoopPolicy


def drive(steps: int, every: int, start: int = 0, log_every: int = 3) -> tuple[list[int], list[int]]:
    """Run the policy the way both runners do, from ``start`` to ``steps``: the logged and the saved steps."""
    cfg = load_config("configs/smoke.yaml", [f"run.steps={steps}", f"checkpoint.every={every}",
                                             f"run.log_every={log_every}"])
    saved: list[int] = []
    policy = LoopPolicy(cfg, start, saved.append)
    logged, step = [], start
    while step < steps:
        step += 1
        policy.tick()
        if policy.should_log(step):
            logged.append(step)
        policy.checkpoint(step)
    policy.checkpoint(step, last_step=True)
    return logged, saved


@pytest.mark.parametrize(("steps", "every", "start", "logged", "saved"), [
    (8, 3, 0, [3, 6, 8], [3, 6, 8]),        # the last step is saved once the loop ends
    (6, 3, 0, [3, 6], [3, 6]),              # ... but not twice when it was a checkpoint step
    (8, 0, 0, [3, 6, 8], [8]),              # no periodic checkpoints: only the final one
    (8, 3, 5, [6, 8], [6, 8]),              # resumed at 5
    (8, 3, 8, [], []),                      # resumed at the end: nothing to do, nothing rewritten
])
def test_log_and_checkpoint_steps(steps, every, start, logged, saved):
    assert drive(steps, every, start) == (logged, saved)


def test_a_run_without_steps_still_saves_step_0():
    cfg = load_config("configs/smoke.yaml", ["run.steps=4"])
    saved: list[int] = []
    LoopPolicy(cfg, 0, saved.append).checkpoint(0, last_step=True)
    assert saved == [0]


def test_pace_covers_the_steps_since_the_last_log():
    cfg = load_config("configs/smoke.yaml", ["data.batch_size=4"])
    policy = LoopPolicy(cfg, 0, lambda step: None)
    for _ in range(2):
        policy.tick()
    time.sleep(0.05)
    pace = policy.pace()
    assert pace.steps == 2 and pace.elapsed_s >= 0.05
    m = pace.metrics()
    assert m["step_time_s"] == pytest.approx(pace.elapsed_s / 2)
    assert m["windows_per_s"] == pytest.approx(2 * 4 / pace.elapsed_s)
    policy.tick()
    assert policy.pace().steps == 1                 # the next window starts where the last one ended
