"""Hybrid scheduler: owned nodes plus pay-per-use virtual nodes."""
