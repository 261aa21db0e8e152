"""Table V, attribution quality: provenance recall, the planted canary and the mini-LDS of every kernel, BM25
and random (lark/validation/table5.py; conf/validate.yaml).

    python validate.py run_dir=outputs/train/2026-11-29_10-00-00
    python validate.py run_dir=<run> lds.n_subsets=8 checkpoints=[0,5]
    python validate.py run_dir=<run> lds.enabled=false pool.kind=sample
"""

import os
import sys
from pathlib import Path

import hydra

from lark.console import require_run_dir

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="validate")
def main(cfg):
    from lark.errors import LarkError
    from lark.validation.table5 import validate_run

    try:
        result = validate_run(cfg.run_dir, cfg)
    except LarkError as e:  # bad run directory or config: the message says what and where
        print(f"[lark] error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(result["files"]))


if __name__ == "__main__":
    require_run_dir()  # a mistyped run_dir: one line, no folder made for Hydra's log
    main()
