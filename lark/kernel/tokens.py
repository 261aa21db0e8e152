"""Which words mattered: each top pair's score split exactly over the document's loss tokens and over the query's
(`attribution.tokens: topk`), written as attribution/epoch_NNN/tokens/<source>.jsonl.

A pair's score is s(q, d) = <v_q, v_d>, v = M r / ||M r|| with r the example's projected vector (its store's raw
vector) and M the kernel's linear map of the stored vectors (the identity, or TrackStar's whitening). r = sum_t
r_t over the loss tokens t (lark.kernel.tokens_math: r is linear in the gradient, and the per-tensor norms and
the optimizer correction are fixed per example), so

    c_t(d) = <M^T v_q, r_t(d)> / ||M r_d||        sums over d's loss tokens to s(q, d),

and symmetrically c_t(q) = <M^T v_d, r_t(q)> / ||M r_q||. TrackStar's convention: each token's part is whitened by
the same M as the whole (M is linear, so the parts still add up) and divided by the whole example's whitened norm.
||M r|| is the store's norm of r times ||M s|| (s its stored unit vector), so the sums equal the scores of
top_influences.csv up to the store tier's rounding (float16: ~1e-4). Tokens that carry no loss (a Formatted
document's prompt, a query's question) have no gradient of their own: contribution null. That is the loss split
(attribution.tokens_split: loss, the default); the position split (position: lark.kernel.tokens_position) splits
r over the positions whose activations the gradient flowed through instead, every token with a part, in one
forward and one backward pass per example.

The pairs are each query's top `attribution.tokens_top_k` documents of every source (ranks as in
top_influences.csv). Cost: every example in a written pair (each document and query once, with all its partners)
takes min(m, T_loss) derivatives — m forward-mode ones, one per partner's tangent u = N D P^T w, the partners'
tangents batched into vmapped passes of as many as attribution.tokens_budget holds (tangent_chunk: ceil(m / chunk)
passes), or, when it has fewer loss tokens than partners, T_loss backward ones, one per loss token, batched the
same way (a query's short answer) — plus a backward pass under per-tensor normalisation (its norms). The position
split takes one forward and one backward pass per example instead, its partners' tangents dotted module by module;
with the `factored` projector no pass at all for the examples whose pieces by position the store pass kept
(lark.kernel.tokens_kept: every query and each source's running top documents, attribution.tokens_kept), and one
forward and backward pass per batch of the others (a finished run's stores: lark.kernel.tokens_kept.in_batches).

File format, one JSON object per line:
  {"query_id", "doc_id", "rank", "score", "kernel", "split" (loss | position; a file written before it: loss),
   "doc": {"text", "tokens": [[piece, start, end, contribution or null], ...]}, "query": {...}}
(a contribution: its float32 to 9 significant digits, which read back as that float32 exactly)
`text` is the decoded token ids of the encoded example (special tokens kept; a cut example's kept tokens), and
piece == text[start:end]. start and end count Python code points (the report converts them to JavaScript's UTF-16
units). A character split over byte tokens (byte-level BPE: an emoji, an accented letter) is the piece of the token
that completes it; the tokens before it get an empty piece (start == end) with their own contribution, and the
report and W&B's top pieces show them with the token that completes the character, contributions added.

Every source's file is written under tokens.tmp/ first, then moved into tokens/ (os.replace, file by file): a kill
during the pass leaves the old files as they were. An epoch complete without the tokens asked (its metrics.json
matching this checkpoint and config) gets them from its stores and top_influences.csv (`complete`): its
metrics.json, stores, scores and predictions are neither recomputed nor touched.
"""

import functools
import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from lark.data.datamodule import collate
from lark.data.formats import IGNORE
from lark.data.io import write_lines
from lark.errors import ConfigError, whole
from lark.kernel.factored import FactoredProjector
from lark.kernel.factory import make_kernel, make_projector
from lark.kernel.stores import load_store, read_top_influences
from lark.kernel.tokens_kept import Kept, in_batches
from lark.kernel.tokens_math import (
    TANGENT_NUMBERS,
    Transpose,
    pieces,
    scaling,
    tangent_chunk,
    tensor_norms,
    token_derivatives,
    token_products,
)
from lark.kernel.tokens_position import low_rank_tangents, position_products
from lark.models import eval_mode

MODES = ("off", "topk")  # attribution.tokens
PASSES = ("auto", "forward", "reverse")  # attribution.tokens_pass
SPLITS = ("loss", "position")  # attribution.tokens_split (its default first)
TOP_TOKENS = 10  # tokens listed by |contribution|: under each shaded text of the report, in W&B's top-k table
TOKENS_TOP_K = 3  # attribution.tokens_top_k's default (conf/attribution/default.yaml), for runs saved before it
KEPT_NUMBERS = 2**28  # attribution.tokens_kept's default (1 GiB of float32), for runs saved before it


def top_k_of(attr):
    """attribution.tokens_top_k, the default for a run saved before the key existed (as tokens_pass's and
    tokens_budget's)."""
    return attr.get("tokens_top_k", TOKENS_TOP_K)


def split_of(attr):
    """attribution.tokens_split, loss for a run saved before the key existed."""
    return attr.get("tokens_split", SPLITS[0])


def check(attr):
    """ConfigError for a bad attribution.tokens / tokens_top_k; returns whether tokens are wanted."""
    mode = attr.get("tokens", "off")
    mode = "off" if mode is False else mode  # YAML 1.1 reads an unquoted off as false
    if mode not in MODES:
        raise ConfigError(f"attribution.tokens: unknown '{mode}' ({' | '.join(MODES)})")
    if mode == "off":
        return False
    n = top_k_of(attr)
    if not (whole(n) and n <= attr.top_k):
        raise ConfigError(
            f"attribution.tokens_top_k must be an integer in [1, attribution.top_k={attr.top_k}], got {n!r}"
        )
    if attr.get("tokens_pass", "auto") not in PASSES:
        raise ConfigError(f"attribution.tokens_pass: unknown '{attr.tokens_pass}' ({' | '.join(PASSES)})")
    if split_of(attr) not in SPLITS:
        raise ConfigError(f"attribution.tokens_split: unknown '{split_of(attr)}' ({' | '.join(SPLITS)})")
    budget = attr.get("tokens_budget", TANGENT_NUMBERS)
    if not whole(budget):
        raise ConfigError(f"attribution.tokens_budget must be a positive integer (tangent numbers), got {budget!r}")
    if not whole(attr.get("tokens_kept", KEPT_NUMBERS), least=0):
        raise ConfigError(f"attribution.tokens_kept must be an integer >= 0 (numbers), got {attr.tokens_kept!r}")
    if attr.store_dtype == "bit":
        raise ConfigError("attribution.tokens=topk: store_dtype=bit's SimHash cosine is not a dot product to split")
    return True


def missing(out_dir, attr, sources):
    """Whether tokens are wanted and some source's tokens/<source>.jsonl is not there or does not hold exactly
    the pairs asked, split as asked: top_influences.csv's rows of rank <= tokens_top_k (an epoch complete without
    them, or with another tokens_top_k or tokens_split, gets them from its stores: `complete`). An unreadable
    file counts as missing."""
    if not check(attr):
        return False
    folder = Path(out_dir)
    if not (folder / "top_influences.csv").is_file():
        return True  # (the epoch is not complete: attributed anyway)
    wanted = defaultdict(set)
    for rank, query, source, doc, _ in read_top_influences(folder / "top_influences.csv"):
        if rank <= top_k_of(attr):
            wanted[source].add((query, doc))
    for source in sources:
        path = folder / "tokens" / f"{source}.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else None
            records = [json.loads(line) for line in lines] if lines is not None else None
            have = records is not None and {(str(r["query_id"]), str(r["doc_id"])) for r in records}
            if records and any(r.get("split", SPLITS[0]) != split_of(attr) for r in records):
                return True
        except (ValueError, KeyError, TypeError, OSError):  # a torn or foreign file: written again
            return True
        if have != wanted[source]:
            return True
    return False


def complete(ck, sets, query_set):
    """The token files asked of an epoch complete without them (its metrics.json matches this checkpoint and
    config; rank 0), made from its stores (vectors and norms) and top_influences.csv: its metrics.json, stores,
    scores and predictions are neither recomputed nor touched, and its old token files stay until the new ones
    replace them (write_tokens). sets: {set: [example]} as the stores hold them, the queries included
    (lark.reuse.stored_sets). Returns whether it wrote any."""
    attr, folder = ck.cfg.attribution, Path(ck.out_dir)
    if not missing(folder, attr, [name for name in sets if name != query_set]):
        return False
    vectors = {name: load_store(folder / "stores" / f"{name}.safetensors")[0] for name in sets}
    ids = {name: {str(e["id"]): e["id"] for e in examples} for name, examples in sets.items()}
    rows = read_top_influences(folder / "top_influences.csv")
    rows = [(ids[query_set][q], source, rank, ids[source][d], score) for rank, q, source, d, score in rows]
    kernel = make_kernel(attr)
    write_tokens(ck, make_projector(attr, ck.model, kernel, ck.moments), kernel, vectors, sets, rows, query_set)
    return True


def kept_for(attr, projector, kernel):
    """The lark.kernel.tokens_kept.Kept a store pass fills for the token pass (the position split with the
    `factored` projector), else None."""
    if not (check(attr) and split_of(attr) == "position" and isinstance(projector, FactoredProjector)):
        return None
    return Kept(projector, top_k_of(attr), attr.get("tokens_kept", KEPT_NUMBERS), kernel.whitens)


class Pass:
    """One checkpoint's token pass: the model, its projector and kernel, the stores' vectors and norms."""

    def __init__(
        self,
        model,
        tokenizer,
        projector,
        kernel,
        vectors,
        norms,
        query_set,
        mode="auto",
        budget=TANGENT_NUMBERS,
        split=SPLITS[0],
        kept=None,
    ):
        self.model, self.tokenizer, self.projector, self.kernel = model, tokenizer, projector, kernel
        self.mode = mode  # auto: the fewer passes; forward | reverse: always that one (tests compare them)
        self.split = split  # loss | position (attribution.tokens_split)
        self.query_set, self.norms, self.kept = query_set, norms, kept  # kept: pieces by position (tokens_kept)
        self.device = next(model.parameters()).device
        self.chunk = tangent_chunk(model, budget)  # attribution.tokens_budget
        self.transpose, self.texts, self.alone = Transpose(projector, model), {}, {}  # (pieces' caches)
        linear = kernel.linear_map(vectors, query_set) if kernel.whitens else None
        self.map = (lambda x: linear(x).float()) if linear else (lambda x: x.float())
        self.mapped = {name: self.map(v) for name, v in vectors.items()}  # M s, before the unit step
        self.scored = {name: m / m.norm(dim=1, keepdim=True).clamp_min(1e-30) for name, m in self.mapped.items()}

    def scale(self, name, i):
        """||M r|| of example i of set `name` (the store's norm times ||M s||)."""
        return float(self.norms[name][i]) * float(self.mapped[name][i].norm())

    def rows(self, partners, name, i):
        """[m, k] M^T v_partner / ||M r|| of example i of set `name`, one row per partner (set, index): c_t =
        <row, r_t> (M^T v = M v: M is symmetric)."""
        w = torch.stack([self.scored[other][j] for other, j in partners])
        return (self.map(w.double()) if self.kernel.whitens else w) / self.scale(name, i)

    def contributions(self, encoded, name, i, partners):
        """[len(partners), T] of example i of set `name` (encoded: its input ids and labels) against each partner
        (set, index): c_t = <M^T v_partner, r_t> / ||M r||, by forward mode (a pass per partner) or reverse mode
        (a pass per loss token), whichever takes fewer passes (self.mode); split by position, one forward and one
        backward pass (lark.kernel.tokens_position), or from the pieces kept by the store pass or a keeping
        projection of its batch (lark.kernel.tokens_kept), each read once and let go."""
        if self.split == "position" and self.kept is not None and (name, i) in self.kept.examples:
            found = self.kept.parts(name, i, self.rows(partners, name, i))
            self.kept.release((name, i))  # (each example is read once)
            return found
        batch = {k: v.to(self.device) for k, v in collate([encoded], self.tokenizer.pad_token_id).items()}
        norms = tensor_norms(self.projector, self.model, batch)
        diagonal = scaling(self.projector, self.model, batch, norms)
        n_loss = sum(label != IGNORE for label in encoded["labels"][1:])
        low_rank = self.split == "position" and isinstance(self.projector, FactoredProjector)

        def tangents(part):  # N D P^T of M^T v_partner / ||M r|| for a batch of partners
            w = self.rows(part, name, i)
            if low_rank:  # the factored matrices' tangents in their factors (tokens_position.LowRank)
                return low_rank_tangents(self.projector, self.transpose, w.to(self.device), diagonal, norms)
            return self.transpose(w.to(self.device), diagonal)

        parts = [partners[start : start + self.chunk] for start in range(0, len(partners), self.chunk)]
        if self.split == "position":
            return position_products(self.model, batch, [lambda p=p: tangents(p) for p in parts])
        if self.mode == "reverse" or (self.mode == "auto" and n_loss < len(partners)):
            return token_products(self.model, batch, [lambda p=p: tangents(p) for p in parts], self.chunk)
        return torch.cat([token_derivatives(self.model, batch, tangents(part)).cpu() for part in parts])

    def every(self, batches, encode):
        """{(set, index): [m, T] contributions} of every job (set, index, partners) of batches (lists of jobs, each
        taken when the one before is done: lark.kernel.tokens_kept.in_batches keeps a batch's pieces as it comes)."""
        found = {}
        with eval_mode(self.model):
            for batch in batches:
                found.update({(n, i): self.contributions(encode(n, i), n, i, partners) for n, i, partners in batch})
        return found

    def side(self, encoded, row):
        """The JSON text of {"text", "tokens"} of an example with its contribution row [T] (null where no loss, in
        the loss split), made here rather than by json.dumps (a third of the time of the embedded pass's writing):
        each token's piece, start and end encoded once per example, its float32 contribution written to 9
        significant digits, which give the float32 back exactly."""
        ids, labels = encoded["input_ids"], encoded["labels"]
        key = (tuple(ids), tuple(labels))
        if key not in self.texts:  # each example's pieces once (a query is a side of every pair it is in)
            text, spans = pieces(self.tokenizer, ids, self.alone)
            carries = [self.split == "position" or (s >= 1 and labels[s] != IGNORE) for s in range(len(spans))]
            heads = [json.dumps([text[a:b], a, b], ensure_ascii=False)[:-1] + ", " for a, b in spans]
            self.texts[key] = json.dumps(text, ensure_ascii=False), heads, carries
        text, heads, carries = self.texts[key]
        values = [number(v) if c else "null" for v, c in zip(row.tolist(), carries, strict=True)]
        return f'{{"text": {text}, "tokens": [{", ".join([h + v + "]" for h, v in zip(heads, values)])}]}}'


def number(value):
    """A float as JSON: 9 significant digits (a float32 exactly), json's NaN / Infinity where not finite."""
    return "%.9g" % value if math.isfinite(value) else json.dumps(value)


def write_tokens(ck, projector, kernel, vectors, sets, rows, query_set, mode=None, kept=None):
    """tokens/<source>.jsonl of one checkpoint (rank 0): each query's top attribution.tokens_top_k documents of
    every source.

    ck: the checkpoint at work (lark.checkpoint.Checkpoint: its out_dir, with the stores; model, tokenizer,
    encoder (example -> encoded), cfg.attribution); vectors: {set: decoded stored unit vectors [n, k]} (the query
    set and every source); sets: {set: [example]}; rows: top_influences.csv's (query_id, source, rank, doc_id,
    score); mode: Pass's (attribution.tokens_pass by default); kept: the store pass's pieces (kept_for), or None:
    made here when the config asks for them (a finished run's stores: tokens_kept.in_batches keeps them)."""
    out_dir, model, tokenizer, encoder = Path(ck.out_dir), ck.model, ck.tokenizer, ck.encoder
    top_k = top_k_of(ck.cfg.attribution)
    mode = mode or ck.cfg.attribution.get("tokens_pass", "auto")
    norms = {name: load_store(out_dir / "stores" / f"{name}.safetensors")[1] for name in sets}
    budget = ck.cfg.attribution.get("tokens_budget", TANGENT_NUMBERS)
    split = split_of(ck.cfg.attribution)
    kept = kept if kept is not None else kept_for(ck.cfg.attribution, projector, kernel)  # (a finished run's)
    run = Pass(model, tokenizer, projector, kernel, vectors, norms, query_set, mode, budget, split, kept)
    index = {name: {e["id"]: i for i, e in enumerate(examples)} for name, examples in sets.items()}
    encode = functools.cache(lambda name, i: encoder(sets[name][i]))  # each example encoded once
    pairs = [r for r in rows if r[2] <= top_k]
    by_doc, by_query = defaultdict(list), defaultdict(list)
    for q, source, _, d, _ in pairs:
        by_doc[(source, d)].append((query_set, index[query_set][q]))
        by_query[q].append((source, index[source][d]))
    jobs = [(source, index[source][d], partners) for (source, d), partners in by_doc.items()]
    jobs += [(query_set, index[query_set][q], partners) for q, partners in by_query.items()]
    if kept is None:
        batches = [jobs]
    else:  # (a batch's pieces kept as it comes, attribution.batch_size examples at a time)
        batches = in_batches(kept, jobs, encode, model, tokenizer.pad_token_id, ck.cfg.attribution.batch_size)
    found = run.every(batches, encode)
    doc_rows = {(p[1], s, d): found[(s, index[s][d])][n] for (s, d), ps in by_doc.items() for n, p in enumerate(ps)}
    query_rows = {
        (q, s, sets[s][j]["id"]): found[(query_set, index[query_set][q])][n]
        for q, ps in by_query.items()
        for n, (s, j) in enumerate(ps)
    }

    def records(source):  # made as they are written: a file's records are never all held (nor scanned by the GC)
        for q, _, rank, d, score in (pair for pair in pairs if pair[1] == source):
            iq, i = index[query_set][q], index[source][d]
            head = {"query_id": q, "doc_id": d, "rank": rank, "score": score, "kernel": kernel.name, "split": split}
            doc = run.side(encode(source, i), doc_rows[(iq, source, d)])
            query = run.side(encode(query_set, iq), query_rows[(q, source, d)])
            yield json.dumps(head, ensure_ascii=False)[:-1] + f', "doc": {doc}, "query": {query}}}'

    written = out_dir / "tokens.tmp"  # every source's file first, then each moved into tokens/ (os.replace)
    shutil.rmtree(written, ignore_errors=True)
    for source in sets:
        if source != query_set:
            write_lines(records(source), written / f"{source}.jsonl")
    (out_dir / "tokens").mkdir(exist_ok=True)
    for path in sorted(written.glob("*.jsonl")):
        os.replace(path, out_dir / "tokens" / path.name)
    shutil.rmtree(written, ignore_errors=True)


def by_character(tokens):
    """[[piece, start, end, contribution or None]] with a token of empty piece (a byte of a character the next
    token completes) or of the next one's span folded into that next one, contributions added (None where none
    carries loss): what the report (lark.analysis.report_data) and top_pieces show."""
    out, held = [], []
    for n, (piece, start, end, c) in enumerate(tokens):
        held.append(c)
        after = tokens[n + 1][1:3] if n + 1 < len(tokens) else None
        if after is not None and ([start, end] == list(after) or start == end == after[0]):
            continue
        kept = [x for x in held if x is not None]
        out.append([piece, start, end, sum(kept) if kept else None])
        held = []
    return out


def top_pieces(folder, n=TOP_TOKENS):
    """{(query_id, source, doc_id): "piece (+0.012), ..."} of the n document tokens of largest contribution, from
    a checkpoint's tokens/*.jsonl (the W&B top-k table's column; "by position: " first for the position split), a
    character split over byte tokens as one (by_character); {} when there are none."""
    shown = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            tokens = [t for t in by_character(record["doc"]["tokens"]) if t[3] is not None]
            best = sorted(tokens, key=lambda t: -abs(t[3]))[:n]
            split = "by position: " if record.get("split") == "position" else ""  # (a loss token's, else)
            shown[(record["query_id"], path.stem, record["doc_id"])] = split + ", ".join(
                f"{t[0]!r} ({t[3]:+.3g})" for t in best
            )
    return shown
