"""Helpers for users' test suites.

:func:`allow_only_loopback` (in :mod:`rlmflow.testing.network`) refuses, before sending, every
model request to a host off the loopback interface. rlmflow's own fake provider servers are test
doubles of the project (``tests/fakes/`` in the repository), not part of this API.
"""

from .network import allow_only_loopback

__all__ = ["allow_only_loopback"]
