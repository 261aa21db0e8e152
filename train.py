"""Fine-tune a causal LM and attribute its test answers to the training and pretraining data at every epoch.

python train.py                                   # embedded default: generated world + tiny OLMo-3, CPU, offline
python train.py +experiment=pubmedqa              # the paper: OLMo-3-7B-Instruct on PubMedQA (GPU, hub access)
python train.py data=pubmedqa_local model=...     # PubMedQA from ../shared/data
python train.py -m format=chatml,noformat trainer.max_epochs=2,5   # a sweep into multirun/
python train.py <same overrides> hydra.run.dir=<run> resume=true   # continue a killed run
"""

import os
import sys
from pathlib import Path

import hydra

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg):
    from lark.config_files import apply_config_files
    from lark.console import sweeping, tee_to_log
    from lark.errors import LarkError
    from lark.preflight import preflight

    tee_to_log()  # train.log holds the whole console, timestamped
    run_dir = None
    try:
        apply_config_files(cfg)  # data.corpora_file, source.file: your corpora and sources from a file
        preflight(cfg)  # seconds, before the heavy imports below: hub ids, GPU, disk
        from lark.experiment import train

        run_dir = train(cfg)
    except LarkError as e:  # bad data, config or run directory: the message says what and where
        print(f"[lark] error: {e}", file=sys.stderr)
        if sweeping():  # Hydra runs the sweep's other jobs, then reports the first failure (exit code 1)
            raise
        sys.exit(2)
    finally:
        print(f"[lark] outputs: {run_dir or cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
