"""Redundancy-guided expert pruning: calibration, the PES redundancy measure, pruning plans."""
