"""Mechanism: wire protocol, transport, daemons, workers and devices."""
