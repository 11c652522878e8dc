"""A sandbox named by a string, as the command line's ``--sandbox`` takes it.

``local`` (the default) or ``agentcore[:IDENTIFIER][@REGION]`` (the grammar is
:mod:`rlmflow._sandbox_string`'s); the AgentCore backend (and so botocore) is imported only when
one is built. ``run``, ``eval`` and ``batch`` share these, and take the same choice from a policy
file's ``[sandbox]`` table (:func:`chosen_sandbox` says which wins).
"""

from __future__ import annotations

import argparse

from .._sandbox_string import split_sandbox_string
from .base import Isolation, Sandbox

__all__ = ["add_sandbox_argument", "build_sandbox", "check_sandbox", "chosen_sandbox"]


def check_sandbox(spec: str) -> str:
    """``spec`` if it is a well-formed ``--sandbox`` string (argparse's ``type``)."""
    try:
        split_sandbox_string(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def chosen_sandbox(flag: str | None, policy: str | None) -> str:
    """The sandbox a command runs its root's code in: the ``--sandbox`` flag if given, else the
    policy file's ``[sandbox]`` (:attr:`rlmflow.dispatch.policy.Policy.sandbox`), else ``local``."""
    return flag or policy or "local"


def build_sandbox(spec: str, *, cell_timeout: float = 120.0, isolation: Isolation = "auto") -> Sandbox:
    """The sandbox ``spec`` names (``isolation`` applies to the local one only); see
    :func:`rlmflow.sandbox.agentcore.sandbox_from_string`."""
    if spec == "local":
        from .local import LocalSandbox

        return LocalSandbox(cell_timeout=cell_timeout, isolation=isolation)
    from .agentcore import sandbox_from_string

    return sandbox_from_string(spec, cell_timeout=cell_timeout, isolation=isolation)


def add_sandbox_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--sandbox`` to a subcommand; it stays ``None`` when not given (see :func:`chosen_sandbox`)."""
    parser.add_argument(
        "--sandbox", type=check_sandbox, default=None, metavar="SPEC",
        help="where the root's code runs: local or agentcore[:IDENTIFIER][@REGION], the AgentCore "
        "Code Interpreter (AWS credentials from the usual chain; AWS_ENDPOINT_URL_BEDROCK_AGENTCORE "
        "overrides its endpoint; docs/agentcore.md); default: the policy file's [sandbox], else local",
    )
