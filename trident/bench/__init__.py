"""Benchmark drivers that run real daemons (``trident bench ...``)."""
