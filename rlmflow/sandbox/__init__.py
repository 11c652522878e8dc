"""Where model-written code runs: the protocol, the local worker and its isolation."""
