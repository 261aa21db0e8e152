"""Tables I-IV, Figures 1-3 and report/index.html from a run directory or a multirun folder (one line/row per job).

python analyze.py run_dir=outputs/train/2026-11-29_10-00-00
python analyze.py run_dir=multirun/2026-11-29_10-00-00 table1_epoch=2
"""

import os
import sys
from pathlib import Path

import hydra

from lark.console import require_run_dir

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg):
    from lark.analysis.analyze import analyze, own_settings
    from lark.analysis.runs import find_runs
    from lark.errors import LarkError

    try:
        if cfg.validate:  # Table V first (as `python validate.py run_dir=<run>`, conf/validate.yaml): in the report
            from lark.validation.load import load_config
            from lark.validation.table5 import validate_run

            for run_dir in find_runs(cfg.run_dir).values():
                print("\n".join(validate_run(run_dir, load_config(cfg.get("validate_overrides")))["files"]))
        given = {name: cfg[name] for name in ("table1_epoch", "report", "snippet_chars")}
        result = analyze(cfg.run_dir, cfg.out_dir, **own_settings(cfg.run_dir, **given))
    except LarkError as e:  # an incomplete or corrupted run: the message says which file and what to do
        print(f"[lark] error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in result["table_files"] + result["figure_files"] + ([result["report"]] if result["report"] else []):
        print(path)


if __name__ == "__main__":
    require_run_dir(sweep=True)  # a mistyped run_dir: one line, no folder made for Hydra's log
    main()
