"""Experiment tasks, registered by name with `register_task`."""
