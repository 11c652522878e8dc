"""What the root model reads: the system prompt, the context's metadata, and cell feedback."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ._text import safe_text, sanitize_text
from .sandbox.base import CellResult, Context

__all__ = [
    "FORCED_ANSWER_SYSTEM",
    "LAST_TURN",
    "NO_CODE_NUDGE",
    "REPEAT_NUDGE",
    "START_WITH_CODE",
    "START_WITH_TOOL",
    "STUCK",
    "SYSTEM_PROMPT",
    "budget_spent_message",
    "continue_message",
    "describe_context",
    "extract_code_blocks",
    "fenced",
    "format_cell_feedback",
    "opening_messages",
    "plain_answer",
    "same_error_note",
    "stuck_message",
]

SYSTEM_PROMPT = """\
You answer a question about a document that is too long to read. The document is NOT shown to
you. It is stored in the variable `context` inside a Python sandbox, and you work on it by writing
Python code in a ```repl block. After each reply the code runs and you see what it printed.

Available in the sandbox (variables persist between your replies):
- `context`: the document ({context_kind}).
- `llm_query(prompt) -> str`: ask a helper language model about a piece of text (about
  {chunk_hint:,} characters at most per prompt).
- `llm_query_many(prompts) -> list[str]`: ask many prompts at once, in parallel; answers come back
  in the same order. Much faster than calling llm_query in a loop.
  `llm_query_many(questions, prefix=text)`: when every prompt starts with the same long text (one
  piece asked many questions, or one long instruction), pass that text once as `prefix`: it goes
  before each prompt and is cached, so it is paid for about once.
- `rlm_query(prompt, context=None) -> str`: give a sub-task to a helper that works like you, with
  its own sandbox (use it for big sub-documents).
- `grep(pattern, window=300)`: where `pattern` (words or a regex) occurs in `context`: a list of
  snippets, each the match with `window` characters around it. `print(grep("word"))` shows them.
- `chunks({chunk_hint})`: `context` cut into pieces of about {chunk_hint:,} characters (a list of
  str), to ask llm_query_many about every piece when the answer needs the whole document.
- `FINAL(answer)`: submit the final answer. Call it once you know the answer.
- `budget() -> dict`: what calls, tokens, turns and time you have left.
- `re`, `json`, `collections` and the rest of the standard library can be imported.

How to work:
1. Look first: search with grep for words from the question and print what it finds.
2. If the snippets show the answer, call FINAL with it. Otherwise ask the helper about each
   snippet with llm_query_many (or about every piece of chunks(...) when the answer needs the
   whole document, e.g. counting or adding up), keep the answers, and combine them in Python.
3. Call FINAL(answer) with the answer. Do not guess: the answer must come from the document.

Example:
```repl
print(grep("treasure"))
```
Then, in a later reply:
```repl
answers = llm_query_many([f"{{s}}\\n\\nQuestion: Where is the treasure? Answer briefly." for s in grep("treasure")])
print(answers)
```
And when the answer is clear:
```repl
FINAL(answers[0])
```

Write one ```repl block per reply, keep it short, and print what you need to see.
Printed output is cut to {output_cap:,} characters, so print summaries, not whole texts.
"""

START_WITH_CODE = "Start by looking at `context` with code in a ```repl block."
START_WITH_TOOL = "Start by looking at `context` with the execute_python tool."


def opening_messages(
    system_template: str,
    context: Context,
    query: str,
    *,
    start: str,
    sub_max_tokens: int,
    output_cap: int,
    aliases: Sequence[str],
) -> tuple[str, str]:
    """The system prompt and the first user message of a run; ``start`` says how to run code."""
    system = system_template.format(
        context_kind=context_kind(context), chunk_hint=4 * sub_max_tokens * 4, output_cap=output_cap
    )
    if len(aliases) > 1:
        system += f"\nHelper models you can name with llm_query(..., model=NAME): {', '.join(sorted(aliases))}.\n"
    return system, f"{describe_context(context)}\n\nQuestion: {query}\n\n{start}"


NO_CODE_NUDGE = (
    "Your reply had no ```repl code block, so nothing ran. Write Python in a ```repl block to "
    "inspect `context`, or call FINAL(answer) in a ```repl block if you know the answer."
)

REPEAT_NUDGE = (
    "You ran exactly the same code as in your previous turn and got the same result. Do not repeat "
    "it. If the output above answers the question, call FINAL(answer) now; otherwise try something else."
)

LAST_TURN = (
    "This is your last turn. Call FINAL(answer) now in a ```repl block with your best answer from "
    "what you found (you may compute it from variables you already have)."
)

STUCK = """\
Your code ran twice with the same result:
{code}
It printed:
{output}
Do not run it again. Read the output above: if it answers the question, call FINAL with the answer
in a ```repl block now, e.g. FINAL("..."). If not, do something different.
The question is: {query}"""

CONTINUE = """\
Output of your code (printed by the code, between the fences):
{output}
{notes}The question is still: {query}
Next: {next_step} You have {left} turn(s) left."""

_NEXT_SEARCH = (
    "if the output above shows the answer, call FINAL(answer) now. Otherwise ask llm_query_many about "
    "the snippets grep found (or about every piece of chunks(...)), and call FINAL once the answer is clear."
)
_NEXT_AFTER_SUBCALLS = (
    "the helper model answered above. If its answer answers the question, call FINAL with it now "
    "(for example FINAL(answers[0])); if not, search differently."
)


_BACKTICKS = re.compile(r"`{3,}")


def fenced(text: str, info: str = "text") -> str:
    """``text`` in a code fence it cannot close: longer than any run of backticks inside it.

    Sandbox output (and a document's own fences, through ``grep``) must not end the fence and
    go on in the loop's voice.
    """
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def budget_spent_message(output: str, refusal: str, query: str) -> str:
    """The user message after a turn in which the run's budget refused work: answer now."""
    return (
        f"Output of your code (printed by the code, between the fences):\n{fenced(output)}\n"
        f"The run's budget is spent: {refusal}\nNo more sub-calls can be paid for. Call FINAL(answer) now "
        f"in a ```repl block with the best answer to the question from what you already have.\n"
        f"The question is: {query}"
    )


def same_error_note(times: int) -> str:
    """Said after a turn's output when its cell failed with the same error as the turn before."""
    return f"This is the same error as before ({times} times). Change your approach instead of repeating the code."


def stuck_message(code: list[str], output: str, query: str, *, notes: Sequence[str] = ()) -> str:
    """The fresh user message after a repeated cell: what it printed, and the instruction to answer."""
    message = STUCK.format(code=fenced("\n".join(code), "repl"), output=fenced(output), query=query)
    return "".join(f"{note}\n" for note in notes) + message if notes else message


FORCED_ANSWER_SYSTEM = (
    "You answer a question from the text below, which your earlier code found in a long document. "
    "Reply with the answer only, in words, in one or two sentences. Do not write code. If the text "
    "does not contain the answer, reply with the single word UNKNOWN."
)


def forced_answer_message(printed: str, query: str, *, limit: int) -> str:
    """The last call of a run that never called FINAL: what its last cell printed, and the question."""
    shown = safe_text(printed, limit)
    return f"Text found by your code:\n{fenced(shown)}\n\nQuestion: {query}\nAnswer:"


def plain_answer(reply: str) -> str:
    """A reply's words as an answer (code blocks, emphasis and surrounding quotes removed), or ""."""
    text = re.sub(r"```.*?(?:```|\Z)", "", reply, flags=re.DOTALL).strip()
    text = text.strip("*_`\"' \n")
    return "" if text.upper().rstrip(".") == "UNKNOWN" else text


def continue_message(
    output: str, query: str, turns_left: int, *, asked_helper: bool = False, notes: Sequence[str] = ()
) -> str:
    """The user message after a turn: the output (fenced), the loop's notes, the question again, and the next step.

    Small root models imitate the last thing they read, so the next step is spelled out, and it
    changes once sub-calls have answered (otherwise they re-run the same query forever). The
    output is sandbox text; the notes and everything else are the loop's own words, outside the
    fence.
    """
    next_step = _NEXT_AFTER_SUBCALLS if asked_helper else _NEXT_SEARCH
    return CONTINUE.format(
        output=fenced(output), notes="".join(f"{note}\n" for note in notes), query=query, left=turns_left,
        next_step=next_step,
    )


_FENCE = re.compile(r"```(?:repl|python|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code_blocks(reply: str) -> list[str]:
    """All ```repl / ```python blocks of a reply, in order; an unclosed last block counts."""
    return [block.strip("\n") for block in _FENCE.findall(reply) if block.strip()]


def _preview(text: str, limit: int = 240) -> str:
    """The start of a document on one line, fenced: it is the document's text, not ours."""
    snippet = sanitize_text(text[:limit]).replace("\n", "\\n")
    return fenced(snippet + ("..." if len(text) > limit else ""))


def describe_context(context: Context, *, max_documents: int = 20) -> str:
    """Metadata of the context for the root model: type, sizes, names and a short preview."""
    if isinstance(context, str):
        lines = context.count("\n") + 1
        return (
            f"`context` is a str of {len(context):,} characters ({lines:,} lines).\n"
            f"It begins:\n{_preview(context)}"
        )
    if isinstance(context, Mapping):
        total = sum(len(v) for v in context.values())
        rows = [f"  {name!r}: {len(text):,} characters" for name, text in list(context.items())[:max_documents]]
        more = len(context) - len(rows)
        first = next(iter(context.values()), "")
        return (
            f"`context` is a dict of {len(context)} named documents, {total:,} characters in all "
            f"(context[name] is a str):\n" + "\n".join(rows) + (f"\n  ... and {more} more" if more > 0 else "")
            + f"\nThe first begins:\n{_preview(first)}"
        )
    documents: Sequence[str] = context
    total = sum(len(d) for d in documents)
    rows = [f"  context[{i}]: {len(d):,} characters" for i, d in enumerate(documents[:max_documents])]
    more = len(documents) - len(rows)
    return (
        f"`context` is a list of {len(documents)} documents, {total:,} characters in all:\n"
        + "\n".join(rows) + (f"\n  ... and {more} more" if more > 0 else "")
        + f"\ncontext[0] begins:\n{_preview(documents[0] if documents else '')}"
    )


def context_kind(context: Context) -> str:
    if isinstance(context, str):
        return "a str"
    if isinstance(context, Mapping):
        return "a dict of named str documents"
    return "a list of str documents"


def format_cell_feedback(result: CellResult, *, limit: int) -> str:
    """What the root sees after a cell ran: output (capped), error and sandbox notes.

    Output and errors were written by sandbox code: their control characters are escaped.
    """
    parts: list[str] = []
    if result.output:
        parts.append(safe_text(result.output, limit, total=result.output_chars))
    if result.error:
        parts.append(safe_text(result.error.rstrip(), max(400, limit // 2)))
    parts.extend(result.notes)
    if not parts:
        parts.append("(no output)")
    return "\n".join(parts)
