"""lark.analysis.metrics: the paper's metrics on hand-computed score matrices, BM25, storage, JSON cleaning."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lark.analysis import metrics as M
from lark.data import bm25

NAN, INF = float("nan"), float("inf")


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def same(a, b):
    """Equal tensors, NaN in the same places."""
    return (
        a.shape == b.shape
        and bool(torch.equal(torch.isnan(a), torch.isnan(b)))
        and bool(torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    )


# ----------------------------------------------------------------------------- max_influence / mean_max
def test_max_influence_is_the_row_max():
    scores = torch.tensor([[0.1, 0.7, -0.2], [-0.5, -0.4, -0.9], [0.3, 0.3, 0.3]])
    assert same(M.max_influence(scores), t(0.7, -0.4, 0.3))


def test_max_influence_nan_rows_stay_nan():
    scores = torch.tensor([[0.1, NAN, 0.5], [NAN, NAN, NAN], [0.2, 0.0, -1.0]])
    out = M.max_influence(scores)
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2].item() == pytest.approx(0.2)


def test_max_influence_of_an_empty_source_is_nan_per_query():
    out = M.max_influence(torch.zeros(4, 0))
    assert out.shape == (4,) and torch.isnan(out).all()
    assert M.max_influence(torch.zeros(0, 0)).shape == (0,)


def test_mean_max_ignores_non_finite_and_is_none_without_finite():
    assert M.mean_max(t(0.2, 0.4, NAN, 0.9, INF, -INF)) == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    assert M.mean_max(t(NAN, NAN)) is None
    assert M.mean_max(t()) is None
    assert isinstance(M.mean_max(t(0.5)), float)


# ----------------------------------------------------------------------------- wins / ratio
def test_wins_is_strict_and_skips_non_finite_pairs():
    a = t(0.5, 0.4, 0.3, 0.9, NAN, 0.1)
    b = t(0.2, 0.4, 0.6, INF, 0.0, 0.0)
    # finite pairs: (0.5>0.2 win) (0.4=0.4 tie: no win) (0.3<0.6) (0.1>0.0 win) -> 2 of 4
    assert M.wins(a, b) == pytest.approx(0.5)
    assert M.wins(b, a) == pytest.approx(0.25)  # the tie is a win for neither
    assert M.wins(t(0.3, 0.3), t(0.3, 0.3)) == 0.0
    assert M.wins(t(NAN, 1.0), t(0.0, NAN)) is None
    assert M.wins(t(), t()) is None


def test_ratio_with_zero_and_none():
    assert M.ratio(3.0, 2.0) == 1.5
    assert M.ratio(0.0, 2.0) == 0.0  # a zero numerator is a real ratio
    assert M.ratio(1.0, 0.0) is None and M.ratio(1.0, 0) is None
    assert M.ratio(None, 2.0) is None and M.ratio(1.0, None) is None and M.ratio(None, None) is None
    assert M.ratio(-1.0, 4.0) == -0.25


# ----------------------------------------------------------------------------- influence_metrics
PAIRS = {
    "medical": ("medical_format", "medical_noformat"),
    "entertainment": ("entertainment_format", "entertainment_noformat"),
    "absent": ("nowhere_format", "nowhere_noformat"),
}


def hand_maxinf():
    return {
        "finetune": t(0.5, 0.4, 0.3, NAN),
        "medical_format": t(0.2, 0.4, 0.6, 0.1),
        "medical_noformat": t(0.1, 0.1, 0.1, 0.1),
        "entertainment_format": t(0.2, NAN, 0.2, 0.2),
        "entertainment_noformat": t(0.1, 0.1, NAN, -INF),
    }


def test_influence_metrics_on_a_hand_example():
    r = M.influence_metrics(hand_maxinf(), "finetune", "medical_format", PAIRS)
    assert (r["ft_source"], r["pt_source"]) == ("finetune", "medical_format")
    assert r["ft"] == pytest.approx(0.4)  # (0.5 + 0.4 + 0.3) / 3, the NaN query left out
    assert r["pt"] == pytest.approx(0.325)  # (0.2 + 0.4 + 0.6 + 0.1) / 4
    assert r["ft_pt_ratio"] == pytest.approx(0.4 / 0.325)
    assert r["ft_wins"] == pytest.approx(1 / 3)  # 0.5>0.2 win, 0.4=0.4 tie, 0.3<0.6; query 4 left out
    assert r["pt_wins"] == pytest.approx(1 / 3)  # strict too: the tie is neither's win (was 1 - FT wins = 2/3)
    assert r["format_effect"] == pytest.approx({"medical": 0.325 / 0.1, "entertainment": 0.2 / 0.1})
    s = r["sources"]
    assert s["finetune"] == {"mean_max": pytest.approx(0.4), "ft_wins": None, "n_nonfinite": 1}
    assert s["medical_noformat"]["ft_wins"] == pytest.approx(1.0)
    assert s["entertainment_format"]["ft_wins"] == pytest.approx(1.0)  # queries 1 and 3 (2 and 4 non-finite)
    assert s["entertainment_noformat"]["ft_wins"] == pytest.approx(1.0)  # queries 1 and 2
    assert [s[n]["n_nonfinite"] for n in s] == [1, 0, 0, 1, 2]
    assert s["entertainment_noformat"]["mean_max"] == pytest.approx(0.1)
    json.dumps(M.clean(r), allow_nan=False)


def test_influence_metrics_with_an_all_nan_pretrain_source():
    maxinf = {"ft": t(0.5, 0.4), "pt": t(NAN, NAN), "raw": t(0.0, 0.0)}
    r = M.influence_metrics(maxinf, "ft", "pt", {"x": ("pt", "raw"), "y": ("ft", "raw")})
    assert r["pt"] is None and r["ft_pt_ratio"] is None
    assert r["ft_wins"] is None and r["pt_wins"] is None
    assert r["sources"]["pt"]["n_nonfinite"] == 2
    assert r["format_effect"] == {"x": None, "y": None}  # None numerator; zero denominator


def test_influence_metrics_from_empty_sources_via_max_influence():
    scores = {"ft": torch.tensor([[0.2, 0.9], [0.4, 0.1], [0.7, 0.6]]), "pt": torch.zeros(3, 0)}
    maxinf = {n: M.max_influence(s) for n, s in scores.items()}
    r = M.influence_metrics(maxinf, "ft", "pt", {})
    assert r["ft"] == pytest.approx((0.9 + 0.4 + 0.7) / 3)
    assert r["pt"] is None and r["ft_wins"] is None and r["sources"]["pt"]["n_nonfinite"] == 3


# ----------------------------------------------------------------------------- BM25
SOURCES = {
    "cats": ["the cat sat on the warm mat", "a cat chased the grey mouse", "kittens and cats purr softly"],
    "dogs": ["dogs run fast in the park", "the dog barked loudly at night", "puppies chew old shoes"],
    "food": ["bread and butter for breakfast", "fresh soup with onions", "the chef roasted vegetables"],
}


def bm25_max_scores(queries, sources):
    """Table IV's BM25 baseline as lark.checkpoint computes it: each query's best score in each source."""
    return {name: M.max_influence(s).float() for name, s in bm25.source_scores(queries, sources).items()}


def test_bm25_max_scores_picks_the_lexically_matching_source():
    queries = ["where did the cat sit on the mat", "which dog barked at night", "soup with onions and bread"]
    out = bm25_max_scores(queries, SOURCES)
    assert list(out) == ["cats", "dogs", "food"]
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in out.values())
    best = torch.stack([out[n] for n in SOURCES]).argmax(dim=0).tolist()
    assert best == [0, 1, 2]
    assert out["food"][1].item() == 0.0  # "which dog barked at night" shares no word with food


def test_bm25_scores_use_one_index_over_all_sources():
    # the same document scores the same whichever source holds it, because the index is shared
    a = bm25_max_scores(["grey mouse"], SOURCES)
    moved = {"cats": SOURCES["cats"][:1], "dogs": SOURCES["dogs"] + SOURCES["cats"][1:], "food": SOURCES["food"]}
    b = bm25_max_scores(["grey mouse"], moved)
    assert a["cats"].item() == pytest.approx(okapi(["grey", "mouse"], SOURCES["cats"][1], SOURCES), rel=1e-6)
    assert b["dogs"].item() == pytest.approx(a["cats"].item())
    assert b["cats"].item() == 0.0


def okapi(query, doc, sources, k1=1.5, b=0.75):
    """Okapi BM25 of one document by the textbook formula, for query words that each occur in fewer than half the
    documents (so rank_bm25's idf floor never applies): sum of idf(w) * f (k1 + 1) / (f + k1 (1 - b + b |d| / avgdl))
    with idf(w) = ln((N - n(w) + 0.5) / (n(w) + 0.5))."""
    docs = [d.split() for texts in sources.values() for d in texts]
    avgdl, words = sum(map(len, docs)) / len(docs), doc.split()
    score = 0.0
    for w in query:
        n, f = sum(w in d for d in docs), words.count(w)
        idf = math.log((len(docs) - n + 0.5) / (n + 0.5))
        score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(words) / avgdl))
    return score


def test_bm25_tokens():
    assert bm25.tokens("Does X-12 reduce PAIN? yes_no") == ["does", "x", "12", "reduce", "pain", "yes_no"]


# ----------------------------------------------------------------------------- storage / clean
def test_storage_for_the_paper():
    s = M.storage(7_298_011_136, 2, 65536, 2, 500)
    assert s["full_bytes_per_example"] == 14_596_022_272
    assert s["store_bytes_per_example"] == 131_072
    assert s["n_params"] == 7_298_011_136 and s["k"] == 65536 and s["n_examples"] == 500
    assert round(s["full_bytes_per_example"] / 2**30, 2) == 13.59  # Table III: 13.59 GB per sample
    assert round(500 * s["full_bytes_per_example"] / 2**40, 2) == 6.64  # 6.64 TB for 500 samples
    assert M.storage(10, 4, 8, 2, 1)["full_bytes_per_example"] == 40


def test_clean_turns_nan_and_inf_into_none_recursively():
    value = {"a": NAN, "b": [INF, 1.5, (-INF, 2)], "c": {"d": NAN, "e": "text", "f": None}, "g": 3, "h": 0.0}
    out = M.clean(value)
    assert out == {"a": None, "b": [None, 1.5, [None, 2]], "c": {"d": None, "e": "text", "f": None}, "g": 3, "h": 0.0}
    json.dumps(out, allow_nan=False)
    assert M.clean(7) == 7 and M.clean("nan") == "nan"


# ----------------------------------------------------------------------------- properties
scores_st = st.floats(min_value=-1, max_value=1, allow_nan=False, width=32)
maybe_nan = st.one_of(scores_st, st.just(NAN))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 12).flatmap(
        lambda n: st.tuples(st.lists(maybe_nan, min_size=n, max_size=n), st.lists(maybe_nan, min_size=n, max_size=n))
    )
)
def test_wins_and_mean_max_properties(pair):
    ft, pt = t(*pair[0]), t(*pair[1])
    r = M.influence_metrics({"ft": ft, "pt": pt}, "ft", "pt", {})
    both = [(a, b) for a, b in zip(*pair) if not (math.isnan(a) or math.isnan(b))]
    if both:
        assert r["ft_wins"] == pytest.approx(sum(a > b for a, b in both) / len(both))
        assert r["pt_wins"] == pytest.approx(sum(b > a for a, b in both) / len(both))
        assert r["ft_wins"] + r["pt_wins"] == pytest.approx(1.0 - sum(a == b for a, b in both) / len(both))
        assert 0.0 <= r["ft_wins"] <= 1.0
    else:
        assert r["ft_wins"] is None and r["pt_wins"] is None
    for name, xs in pair_names(pair):
        finite = [x for x in xs if not math.isnan(x)]
        m = r["sources"][name]["mean_max"]
        assert r["sources"][name]["n_nonfinite"] == len(xs) - len(finite)
        if finite:
            assert min(finite) - 1e-6 <= m <= max(finite) + 1e-6
            assert m == pytest.approx(sum(finite) / len(finite), abs=1e-6)
        else:
            assert m is None


def pair_names(pair):
    return [("ft", pair[0]), ("pt", pair[1])]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_max_influence_property(n_q, n_d, data):
    rows = [data.draw(st.lists(scores_st, min_size=n_d, max_size=n_d)) for _ in range(n_q)]
    out = M.max_influence(torch.tensor(rows))
    assert out.tolist() == [max(torch.tensor(r).tolist()) for r in rows]


def test_table_iii_counts_the_fine_tuning_sources_examples(tmp_path):
    """Table III multiplied the per-example bytes by source.size even when the finetune source held another number
    of items (size: null takes every training item)."""
    import types

    from omegaconf import OmegaConf

    import lark.checkpoint as C

    source = {"ft_source": "ft", "pt_source": "pt", "format_pairs": {}, "size": 100}
    source["sources"] = {
        "ft": {"kind": "finetune", "formatted": True, "size": None},
        "pt": {"kind": "retrieve", "corpus": "m", "formatted": True},
    }
    cfg = OmegaConf.create(
        {
            "source": source,
            "format": {"answer_template": "{answer}"},
            "attribution": {"store_dtype": "float16", "query_target": "gold"},
        }
    )
    ck = types.SimpleNamespace(cfg=cfg, model=torch.nn.Linear(3, 2), prints={}, run_dir=tmp_path, out_dir=tmp_path)
    projector = types.SimpleNamespace(k=8, spec=lambda: {"kind": "sketch"})
    stores = types.SimpleNamespace(projector=projector, kernel=types.SimpleNamespace(spec=lambda: {}), nonfinite={})
    sets = {"ft": [{"text": f"a b {i}", "id": str(i)} for i in range(500)], "pt": [{"text": "a c", "id": "p"}]}
    maxinf = {"ft": torch.tensor([0.5, 0.4]), "pt": torch.tensor([0.3, 0.6])}
    out = C.measure(ck, stores, maxinf, [{"question": "a b"}, {"question": "c"}], sets, {"epoch": 1})
    assert out["sources"]["ft"]["n_docs"] == out["storage"]["n_examples"] == 500
