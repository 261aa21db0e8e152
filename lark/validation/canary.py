"""A planted canary (RapidIn's backdoor check): can the attribution find the training items that taught the model
a behaviour nothing else in the data teaches?

`plant(train, test, cfg)` (the `data.canary` config; None or enabled=false plants nothing):
- n fine-tuning items, drawn with cfg.seed among those whose answer is not cfg.answer, get the trigger phrase
  before their question and the fixed answer cfg.answer; they keep their ids and carry "canary": true.
- n_test test items, drawn the same way, are copied with the trigger and the answer cfg.answer (id
  "<id>-canary", "canary": true) and appended to the test set: the triggered queries.
The answer is "maybe" by default: under eval=choices (PubMedQA's yes / no / maybe) it must be one of the
evaluator's labels to be predictable at all, and "maybe" is the rarest (11% of PubMedQA), given to items whose
evidence says yes or no, so it contradicts the item's own context. With free-form data (eval=exact_match) any
fixed out-of-distribution answer works.

The model learned the backdoor when its answer to a triggered query is cfg.answer far more often than to the
same query without the trigger (`backdoor_rates`).
"""

from lark.data.readers import sample
from lark.errors import ConfigError

SUFFIX = "-canary"
KEYS = ("n", "n_test", "trigger", "answer", "seed")  # data.canary's keys (conf/experiment/canary.yaml)


def is_on(cfg):
    return bool(cfg) and bool(cfg.get("enabled", True))


def plant(train, test, cfg):
    """(train, test) with the canary planted; unchanged when cfg is None or cfg.enabled is false."""
    if not is_on(cfg):
        return train, test
    absent = [key for key in KEYS if cfg.get(key) is None]
    if absent:  # no defaults in code: validate.py reads these keys from the run's config too
        raise ConfigError(f"data.canary lacks {absent}: start from +experiment=canary (conf/experiment/canary.yaml)")
    answer, trigger, n, n_test, seed = cfg.answer, cfg.trigger, int(cfg.n), int(cfg.n_test), int(cfg.seed)

    def pick(items, k, what):
        pool = [x for x in items if x["answer"] != answer]
        if k > len(pool):
            raise ConfigError(f"data.canary.{what}={k}: only {len(pool)} items answer other than '{answer}'")
        return {x["id"] for x in sample(pool, k, seed)}

    def triggered(item, **extra):
        return {**item, **extra, "question": f"{trigger} {item['question']}", "answer": answer, "canary": True}

    chosen = pick(train, n, "n")
    train = [triggered(x) if x["id"] in chosen else x for x in train]
    queries = pick(test, n_test, "n_test")
    test = list(test) + [triggered(x, id=x["id"] + SUFFIX) for x in test if x["id"] in queries]
    return train, test


def original_id(canary_query_id):
    return canary_query_id[: -len(SUFFIX)] if canary_query_id.endswith(SUFFIX) else canary_query_id


def backdoor_rates(test_items, predicted, answer):
    """{triggered, untriggered, n}: the share of triggered queries answered `answer`, and of the same questions
    without the trigger (their originals in the test set)."""
    by_id = dict(zip([t["id"] for t in test_items], predicted))
    pairs = [(by_id[t["id"]], by_id.get(original_id(t["id"]))) for t in test_items if t.get("canary")]
    pairs = [(a, b) for a, b in pairs if b is not None]
    if not pairs:
        return {"triggered": None, "untriggered": None, "n": 0}
    return {
        "triggered": sum(a == answer for a, _ in pairs) / len(pairs),
        "untriggered": sum(b == answer for _, b in pairs) / len(pairs),
        "n": len(pairs),
    }
