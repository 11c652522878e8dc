"""Tracing and logging helpers. Attribute names live in :mod:`rlmflow.telemetry.attributes`."""
