"""Table V, attribution quality: does a kernel find the data that made the model behave so? (`python validate.py`)

For every kernel of `validate.kernels` (names of the attribution/kernel group, with the run's own projector),
every checkpoint, plus BM25 and random scores, three checks:
- Provenance recall (the embedded world): for each test question, the abstracts and fine-tuning items that
  `data/world/provenance.json` says carry its fact, ranked among a candidate pool built WITHOUT any attribution
  method or BM25 (`validate.pool`: all of the world's abstracts, or the provenance abstracts plus a seeded random
  sample), and among all fine-tuning items: recall@k and MRR (lark.validation.recall).
- Planted canary (data.canary, lark.validation.canary): precision@n and AUPRC of the canary items among all fine-tuning
  items for each triggered query; the backdoor rate at every checkpoint.
- Mini-LDS (lark.validation.lds): Spearman of sum_{d in S} score(q, d) with -loss(q) over models retrained on subsets S.
Every query and every training item is projected here, at every checkpoint (the run's own stores hold only
`source.size` fine-tuning items); the score matrices are cached under <run>/validation/scores, keyed by content.

Outputs: tables/table5.{md,csv}, figures/fig5_validation.png, validation/validation.json (everything, with the
time each column cost).
"""

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from safetensors import SafetensorError, safe_open

from lark import console
from lark.analysis import analyze as analysis
from lark.data.bm25 import BM25
from lark.data.formats import Encoder, document_fields, encode, qa_fields
from lark.data.io import replacing, write_csv, write_json
from lark.data.readers import qa_record, read_examples, sample
from lark.data.sources import example_text, query_examples
from lark.data.world import load_world
from lark.errors import ConfigError, RunDirError
from lark.fingerprints import content_hash, fingerprints
from lark.kernel.build import project_examples
from lark.kernel.factory import make_kernel, make_projector, upgrade
from lark.kernel.optimizer import MOMENTS_FILE, Moments
from lark.kernel.stores import atomic_save, unit_rows
from lark.legacy import load as load_run_config
from lark.models import load_pretrained
from lark.rundir import epoch_lr, saved_checkpoints
from lark.validation import canary, lds
from lark.validation import recall as R

BASELINES = ("bm25", "random")


def pool_documents(world, pool_cfg):
    """The pretraining candidates of provenance recall, built without any scoring method: every abstract of the
    world (kind all), or the provenance abstracts plus `size` others drawn with `seed` (kind sample)."""
    docs = world.medical_docs
    if pool_cfg.kind == "all":
        return list(docs)
    if pool_cfg.kind != "sample":
        raise ConfigError(f"validate.pool.kind: unknown '{pool_cfg.kind}' (all or sample)")
    needed = {d for p in world.provenance.values() for d in p["pretrain_docs"]}
    others = sample([d for d in docs if d["id"] not in needed], int(pool_cfg.size), int(pool_cfg.seed))
    keep = needed | {d["id"] for d in others}
    return [d for d in docs if d["id"] in keep]


def pool_examples(docs, how):
    if how not in ("noformat", "format"):
        raise ConfigError(f"validate.pool.format: unknown '{how}' (noformat or format)")
    return [document_fields(d) if how == "format" else {"id": d["id"], "text": d["text"]} for d in docs]


KERNELS = Path(__file__).resolve().parents[2] / "conf" / "attribution" / "kernel"


def kernel_config(run_attr, name):
    """The run's attribution config with kernel `name` of the attribution/kernel group (conf/attribution/kernel)."""
    path = KERNELS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in KERNELS.glob("*.yaml")))
        raise ConfigError(f"validate.kernels: unknown kernel '{name}' ({known})")
    attr = OmegaConf.create(OmegaConf.to_container(upgrade(run_attr), resolve=True))
    attr.kernel = OmegaConf.load(path)
    return attr


def read_cached(path, key):
    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, SafetensorError):
        return None


def kernel_scores(run, attr, model, tokenizer, folder, log, checkpoint):
    """{train, pool: cosine [Q, N]; q_norm [Q], t_norm [N]} of one kernel at one checkpoint (cached)."""
    cfg, sets = run["cfg"], {"queries": run["queries"], "train": run["train_fields"], "pool": run["pool"]}
    key = content_hash(
        OmegaConf.to_container(attr, resolve=True),
        fingerprints(model, tokenizer, cfg.format),
        cfg.max_length,
        {k: [e["id"] for e in v] for k, v in sets.items()},
    )
    path = folder / "scores.safetensors"
    cached = read_cached(path, key)
    if cached is not None:
        log(f"[lark] {path}: cached, reused")
        return cached
    kernel = make_kernel(attr)
    moments = None
    if kernel.uses_optimizer:  # the checkpoint's AdamW moments, saved by train.py (attribution.save_moments)
        if not (checkpoint / MOMENTS_FILE).is_file():
            raise RunDirError(
                f"{checkpoint / MOMENTS_FILE}: not found; validate.kernels '{kernel.name}' needs the "
                "run's AdamW moments (train.py with attribution.save_moments=true)"
            )
        moments = Moments.load(checkpoint / MOMENTS_FILE)
    projector = make_projector(attr, model, kernel, moments)
    raw = {
        name: project_examples(
            model,
            [encode(tokenizer, e, cfg.format, cfg.max_length) for e in examples],
            projector,
            tokenizer.pad_token_id,
            attr.batch_size,
        )
        for name, examples in sets.items()
        if examples
    }
    vectors = kernel.transform({name: unit_rows(v) for name, v in raw.items()}, "queries")  # e.g. TrackStar's R^-1/2
    q = vectors["queries"]
    out = {"train": q @ vectors["train"].T, "q_norm": raw["queries"].norm(dim=1), "t_norm": raw["train"].norm(dim=1)}
    if "pool" in vectors:
        out["pool"] = q @ vectors["pool"].T
    atomic_save({k: v.contiguous() for k, v in out.items()}, path, {"key": key})
    return out


def bm25_scores(queries, docs):
    """[Q, N] Okapi BM25 scores of the query questions against the documents' text (as Table IV's baseline)."""
    return BM25([example_text(d) for d in docs]).matrix([q["question"] for q in queries]).float()


def quality(scores_train, scores_pool, run, subsets):
    """The Table V numbers of one score matrix pair (pool may be None)."""
    out, ks = {}, list(run["vcfg"].recall_ks)
    groups = {"pt": (scores_pool, run["pool_relevant"]), "ft": (scores_train, run["ft_relevant"])}
    for prefix, (scores, relevant) in groups.items():
        if scores is None or relevant is None:
            continue
        scores = scores[run["prov_rows"]]
        for k in ks:
            out[f"{prefix}_recall@{k}"], out[f"{prefix}_n"] = R.mean(R.recall_at(scores, relevant, k))
        out[f"{prefix}_mrr"], _ = R.mean(R.reciprocal_rank(scores, relevant))
    if run["canary_rows"]:
        scores = scores_train[run["canary_rows"]]
        relevant = [run["canary_cols"]] * len(run["canary_rows"])
        out["canary_p@n"], out["canary_n"] = R.mean(R.precision_at(scores, relevant))
        out["canary_auprc"], _ = R.mean(R.average_precision(scores, relevant))
    if subsets is not None:
        result = lds.lds(
            scores_train, subsets["membership"], subsets["losses"], run["vcfg"].lds.n_boot, run["vcfg"].random_seed
        )
        out.update(
            {
                "lds": result["lds"],
                "lds_low": result["low"],
                "lds_high": result["high"],
                "lds_queries": result["n_queries"],
            }
        )
    return out


def load_run(run_dir, vcfg):
    """Everything validation needs from a run directory (its config, data, provenance, checkpoints)."""
    cfg = load_run_config(run_dir)
    test = read_examples(run_dir / "data" / "test.jsonl", qa_record)
    train = read_examples(run_dir / "data" / "train.jsonl", qa_record)
    epochs = saved_checkpoints(run_dir)
    if vcfg.checkpoints != "all":
        epochs = {e: f for e, f in epochs.items() if e in list(vcfg.checkpoints)}
    if not epochs:
        raise RunDirError(
            f"{run_dir / 'checkpoints'}: no epoch_NNN checkpoints (validate.checkpoints={vcfg.checkpoints})"
        )
    train_fields = [qa_fields(x, cfg.format.answer_template) for x in train]
    run = {
        "cfg": cfg,
        "vcfg": vcfg,
        "test": test,
        "train": train,
        "epochs": epochs,
        "train_fields": train_fields,
        "queries": query_examples(test, cfg.format),
        "pool": [],
        "pool_relevant": None,
        "ft_relevant": None,
        "prov_rows": [],
        "only_pretraining": None,
    }
    world_dir = run_dir / "data" / "world"
    if (world_dir / "provenance.json").is_file():
        world = load_world(world_dir)
        docs = pool_documents(world, vcfg.pool)
        run["pool"] = pool_examples(docs, vcfg.pool.format)
        rows = [i for i, t in enumerate(test) if t["id"] in world.provenance]
        prov = [world.provenance[test[i]["id"]] for i in rows]
        run["prov_rows"] = rows
        run["pool_relevant"] = R.columns([d["id"] for d in docs], [p["pretrain_docs"] for p in prov])
        train_ids = [x["id"] for x in train]
        run["ft_relevant"] = R.columns(
            train_ids, [[i for i in p["finetune_items"] if i in set(train_ids)] for p in prov]
        )
        run["only_pretraining"] = sum(not r for r in run["ft_relevant"]) / max(1, len(prov))
    run["canary_rows"] = [i for i, t in enumerate(test) if t.get("canary")]
    run["canary_cols"] = [j for j, x in enumerate(train) if x.get("canary")]
    if run["canary_rows"] and not run["canary_cols"]:
        run["canary_rows"] = []
    return run


def lds_enabled(vcfg, cfg):
    flag = vcfg.lds.enabled
    return "world" in cfg.data if flag == "auto" else bool(flag)


def validate_run(run_dir, vcfg, log=print):
    """Table V of a run directory; returns the result dict also written to validation/validation.json."""
    run_dir = Path(run_dir)
    console.setup()  # as train.py: no per-file progress bars of transformers in a log
    run = load_run(run_dir, vcfg)
    cfg, train, test = run["cfg"], run["train"], run["test"]
    timing, rows, backdoor = {}, [], {}
    subsets = None
    if lds_enabled(vcfg, cfg):
        start = time.perf_counter()
        subsets = lds.retrain_losses(run_dir, cfg, vcfg.lds, run["queries"], [x["id"] for x in train], log)
        timing["lds_retrains"] = time.perf_counter() - start
    tracin = {}
    for name in vcfg.kernels or []:
        attr = kernel_config(cfg.attribution, name)
        start, tracin_sum, used = time.perf_counter(), None, 0
        for epoch, folder in run["epochs"].items():
            model, tokenizer = load_pretrained(folder, cfg.model)
            scores = kernel_scores(
                run, attr, model, tokenizer, run_dir / "validation" / "scores" / name / folder.name, log, folder
            )
            rows.append({"method": name, "epoch": epoch, **quality(scores["train"], scores.get("pool"), run, subsets)})
            lr = epoch_lr(folder, run_dir / "attribution" / folder.name / "metrics.json")
            if lr:  # TracIn-CP: sum over the trained checkpoints of lr x <g(q), g(d)>
                dots = scores["train"] * scores["q_norm"][:, None] * scores["t_norm"][None, :]
                tracin_sum = lr * dots if tracin_sum is None else tracin_sum + lr * dots
                used += 1
            if run["canary_rows"] and epoch not in backdoor:
                _, predicted = instantiate(cfg.eval)(
                    model, Encoder(tokenizer, cfg.format, cfg.max_length), test, run["queries"]
                )
                backdoor[epoch] = canary.backdoor_rates(test, predicted, cfg.data.canary.answer)
            log(
                f"[lark] validate {name} epoch {epoch}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float))
            )
        timing[name] = time.perf_counter() - start
        if tracin_sum is not None:
            tracin[name] = {"checkpoints": used}
            rows.append({"method": f"{name} TracIn-CP", "epoch": "all", **quality(tracin_sum, None, run, subsets)})
    for name in BASELINES:
        start = time.perf_counter()
        if name == "bm25":
            train_scores = bm25_scores(run["queries"], run["train_fields"])
            pool_scores = bm25_scores(run["queries"], run["pool"]) if run["pool"] else None
        else:
            g = torch.Generator().manual_seed(int(vcfg.random_seed))
            train_scores = torch.rand(len(test), len(train), generator=g)
            pool_scores = torch.rand(len(test), len(run["pool"]), generator=g) if run["pool"] else None
        rows.append({"method": name, "epoch": "-", **quality(train_scores, pool_scores, run, subsets)})
        timing[name] = time.perf_counter() - start
    for row in rows:
        cost = timing.get(row["method"].removesuffix(" TracIn-CP"))
        row["seconds"] = cost
    result = {
        "rows": rows,
        "timing_s": timing,
        "backdoor": backdoor,
        "tracin_cp": tracin,
        "only_pretraining_share": run["only_pretraining"],
        "n_queries": len(test),
        "n_train": len(train),
        "n_pool": len(run["pool"]),
        "pool": OmegaConf.to_container(vcfg.pool),
        "kernels": OmegaConf.to_container(vcfg.kernels or []),
        "lds": None if subsets is None else {"n_subsets": len(subsets["losses"]), "fraction": float(vcfg.lds.fraction)},
    }
    files = write_table5(result, run_dir / "tables") + [
        plot_validation(result, run_dir / "figures" / "fig5_validation.png")
    ]
    write_json(run_dir / "validation" / "validation.json", result)
    result["files"] = [str(f) for f in files]
    return result


COLUMNS = [
    ("pt_recall@1", "PT R@1"),
    ("pt_recall@10", "PT R@10"),
    ("pt_mrr", "PT MRR"),
    ("ft_recall@1", "FT R@1"),
    ("ft_recall@10", "FT R@10"),
    ("ft_mrr", "FT MRR"),
    ("canary_p@n", "Canary P@n"),
    ("canary_auprc", "Canary AUPRC"),
    ("lds", "LDS"),
]


def write_table5(result, out_dir):
    """tables/table5.md (rounded) and table5.csv (full precision)."""
    rows = result["rows"]
    present = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = [
        "### Table V: Attribution quality (higher is better; random = chance)",
        "",
        "| Method | Epoch | " + " | ".join(h for _, h in present) + " | Time (s) |",
        "|---|---|" + "---|" * len(present) + "---|",
    ]
    for r in rows:
        cells = []
        for key, _ in present:
            cell = analysis.fmt(r.get(key), ".3f")
            if key == "lds" and r.get("lds_low") is not None:
                cell += f" [{r['lds_low']:.3f}, {r['lds_high']:.3f}]"
            cells.append(cell)
        lines.append(
            f"| {r['method']} | {r['epoch']} | " + " | ".join(cells) + f" | {analysis.fmt(r.get('seconds'), '.0f')} |"
        )
    lines += ["", notes(result)]
    out_dir = Path(out_dir)
    with replacing(out_dir / "table5.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_csv(out_dir / "table5.csv", rows)
    return [out_dir / "table5.md", out_dir / "table5.csv"]


def notes(result):
    parts = []
    if result["n_pool"]:
        pool = result["pool"]
        how = (
            "every abstract of the world"
            if pool["kind"] == "all"
            else f"the provenance abstracts plus {pool['size']} others drawn with seed {pool['seed']}"
        )
        parts.append(
            f"PT: the {result['n_pool']} candidate abstracts are {how} ({pool['format']}); FT: all "
            f"{result['n_train']} fine-tuning items. R@k = share of a question's provenance documents in "
            f"its top k; MRR = 1/rank of the first. "
            f"{100 * result['only_pretraining_share']:.0f}% of the questions have their fact only in "
            "pretraining (no FT provenance; left out of the FT columns)."
        )
    if result["backdoor"]:
        last = result["backdoor"][max(result["backdoor"])]
        parts.append(
            f"Canary: P@n and AUPRC of the planted items among all fine-tuning items for the {last['n']} "
            f"triggered queries; backdoor rate at the last checkpoint {100 * last['triggered']:.0f}% "
            f"(same questions without the trigger: {100 * last['untriggered']:.0f}%)."
        )
    if result["lds"]:
        parts.append(
            f"LDS: {result['lds']['n_subsets']} retrains on {result['lds']['fraction']:.0%} subsets, "
            "Spearman of the summed scores with -loss, mean over queries [95% bootstrap interval]; "
            f"retrains took {result['timing_s'].get('lds_retrains', 0):.0f} s (shared by every row)."
        )
    parts.append("Time: seconds for that row's method over all checkpoints (TracIn-CP reuses its kernel's).")
    return " ".join(parts)


def plot_validation(result, path):
    """One panel per check: each kernel's number over the checkpoints, BM25 and random as horizontal lines."""
    keys = [
        (k, h)
        for k, h in (
            ("pt_mrr", "Provenance MRR (pretraining)"),
            ("ft_mrr", "Provenance MRR (fine-tuning)"),
            ("canary_auprc", "Canary AUPRC"),
            ("lds", "LDS"),
        )
        if any(r.get(k) is not None for r in result["rows"])
    ]
    figure, axes = analysis.new_figure(max(1, len(keys)))
    for ax, (key, title) in zip(axes, keys):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in result["rows"])):
            rows = [r for r in result["rows"] if r["method"] == method and r.get(key) is not None]
            if not rows:
                continue
            if isinstance(rows[0]["epoch"], int):
                ax.plot(
                    [r["epoch"] for r in rows], [r[key] for r in rows], marker=analysis.MARKERS[i % 8], label=method
                )
            else:
                ax.axhline(rows[0][key], linestyle="--", color=f"C{i}", label=method)
        analysis.finish(ax, title, title)
    analysis.save_figure(figure, path)
    return path


def load_config(overrides=None):
    """conf/validate.yaml (without its hydra block) merged with overrides: what analyze.py's validate uses."""
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "validate.yaml")
    overrides = dict(overrides or {})
    kernels = overrides.pop("kernels", None)
    with open_dict(cfg):
        cfg.pop("hydra", None)
        if kernels is not None:  # the kernel list is replaced, not merged into the default one
            cfg.kernels = kernels
    return OmegaConf.merge(cfg, overrides)
