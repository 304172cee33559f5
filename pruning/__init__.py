"""Redundancy-guided expert pruning: calibration, redundancy by PES (from measures), pruning plans."""
