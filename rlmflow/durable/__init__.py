"""Durable runs: the journal that survives a crash, and what is answered from it."""
