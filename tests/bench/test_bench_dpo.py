"""bench/bench_dpo.py's preference set: valid DPO lines, held out from training, the property in one reply only."""

from __future__ import annotations

import json

from bench.bench_dpo import preference_data
from qlora_core.validate import validate_lines


def test_the_preference_set_is_valid_held_out_and_differs_only_in_form() -> None:
    train, held = preference_data(8, 4)
    assert len(train) == 8 and len(held) == 4
    report = validate_lines([json.dumps(r) for r in train + held])
    assert report.ok and report.formats == {"preference": 12}
    questions = [r["input"]["messages"][0]["content"] for r in train + held]
    assert len(set(questions)) == 12  # no held-out question is trained on
    for r in train + held:
        good, bad = r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]
        number = good.removeprefix("ANSWER: ")
        assert good.startswith("ANSWER: ") and bad == f"The answer is {number}."  # same answer, another form
