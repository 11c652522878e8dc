"""A sandbox named by a string, as the command line's ``--sandbox`` takes it.

``local`` (the default) or ``agentcore[:IDENTIFIER][@REGION]``; the AgentCore backend (and so
botocore) is imported only when it is named. ``run``, ``eval`` and ``batch`` share these.
"""

from __future__ import annotations

import argparse

from .._exceptions import ConfigurationError
from .base import Isolation, Sandbox

__all__ = ["add_sandbox_argument", "build_sandbox", "check_sandbox"]


def check_sandbox(spec: str) -> str:
    """``spec`` if it is a well-formed ``--sandbox`` string (argparse's ``type``)."""
    if spec == "local":
        return spec
    from .agentcore import parse_sandbox_string

    try:
        parse_sandbox_string(spec)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return spec


def build_sandbox(spec: str, *, cell_timeout: float = 120.0, isolation: Isolation = "auto") -> Sandbox:
    """The sandbox ``spec`` names (``isolation`` applies to the local one only); see
    :func:`rlmflow.sandbox.agentcore.sandbox_from_string`."""
    if spec == "local":
        from .local import LocalSandbox

        return LocalSandbox(cell_timeout=cell_timeout, isolation=isolation)
    from .agentcore import sandbox_from_string

    return sandbox_from_string(spec, cell_timeout=cell_timeout, isolation=isolation)


def add_sandbox_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--sandbox`` to a subcommand."""
    parser.add_argument(
        "--sandbox", type=check_sandbox, default="local", metavar="SPEC",
        help="where the root's code runs: local (default) or agentcore[:IDENTIFIER][@REGION], the AgentCore "
        "Code Interpreter (AWS credentials from the usual chain; AWS_ENDPOINT_URL_BEDROCK_AGENTCORE "
        "overrides its endpoint; docs/agentcore.md)",
    )
