"""Triton kernels, each file with its launchers: routing.py (the router), lowrank.py (the expert sum) and ffn.py (the
whole ASE FFN on them: fused, or around cuBLAS GEMMs)."""
