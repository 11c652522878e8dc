"""Library-safe structured logging: structlog over the standard logger ``rlmflow``.

rlmflow never configures logging. Records go to ``logging.getLogger("rlmflow")`` (which has a
``NullHandler``, so nothing is printed unless the application adds a handler), rendered with
``render_to_log_kwargs``: the event is the message, every bound key (``run_id``, ``depth``,
``trace_id``, ``span_id`` ...) an attribute of the ``LogRecord``. ``docs/tracing.md`` shows how an
application turns them into JSON lines.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from structlog.contextvars import bound_contextvars, merge_contextvars

__all__ = ["bound_contextvars", "get_logger"]

logging.getLogger("rlmflow").addHandler(logging.NullHandler())


def _add_trace_ids(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def get_logger(name: str = "rlmflow") -> Any:
    """A structlog logger writing to the stdlib logger ``name`` (a child of ``rlmflow``)."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        # filter_by_level first: a record nobody listens to costs one level check, not the chain
        processors=[structlog.stdlib.filter_by_level, merge_contextvars, _add_trace_ids,
                    structlog.stdlib.render_to_log_kwargs],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
