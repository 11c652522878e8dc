"""An embedded GGUF model run by llama-cpp-python, in-process and offline."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .._exceptions import ConfigurationError, ContextOverflowError, FatalModelError
from .base import ModelRequest, ModelResponse, Usage
from .llama_choices import Aborted, score_choices
from .weights import KNOWN_WEIGHTS, ensure_weights

__all__ = ["LocalModel"]

# Chat-template tokens around each message (Qwen's <|im_start|>role\n ... <|im_end|>\n).
_TEMPLATE_TOKENS_PER_MESSAGE = 6


class _Aborted(Exception):
    """Raised inside llama.cpp's sampling loop to stop a generation whose caller was cancelled."""


class LocalModel:
    """A local GGUF model. ``LocalModel("qwen2.5-coder-0.5b")`` uses the embedded default weights.

    Generation runs in a worker thread, never on the event loop. One native model instance is
    shared by every caller; calls are serialised by a lock because a llama.cpp context is not
    re-entrant (the Dispatcher's lane for local models also runs one call at a time, so callers
    queue there, visibly, rather than here). Cancelling a call stops generation at the next token.

    Loading is lazy (first request) and blocking work happens off the loop. Raises
    :class:`ConfigurationError` if ``llama-cpp-python`` or the weights are not installed.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "qwen2.5-coder-0.5b",
        *,
        context_window: int = 8192,
        threads: int | None = None,
        seed: int = 0,
    ) -> None:
        self._source = str(model)
        self._alias = self._source if self._source in KNOWN_WEIGHTS else Path(self._source).stem
        self._context_window = context_window
        self._threads = threads or max(1, os.cpu_count() or 1)
        self._seed = seed
        self._llama: Any = None
        self._load_lock = anyio.Lock()
        self._generate_lock = threading.Lock()

    @property
    def provider(self) -> str:
        return "llama.cpp"

    @property
    def name(self) -> str:
        return self._alias

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def scores_choices(self) -> bool:
        """A request with ``choices`` is answered with each choice's probability (:class:`ModelRequest`)."""
        return True

    def _load_blocking(self) -> Any:
        try:
            import llama_cpp
        except ImportError as exc:
            raise ConfigurationError(
                "local models need llama-cpp-python: install the 'local' extra "
                "(see README: the build needs CMAKE_ARGS for portable CPU code)"
            ) from exc
        if self._source in KNOWN_WEIGHTS:
            path = ensure_weights(self._source)
        else:
            path = Path(self._source)
            if not path.is_file():
                raise ConfigurationError(
                    f"no GGUF file at {path}; known embedded models: {', '.join(KNOWN_WEIGHTS)}"
                )
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=self._context_window,
            n_threads=self._threads,
            n_batch=512,
            seed=self._seed,
            verbose=False,
        )

    async def load(self) -> None:
        """Load the weights now (otherwise the first request does)."""
        async with self._load_lock:
            if self._llama is None:
                self._llama = await anyio.to_thread.run_sync(self._load_blocking)

    def count_tokens(self, text: str) -> int:
        if self._llama is None:
            return max(1, (len(text) + 3) // 4)
        return len(self._llama.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False))

    def _generate_blocking(self, request: ModelRequest, abort: threading.Event) -> ModelResponse:
        def stop_if_aborted(input_ids: Any, scores: Any) -> Any:
            # llama.cpp calls this through a C callback, which swallows exceptions: to stop a
            # cancelled generation, leave the end-of-sequence token as the only choice.
            if abort.is_set():
                scores[:] = -math.inf
                scores[eos] = 0.0
            return scores

        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        with self._generate_lock:
            if abort.is_set():
                raise _Aborted
            llama = self._llama
            if llama is None:
                raise FatalModelError(f"local:{self._alias} was closed", provider=self.provider, model=self._alias)
            eos = llama.token_eos()
            prompt_tokens = sum(self.count_tokens(m.content) + _TEMPLATE_TOKENS_PER_MESSAGE for m in request.messages)
            if prompt_tokens + request.max_tokens > self._context_window:
                raise ContextOverflowError(
                    f"prompt of ~{prompt_tokens} tokens plus max_tokens={request.max_tokens} exceeds the "
                    f"context window of {self._context_window} tokens of local:{self._alias}; "
                    "send a shorter chunk",
                    prompt_tokens=prompt_tokens,
                    context_window=self._context_window,
                    provider=self.provider,
                    model=self._alias,
                )
            if request.choices:
                return self._score_blocking(llama, request, abort)
            try:
                out = llama.create_chat_completion(
                    messages=messages,
                    max_tokens=request.max_tokens,
                    temperature=0.0 if request.temperature is None else request.temperature,
                    **({} if request.top_p is None else {"top_p": request.top_p}),
                    stop=list(request.stop) or None,
                    seed=self._seed,
                    # llama-cpp-python turns the schema into a GBNF grammar: the reply is always one valid object
                    **({} if request.json_schema is None else {
                        "response_format": {"type": "json_object", "schema": dict(request.json_schema)}}),
                    logits_processor=[stop_if_aborted],
                )
            except ValueError as exc:  # llama.cpp reports window overflow as ValueError
                raise ContextOverflowError(
                    str(exc), provider=self.provider, model=self._alias, context_window=self._context_window
                ) from exc
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return ModelResponse(
            text=choice["message"].get("content") or "",
            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), 1),
            model=self._alias,
            finish_reason=choice.get("finish_reason"),
        )

    def _score_blocking(self, llama: Any, request: ModelRequest, abort: threading.Event) -> ModelResponse:
        try:
            scored = score_choices(llama, request.messages, request.choices, abort, window=self._context_window)
        except Aborted as exc:
            raise _Aborted from exc
        except ValueError as exc:
            raise ContextOverflowError(
                str(exc), provider=self.provider, model=self._alias, context_window=self._context_window
            ) from exc
        text = json.dumps({choice: round(p, 4) for choice, p in scored.probabilities.items()}, ensure_ascii=False)
        return ModelResponse(text=text, usage=Usage(scored.prompt_tokens, scored.choice_tokens, 1),
                             model=self._alias, finish_reason="stop")

    async def request(self, request: ModelRequest) -> ModelResponse:
        await self.load()
        abort = threading.Event()
        try:
            return await anyio.to_thread.run_sync(self._generate_blocking, request, abort, abandon_on_cancel=True)
        except _Aborted as exc:  # pragma: no cover - only reached if aborted without cancellation
            raise FatalModelError("generation aborted", provider=self.provider, model=self._alias) from exc
        except BaseException:
            abort.set()  # the abandoned thread stops at its next sampled token
            raise

    async def aclose(self) -> None:
        """Free the weights, once any generation still running (a cancelled call's thread stops at
        its next token) has let go of them: freeing under a running generation crashes llama.cpp."""
        llama = self._llama
        if llama is None:
            return

        def close() -> None:
            with self._generate_lock:
                self._llama = None
                llama.close()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close)

    def __repr__(self) -> str:
        state = "loaded" if self._llama is not None else "not loaded"
        return f"LocalModel({self._alias!r}, context_window={self._context_window}, {state})"
