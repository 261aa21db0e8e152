"""The data wing: what the paper's experiment reads and how it becomes tokens.

io.py (JSON Lines with file:line errors, atomic writes), records.py (checking one record), readers.py (the `data`
config: QA items and test split), corpora.py (the pretraining corpora), world.py + world_text.py (the generated
world of the embedded default, with its provenance), sources.py (the attributed sources: finetune, retrieve,
sample, all), bm25.py (the one BM25), formats.py (layouts, templates, loss masks), datamodule.py (batching and the
LightningDataModule). Imports only lark's base modules (errors, faults, console, fingerprints).
"""
