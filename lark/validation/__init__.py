"""The validation wing: Table V, does a kernel find the data behind an answer? (`python validate.py`)

table5.py (validate_run: the steps in order), load.py (what it reads from a run), scores.py (kernel, BM25 and
random scores), quality.py (Table V's numbers of one score matrix), recall.py (recall@k, MRR, AUPRC), lds.py (the
linear datamodeling score and its subset retrains), batch.py (one batch of those retrains as a child process that
a later validate.py can find and stop), canary.py (the planted backdoor), write.py (table5.md / .csv,
Figure 5). Imports the data, kernel and analysis wings and the run's support modules (models, legacy, rundir), never
experiment, checkpoint or training.
"""
