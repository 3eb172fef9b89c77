"""Policy: the sans-IO scheduler core (graph, cost model, planner, baselines)."""
