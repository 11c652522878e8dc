"""The fan-out engine: lanes, limits, budgets and pricing for every model call."""
