"""The analysis wing: Section IV of the paper from the runs' saved metrics.

analyze.py (the entry point: tables, figures, report), runs.py (finding runs, reading metrics.json), metrics.py
(the paper's metrics from score matrices), schema.py (metrics.json), tables.py + markdown.py (Tables I-IV),
figures.py (Figures 1-3), report.py + report_data.py (report/index.html), browser.py (headless Chromium for its
checks). Imports the data wing and the base modules, never the kernel's internals or the run's orchestration.
"""
