"""(Re)attribute the saved checkpoints of a run, then rebuild its tables and figures.

python attribute.py run_dir=outputs/train/2026-11-29_10-00-00
python attribute.py run_dir=<run> +attribution.projector.k=8192 +attribution.checkpoints=[0,5]
python attribute.py run_dir=<run>          # again after a kill: continues from the complete shards
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from lark.console import require_run_dir

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
def main(cfg):
    from lark.analysis.analyze import analyze, own_settings
    from lark.errors import LarkError
    from lark.experiment import attribute

    try:
        run_dir = attribute(cfg.run_dir, OmegaConf.to_container(cfg.attribution), resume=cfg.resume)
        if cfg.analyze:  # with the run's own analysis settings (its Table I epoch rule, report, snippets)
            analyze(run_dir, **own_settings(run_dir))
    except LarkError as e:  # bad run directory, data or config: the message says what and where
        print(f"[lark] error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[lark] outputs: {run_dir}")


if __name__ == "__main__":
    require_run_dir()  # a mistyped run_dir: one line, no folder made for Hydra's log
    main()
