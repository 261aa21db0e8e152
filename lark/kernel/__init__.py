"""The kernel wing: per-example loss gradients, their random projection, and scoring.

hashing.py (the counter hash every projector shares), normalizers.py (none, per-tensor), projectors.py (rapidin,
gaussian, exact: one backward per example), sketch.py + sketch_math.py (the hook sketch: batched, no weight-gradient
GEMMs), fold_triton.py (the sketch's fold as one Triton kernel, CUDA's schedule), factored.py (the factored
projector, LoGra / Bergson: each Linear module's gradient projected from its two factors, on the sketch's hooks),
optimizer.py (AdamW moments and their correction), kernels.py (cosine, rapidin, adam, trackstar, tracin_cp),
factory.py (a config's kernel and projector), build.py (a set of examples into a store), stores.py (tiers, scoring,
top-k), tokens.py + tokens_math.py (attribution.tokens: a top pair's score split exactly over its loss tokens;
the projectors' transposes and per-token derivatives), fidelity.py and selfcheck.py (checks against exact
gradients). Imports the data wing and the base modules.
"""
