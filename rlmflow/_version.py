"""The package version (one place: the journal records it, the CLI prints it)."""

__version__ = "0.1.0"
