"""(Re)attribute the saved checkpoints of a run, then rebuild its tables and figures.

    python attribute.py run_dir=outputs/train/2026-11-29_10-00-00
    python attribute.py run_dir=<run> +attribution.projector.k=8192 +attribution.checkpoints=[0,5]
"""
import os
from pathlib import Path

import hydra
from omegaconf import OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
def main(cfg):
    from lark.analysis import analyze
    from lark.experiment import attribute

    run_dir = attribute(cfg.run_dir, OmegaConf.to_container(cfg.attribution))
    if cfg.analyze:
        analyze(run_dir)
    print(f"[lark] outputs: {run_dir}")


if __name__ == "__main__":
    main()
