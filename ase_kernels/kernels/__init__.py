"""Triton kernels, each file with its launchers: routing.py (the router) and lowrank.py (the expert sum)."""
