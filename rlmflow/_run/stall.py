"""When a root model is going nowhere: the give-up policy of the code-block loop, with no I/O.

Small root models loop: they re-run the same cell, or hit the same error turn after turn. After
each turn whose cells ran, :meth:`StallPolicy.judge` says what the loop does next, from the code,
what it printed and the error it raised; it remembers what it needs across turns and nothing
else, so it is tested without a model or a sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["StallPolicy", "Verdict"]

Action = Literal["continue", "restart", "answer_now", "give_up"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the loop does after a turn.

    - ``continue``: show the output and go on;
    - ``restart``: the cell repeated the previous one with the same output once: start again
      from the question with what it printed, and ask for the answer;
    - ``answer_now``: it repeated twice: ask for the answer in words from what it printed;
    - ``give_up``: the same error ``same_error_times`` turns in a row.

    ``same_error_times`` (2 or more: tell the root) and ``repeated_code`` (the code was the
    previous turn's) qualify ``continue``.
    """

    action: Action
    same_error_times: int = 0
    repeated_code: bool = False


class StallPolicy:
    """Counts repeated errors and repeated cells across one run's turns."""

    def __init__(self, *, max_repeated_errors: int) -> None:
        self._max_repeated_errors = max_repeated_errors
        self._last_error: str | None = None
        self._repeats = 0  # turns in a row that ended with ``_last_error``
        self._previous_code: list[str] = []
        self._previous_text: str | None = None
        self._stuck = 0  # turns in a row whose cell repeated the previous one with the same result
        self._forced = False  # this turn must answer: the last one, or the one after a repeated cell

    @property
    def last_output(self) -> str | None:
        """What the cells of the last judged turn printed (``None`` before any)."""
        return self._previous_text

    def answer_due(self, turn: int, max_turns: int) -> bool:
        """Whether this turn must answer, so that a reply in plain words is taken as the answer.

        True on the last turn once some cell has run, and on the turn after a restart.
        """
        self._forced = self._forced or (turn == max_turns and self._previous_text is not None)
        return self._forced

    def judge(self, code: list[str], printed: str, error: str | None, *, turns_left: int) -> Verdict:
        """The verdict on a turn that ran ``code``, printed ``printed`` and failed with ``error``."""
        if error is not None and error == self._last_error:
            self._repeats += 1
        else:
            self._repeats = 1 if error else 0
        self._last_error = error
        if self._repeats >= self._max_repeated_errors:
            return Verdict("give_up", self._repeats)
        # the same code with the same output and no sub-call: a search the root keeps re-running
        # (repeated fan-outs are left to the budget and the error rule)
        fans_out = any("llm_query" in block or "rlm_query" in block for block in code)
        same = self._previous_code == code and self._previous_text == printed and not fans_out
        self._stuck = self._stuck + 1 if same else 0
        if self._stuck >= 2:
            return Verdict("answer_now", self._repeats)
        if self._stuck == 1 and turns_left > 0:
            self._previous_code, self._previous_text, self._forced = code, printed, True
            return Verdict("restart", self._repeats)
        self._forced = False
        repeated_code = self._previous_code == code
        self._previous_code, self._previous_text = code, printed
        return Verdict("continue", self._repeats, repeated_code)
