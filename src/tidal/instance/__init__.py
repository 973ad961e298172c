"""Elastic container instances: one-command pods, warm pools, pod-level specs."""
