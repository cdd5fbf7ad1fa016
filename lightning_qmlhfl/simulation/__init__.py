"""The simulation core, no Lightning: the engine and its schedule (Eqs. 3-6), the stacked state of every layer
and the executors that run every device's local step on it."""
