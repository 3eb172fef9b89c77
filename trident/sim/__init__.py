"""Discrete-event simulator driving the scheduler core on virtual time."""
