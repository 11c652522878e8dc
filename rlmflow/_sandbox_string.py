"""How a sandbox is named: ``local`` or ``agentcore[:IDENTIFIER][@REGION]``.

One grammar for the command line's ``--sandbox`` (:mod:`rlmflow.sandbox.choice`) and the policy
file's ``[sandbox]`` table (:mod:`rlmflow.dispatch.policy`), so that the Dispatcher's package need
not import the sandbox's (nor botocore) to check a policy file. A leaf: plain strings in,
``ValueError`` out, which each caller words as its own error.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_IDENTIFIER", "KINDS", "SANDBOX_FORMS", "check_identifier", "check_region", "join_sandbox_string",
           "split_sandbox_string"]

#: The AWS-managed code interpreter, the one ``agentcore`` names without ``:IDENTIFIER``.
DEFAULT_IDENTIFIER = "aws.codeinterpreter.v1"
KINDS = ("local", "agentcore")
SANDBOX_FORMS = "local, agentcore, agentcore:IDENTIFIER, agentcore@REGION or agentcore:IDENTIFIER@REGION"
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REGION = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-\d")


def check_identifier(identifier: str) -> None:
    """``ValueError`` unless ``identifier`` can be a code interpreter's id."""
    if not _IDENTIFIER.fullmatch(identifier):
        raise ValueError(f"{identifier!r} is not a code interpreter's id (1 to 100 letters, digits, '.', '_', '-', "
                         "starting with a letter or digit)")


def check_region(region: str) -> None:
    """``ValueError`` unless ``region`` is shaped as an AWS region."""
    if not _REGION.fullmatch(region):
        raise ValueError(f"{region!r} is not an AWS region (us-east-1)")


def split_sandbox_string(spec: str) -> tuple[str, str | None, str | None]:
    """(kind, identifier, region) of a ``--sandbox`` string; ``ValueError`` if it is malformed."""
    if spec == "local":
        return "local", None, None
    head, at, region = spec.partition("@")  # an identifier holds no '@'
    kind, colon, identifier = head.partition(":")
    if kind != "agentcore":
        raise ValueError(f"unknown sandbox {spec!r}: use one of {SANDBOX_FORMS}")
    try:
        if colon:
            check_identifier(identifier)
        if at:
            check_region(region)
    except ValueError as exc:
        raise ValueError(f"malformed sandbox {spec!r}: {exc}; use one of {SANDBOX_FORMS}") from None
    return "agentcore", identifier or None, region or None


def join_sandbox_string(kind: str, identifier: str | None = None, region: str | None = None) -> str:
    """The ``--sandbox`` string of checked parts (the inverse of :func:`split_sandbox_string`)."""
    return kind + (f":{identifier}" if identifier else "") + (f"@{region}" if region else "")
