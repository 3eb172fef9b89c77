"""Benchmark drivers (``trident bench runtime|planner|sim|live|replacement|chaos``) and
the local-cluster launcher (:mod:`trident.bench.cluster`) they, the demo and the tests use.

Library packages (``trident.runtime``, ``trident.sched``, ``trident.sim``,
``trident.pipelines``) never import this package.
"""
