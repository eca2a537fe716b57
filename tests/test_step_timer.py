"""The step timer (artifacts/step_timer.py) the embed stage records its timings with."""

from __future__ import annotations

import pytest

from retformer.artifacts.step_timer import StepTimer


def test_steps_accumulate_in_declared_then_first_use_order():
    """Declared steps come first (0.0 when they never ran), each step's time is summed over its runs,
    and added seconds count like timed ones."""
    timer = StepTimer("load", "never")
    for _ in range(3):
        with timer.step("forward"):
            pass
    timer.add("load", 1.5)
    timer.add("load", 0.5)
    seconds = timer.as_dict()
    assert list(seconds) == ["load", "never", "forward"]
    assert seconds["load"] == 2.0 and seconds["never"] == 0.0
    assert 0.0 <= seconds["forward"] < 1.0


def test_a_step_that_raises_is_still_timed_and_as_dict_is_a_copy():
    """The time of a failing block is recorded; changing the returned dict changes nothing."""
    timer = StepTimer()
    with pytest.raises(ValueError), timer.step("bad"):
        raise ValueError("x")
    copy = timer.as_dict()
    assert "bad" in copy
    copy["bad"] = 99.0
    assert timer.as_dict()["bad"] != 99.0
