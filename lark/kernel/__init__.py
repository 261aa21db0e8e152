"""The kernel wing: per-example loss gradients, their random projection, and scoring.

hashing.py (the counter hash every projector shares), normalizers.py (none, per-tensor), projectors.py (rapidin,
gaussian, exact: one backward per example), sketch.py + sketch_math.py (the hook sketch: batched, no weight-gradient
GEMMs), optimizer.py (AdamW moments and their correction), kernels.py (cosine, rapidin, adam, trackstar, tracin_cp),
factory.py (a config's kernel and projector), build.py (a set of examples into a store), stores.py (tiers, scoring,
top-k), fidelity.py and selfcheck.py (checks against exact gradients). Imports the data wing and the base modules.
"""
