"""Table V's numbers of one score matrix: provenance recall (lark.validation.recall), the planted canary's retrieval
(lark.validation.canary) and the mini-LDS (lark.validation.lds); and the canary's backdoor rate at a checkpoint.

    row = quality(scores["train"], scores.get("pool"), run, subsets)
    # -> {"pt_recall@1", "pt_n", "pt_recall@10", "pt_mrr", "ft_...", "canary_p@n", "canary_n", "canary_auprc",
    #     "lds", "lds_low", "lds_high", "lds_queries"}: the checks the run has, in this order (Table V's columns)
"""

from hydra.utils import instantiate

from lark.data.formats import Encoder
from lark.validation import canary, lds
from lark.validation import recall as R


def quality(scores_train, scores_pool, run, subsets):
    """The Table V numbers of one score matrix pair: train [Q, N], pool [Q, P] (None: no PT columns); subsets
    (lds.retrain_losses, None: no LDS)."""
    out = provenance_recall(scores_train, scores_pool, run)
    if run.canary_rows:
        out.update(canary_retrieval(scores_train, run))
    if subsets is not None:
        out.update(lds_columns(scores_train, subsets, run.vcfg))
    return out


def provenance_recall(scores_train, scores_pool, run):
    """{pt_recall@k, pt_n, pt_mrr, ft_...}: each question's provenance documents ranked among the pool (pt) and
    the fine-tuning items (ft), over the test rows that have a provenance."""
    out, ks = {}, list(run.vcfg.recall_ks)
    groups = {"pt": (scores_pool, run.pool_relevant), "ft": (scores_train, run.ft_relevant)}
    for prefix, (scores, relevant) in groups.items():
        if scores is None or relevant is None:
            continue
        scores = scores[run.prov_rows]
        for k in ks:
            out[f"{prefix}_recall@{k}"], out[f"{prefix}_n"] = R.mean(R.recall_at(scores, relevant, k))
        out[f"{prefix}_mrr"], _ = R.mean(R.reciprocal_rank(scores, relevant))
    return out


def canary_retrieval(scores_train, run):
    """{canary_p@n, canary_n, canary_auprc}: the planted items among all fine-tuning items, per triggered query."""
    out = {}
    scores = scores_train[run.canary_rows]
    relevant = [run.canary_cols] * len(run.canary_rows)
    out["canary_p@n"], out["canary_n"] = R.mean(R.precision_at(scores, relevant))
    out["canary_auprc"], _ = R.mean(R.average_precision(scores, relevant))
    return out


def lds_columns(scores_train, subsets, vcfg):
    """{lds, lds_low, lds_high, lds_queries} of the scores against the subset retrains' query losses."""
    level = vcfg.lds.get("level", lds.LEVEL)
    result = lds.lds(scores_train, subsets["membership"], subsets["losses"], vcfg.lds.n_boot, vcfg.random_seed, level)
    return {
        "lds": result["lds"],
        "lds_low": result["low"],
        "lds_high": result["high"],
        "lds_queries": result["n_queries"],
    }


def backdoor(run, model, tokenizer):
    """{triggered, untriggered, n}: how often the checkpoint answers the canary's answer with and without the
    trigger (the run's own evaluator, cfg.eval, predicts every test question)."""
    _, predicted = instantiate(run.cfg.eval)(
        model, Encoder(tokenizer, run.cfg.format, run.cfg.max_length), run.test, run.queries
    )
    return canary.backdoor_rates(run.test, predicted, run.cfg.data.canary.answer)
