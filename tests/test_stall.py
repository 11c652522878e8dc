"""The root loop's give-up policy on its own: no model, no sandbox."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rlmflow._run.stall import StallPolicy, Verdict


def test_the_same_error_gives_up_at_the_limit_and_is_counted_before() -> None:
    policy = StallPolicy(max_repeated_errors=3)
    verdicts = [policy.judge([f"x{i}"], "", "KeyError: 'a'", turns_left=9) for i in range(3)]
    assert [v.action for v in verdicts] == ["continue", "continue", "give_up"]
    assert [v.same_error_times for v in verdicts] == [1, 2, 3]


def test_another_error_or_none_resets_the_count() -> None:
    policy = StallPolicy(max_repeated_errors=2)
    assert policy.judge(["a"], "", "KeyError: 'a'", turns_left=9).action == "continue"
    assert policy.judge(["b"], "", "ValueError: b", turns_left=9).same_error_times == 1
    assert policy.judge(["c"], "ok", None, turns_left=9).same_error_times == 0
    assert policy.judge(["d"], "", "ValueError: b", turns_left=9).action == "continue"


def test_a_repeated_cell_restarts_then_forces_the_answer() -> None:
    policy = StallPolicy(max_repeated_errors=9)
    assert policy.judge(["print(1)"], "1", None, turns_left=5) == Verdict("continue")
    assert policy.judge(["print(1)"], "1", None, turns_left=4).action == "restart"
    assert policy.answer_due(3, 10)  # the turn after a restart must answer
    assert policy.judge(["print(1)"], "1", None, turns_left=3).action == "answer_now"


def test_no_restart_on_the_last_turn_and_repeated_code_is_flagged() -> None:
    policy = StallPolicy(max_repeated_errors=9)
    policy.judge(["print(1)"], "1", None, turns_left=1)
    verdict = policy.judge(["print(1)"], "1", None, turns_left=0)
    assert verdict == Verdict("continue", 0, repeated_code=True)
    assert policy.last_output == "1"


def test_repeated_fan_outs_are_left_to_the_budget() -> None:
    policy = StallPolicy(max_repeated_errors=9)
    code = ["answers = llm_query_many(ps)\nprint(answers)"]
    for _ in range(4):
        assert policy.judge(code, "['a']", None, turns_left=5).action == "continue"


def test_an_answer_is_due_on_the_last_turn_only_once_code_ran() -> None:
    policy = StallPolicy(max_repeated_errors=9)
    assert not policy.answer_due(3, 3)  # nothing ran yet: words are no answer
    policy.judge(["print(2)"], "2", None, turns_left=1)
    assert not policy.answer_due(2, 3)
    assert policy.answer_due(3, 3)


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["1", "2"]),
                          st.sampled_from([None, "E: x", "E: y"])), min_size=1, max_size=30))
def test_the_verdict_follows_the_history(turns: list[tuple[str, str, str | None]]) -> None:
    """Each verdict is the one its history calls for (a reference written from the rules)."""
    policy = StallPolicy(max_repeated_errors=3)
    repeats, last_error, stuck, prev = 0, None, 0, None
    for code, printed, error in turns:
        verdict = policy.judge([code], printed, error, turns_left=5)
        repeats = repeats + 1 if error is not None and error == last_error else (1 if error else 0)
        last_error = error
        if repeats >= 3:
            assert verdict.action == "give_up"
            return
        stuck = stuck + 1 if prev == (code, printed) else 0
        expected = "answer_now" if stuck >= 2 else "restart" if stuck == 1 else "continue"
        assert verdict.action == expected
        if expected == "answer_now":
            return
        prev = (code, printed)
