"""Choosing a configuration: per-layer sensitivity, mixed precision under a size budget, the Pareto frontier."""
