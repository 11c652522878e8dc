from __future__ import annotations

import pickle

import rlmflow
from rlmflow import BatchError, BudgetExceededError, ThrottledError


def test_all_names_exist_and_public_classes_are_exported() -> None:
    for name in rlmflow.__all__:
        assert hasattr(rlmflow, name), name
    exported = {getattr(rlmflow, name) for name in rlmflow.__all__}
    errors = [obj for obj in vars(rlmflow._exceptions).values()
              if isinstance(obj, type) and issubclass(obj, rlmflow.RLMError)]
    assert set(errors) <= exported


def test_errors_survive_pickling_with_their_fields() -> None:
    batch = BatchError("2 failed", results=["a", None], errors={1: ThrottledError("slow", retry_after=2.0)})
    clone = pickle.loads(pickle.dumps(batch))
    assert clone.results == ["a", None] and clone.failed_indices == [1]
    assert clone.errors[1].retry_after == 2.0
    budget = pickle.loads(pickle.dumps(BudgetExceededError("over", limit="max_calls", spent={"calls": 3})))
    assert budget.limit == "max_calls" and budget.spent == {"calls": 3}


def test_run_sync_answers_outside_an_event_loop() -> None:
    root = rlmflow.ScriptedModel(["```repl\nFINAL(context.upper())\n```"])
    result = rlmflow.run_sync("abc", "shout it", root=root)
    assert result.answer == "ABC" and result.turns == 1
