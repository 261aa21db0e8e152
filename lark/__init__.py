"""LARK: linearized attribution kernel — which training data made a fine-tuned language model behave this way.

Four wings, one per stage of the paper, each listing its modules in its __init__.py: lark.data, lark.kernel,
lark.analysis, lark.validation. Beside them, the base modules every wing may import: errors.py (errors meant for the
user), faults.py (kill points for the resume tests), console.py (the run's console), fingerprints.py (content
hashes). And the run's orchestration, which imports the wings (the validation wing imports three of its support
modules: models, legacy, rundir): experiment.py (train / attribute, stage by stage), config_files.py
(data.corpora_file, source.file), config_checks.py (bad config values named at start), preflight.py (hub ids, GPU
and disk before any work), checkpoint.py (one checkpoint: save, evaluate, build stores, score, measure), reuse.py
(what resume=true reuses of an attributed epoch), callbacks.py (the epoch-end attribution callback), training.py
(the LightningModule), pretrain.py (the embedded default's tiny base model), models.py (models and tokenizers),
evaluation.py (the `eval` evaluators), tracin.py (TracIn-CP over a run), notices.py (warnings kept in
data/warnings.json), resume.py (Lightning's resume state), rundir.py (checks on a run directory), loggers.py,
legacy.py (earlier runs' configs in today's form).
"""

__version__ = "0.1.0"
