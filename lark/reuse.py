"""What `resume=true` reuses of an attributed epoch (attribution/epoch_NNN/): the whole epoch when its metrics.json
carries this checkpoint's and config's fingerprint, its stores and score matrices pass their checksums, and its
stores were projected from today's tokenisation of the same examples.

The last condition catches what the fingerprint cannot: the fingerprint hashes the examples' text, the tokenizer,
the format and max_length, not the code that turns them into token ids (a long prompt's cut, for one), so an epoch
attributed by an earlier LARK could otherwise be reused beside epochs attributed by today's. Each store's header
records the content hash of the token ids and labels it was projected from (`examples`, lark.kernel.build)."""

import json

from safetensors import SafetensorError, safe_open

from lark.analysis.schema import check as check_metrics
from lark.data.io import check_safetensors, read_jsonl
from lark.data.sources import query_examples
from lark.errors import CorruptFile
from lark.kernel.build import examples_fingerprint


def stored_sets(folder, cfg, test_items, sets, query_set):
    """{set: [example]} as the epoch's stores hold them: the test queries first (with
    attribution.query_target=predicted, their answers are predictions.jsonl's), then the sources."""
    answers = None
    if cfg.attribution.get("query_target") == "predicted":
        predicted = {str(r["id"]): r["predicted"] for _, r in read_jsonl(folder / "predictions.jsonl")}
        answers = [predicted[str(item["id"])] for item in test_items]
    return {query_set: query_examples(test_items, cfg.format, answers), **sets}


def retokenised(folder, encoder, stored):
    """The sets whose store was projected from other token ids than `encoder` gives their examples today (a store
    that is missing or unreadable counts as retokenised)."""
    changed = []
    for name, examples in stored.items():
        try:
            with safe_open(str(folder / "stores" / f"{name}.safetensors"), framework="pt") as f:
                recorded = json.loads(f.metadata().get("examples", "null"))
        except (OSError, ValueError, SafetensorError):
            recorded = None
        if recorded != examples_fingerprint([encoder(e) for e in examples]):
            changed.append(name)
    return changed


def completed(folder, fingerprint, log=print):
    """The metrics of an attributed epoch whose metrics.json carries this fingerprint, else None. Its stores and
    score matrices must pass their checksums, else the epoch is attributed again: a corrupted store is recomputed
    (lark.kernel.build says so), the intact ones reused, every score matrix written again (a corrupted one logged
    here). Nothing is deleted: every rank comes to the same answer."""
    try:
        metrics = check_metrics(json.loads((folder / "metrics.json").read_text()), folder / "metrics.json")
    except (OSError, ValueError):
        return None
    if metrics.get("fingerprint") != fingerprint:
        return None
    corrupted = 0
    for path in sorted([*folder.glob("stores/*.safetensors"), *folder.glob("scores/*.safetensors")]):
        try:
            check_safetensors(path)
        except CorruptFile as e:
            corrupted += 1
            if path.parent.name == "scores":
                log(f"[lark] {e}: recomputed")
    return None if corrupted else metrics


def reusable(ck, test_items, sets, fingerprint, query_set):
    """The metrics of ck's epoch when resume=true may reuse it whole (`completed`, and every store of today's
    tokenisation: an epoch whose stores are not is attributed again, saying which), else None."""
    done = completed(ck.out_dir, fingerprint, ck.log)
    if done is None:
        return None
    changed = retokenised(ck.out_dir, ck.encoder, stored_sets(ck.out_dir, ck.cfg, test_items, sets, query_set))
    if changed:
        ck.log(
            f"[lark] {ck.out_dir}: the stores of {', '.join(changed)} were projected from other token ids than this "
            "LARK gives the same examples (an earlier version's tokenisation, e.g. of long prompts): attributed again"
        )
        return None
    return done
