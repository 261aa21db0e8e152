"""The position split from the store pass itself (attribution.tokens_split: position with attribution/projector=
factored): no second pass for the examples whose pieces it kept.

The `factored` projector's hooks hold every parameter's per-example block position by position before summing it:
a factored matrix's block is scale * sum_s a_s c_s^T (a_s = P_out delta_s, c_s = P_in x_s, with the Adam correction's
factors applied, lark.kernel.factored), a TensorSketched matrix's and a 1-D parameter's slot is a sum of one vector
per position. So the example's raw vector splits exactly, r = sum_s r_s, and a position's part of a pair's score
(lark.kernel.tokens: c_s = <w, r_s> with w = M^T v_partner / ||M r||) is, slot by slot,

    scale / N * a_s^T W c_s  (W the slot of w as [r_out, r_in])   or   <w_slot, r_s slot> / N,

N the per-tensor norm of rapidin's normalisation (1 otherwise): r_out + r_in numbers per position and factored
matrix (not out x in), read in one small product per partner. These are the numbers the second pass
(lark.kernel.tokens_position) computes, there from a new forward and backward pass of the example: the same math on
the same gradients, equal up to float32 summation order in a float32 model (tests/test_tokens.py: per-tensor norms,
the Adam factors, each vocabulary treatment, a tied weight, biases, per-head norms, count-sketched 1-D slots, and end
to end through attribute.py); in bf16 the kept parts carry the store pass's own rounding (its sides in the model's
dtype), so they add up to the stored vector where the second pass's float32 ones differ from it by bf16's rounding
(those kept after the store pass, by `in_batches`, to their own projection's, in another batch).

`Kept` holds them for the examples that can be in a written pair: every query (each has partners) and, per
source, the documents in some query's running top attribution.tokens_top_k by the raw vectors' cosine, dropped when
they fall out; a kernel that whitens (TrackStar: its map comes from the finished stores) keeps the queries only.
The token pass reads each example's pieces once and lets them go. Then `in_batches` keeps the pieces of the written
pairs' other examples (a store or shard reused, `attribute.py` adding tokens to a finished run, TrackStar's
documents, those past attribution.tokens_kept numbers while the store pass ran, a near-tie the stored tier ranks
otherwise, another rank's) by projecting them again, attribution.batch_size at a time, with the hooks keeping:
a forward and backward pass per batch instead of the second pass's one per example. Only an example none of these
holds (past the budget, a non-finite vector, a module not one row per position; every one with tokens_kept = 0)
goes through the second pass, as does every example under any other projector.
"""

from dataclasses import dataclass

import torch

from lark.kernel.build import project_examples
from lark.kernel.factored_math import Factors, Rows
from lark.kernel.tokens_math import slot_spans


class Kept:
    """The pieces by position of the examples a store pass kept, {(set, index): Example} (each parameter's Factors,
    Rows or [T, size] slot by position, a tied weight's two parts both, the per-tensor norm folded in).

    projector: the FactoredProjector of the pass; top_k: attribution.tokens_top_k; budget: attribution.tokens_kept
    (numbers held at most); whitens: the kernel's (the store pass then keeps no documents; in_batches does)."""

    def __init__(self, projector, top_k, budget, whitens=False):
        self.projector, self.top_k, self.budget, self.whitens = projector, int(top_k), int(budget), whitens
        self.spans = {  # the store's layout, parameter by parameter: (start, size, (r_out, r_in) or None)
            name: (span.start, span.stop - span.start, how if isinstance(how, tuple) else None)
            for name, span, how in slot_spans(projector)
        }
        self.examples, self.sizes, self.best, self.shared = {}, {}, None, {}  # shared: index tensors, CPU hashes

    def start(self, name, queries=None):
        """The callable project_examples calls after each batch of set `name` (None: nothing kept of it); queries:
        the query set's stored unit vectors (None while that set itself is built: all of it is kept)."""
        self.best = None
        self.queries = None if queries is None else torch.nan_to_num(queries.float(), nan=0.0)
        keep = self.budget > 0 and (queries is None or not self.whitens)
        self.projector.keep_positions = keep and self.held() < self.budget
        return (lambda index, vectors, mask: self.take(name, index, vectors, mask)) if keep else None

    def stop(self):
        self.projector.keep_positions, self.projector.last_positions, self.best = False, None, None

    def held(self):
        return sum(self.sizes.values())

    def take(self, name, index, vectors, mask):
        """Keeps the pieces of a batch's examples (index: their positions in set `name`, vectors [B, k] their raw
        vectors, mask [B, T] their attention mask) that may be in a pair; drops the documents no longer in one.
        The hooks make pieces only while the budget has room (a document dropped makes room again)."""
        wanted = self.admitted(name, index, vectors)
        dropped = [key for key in self.examples if key[0] == name and key[1] not in wanted]
        for key in dropped if self.queries is not None else ():  # (the queries: all kept)
            self.release(key)
        self.hold([(b, (name, i)) for b, i in enumerate(index) if i in wanted], vectors, mask)

    def hold(self, slots, vectors, mask):
        """Keeps the pieces the projector's last batch made (vectors [B, k] its raw vectors, mask [B, T] its
        attention mask) of the examples slots [(row in the batch, (set, index))], while the budget has room; the
        hooks make pieces only while it has."""
        positions, norms = self.projector.last_positions or {}, self.projector.last_norms
        self.projector.last_positions = None  # (the batch's pieces go with it)
        if not all(by_position(x, mask.shape[1]) for xs in positions.values() for x in xs):
            positions = {}  # a module whose rows are not one per position: the second pass says so
        for b, key in slots:
            if not positions or not torch.isfinite(vectors[b]).all():
                continue
            length = int(mask[b].sum())
            found = [(p, piece_of(x, b, length, norms.get(p), self.cpu)) for p, xs in positions.items() for x in xs]
            example = Example.of(found, self.spans, self.shared)
            if self.held() + example.numel <= self.budget:
                self.examples[key], self.sizes[key] = example, example.numel
        self.projector.keep_positions = self.held() < self.budget

    def release(self, key):
        """Forgets example key (set, index): its parts were read, or it fell out of every top_k."""
        self.examples.pop(key, None), self.sizes.pop(key, None)

    def cpu(self, t):
        """A CPU copy of a tensor the projector keeps (a hash), made once."""
        key = ("cpu", id(t))
        if key not in self.shared:
            self.shared[key] = t.cpu()
        return self.shared[key]

    def admitted(self, name, index, vectors):
        """The indices of set `name` to keep: all (the queries), else those in some query's running top_k."""
        if self.queries is None:
            return set(index)
        unit = vectors.float() / vectors.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
        scores = torch.nan_to_num(self.queries @ unit.to(self.queries.device).T, nan=-torch.inf)  # [Q, B]
        ids = torch.tensor(index).expand(len(scores), -1)
        if self.best is not None:
            scores, ids = torch.cat([self.best[0], scores], 1), torch.cat([self.best[1], ids], 1)
        top = scores.topk(min(self.top_k, scores.shape[1]), dim=1)
        self.best = top.values, ids.gather(1, top.indices)
        return set(self.best[1].flatten().tolist())

    def parts(self, name, i, w):
        """[m, T] the position parts <w_j, r_s> of example i of set `name` for the rows w [m, k] (float32, on the
        pieces' device), or None when it was not kept."""
        example = self.examples.get((name, i))
        return None if example is None else example.parts(w.float())


def in_batches(kept, jobs, encode, model, pad_id, batch_size):
    """The token pass's jobs [(set, index, partners)] in the order it takes them (each batch's examples read and let
    go before the next is kept): those whose pieces the store pass kept first, then the rest by length, batch_size
    at a time, each batch's pieces made by one projection of the whole batch with keep_positions on (keep_batch: a
    forward and a backward pass, nothing stored), so that they need no second pass of lark.kernel.tokens_position,
    one forward and backward per example. What a keeping projection cannot hold (over the budget, a non-finite
    vector, a module not one row per position) still takes it; once a batch keeps none of its examples, the rest go
    to it as one batch without more keeping projections, as every one does with budget 0. encode(set, index): the
    example's encoding."""
    keys = {job[:2] for job in jobs}
    for key in [key for key in kept.examples if key not in keys]:  # (kept in a running top_k, not in the final)
        kept.release(key)
    ready = [job for job in jobs if job[:2] in kept.examples]
    length = lambda job: len(encode(*job[:2])["input_ids"])  # noqa: E731
    rest = sorted((job for job in jobs if job[:2] not in kept.examples), key=length)
    if ready:
        yield ready
    while rest and kept.budget > 0:
        batch, rest = rest[:batch_size], rest[batch_size:]
        if not keep_batch(kept, model, [job[:2] for job in batch], [encode(*job[:2]) for job in batch], pad_id):
            rest = batch + rest  # (nothing held: keeping more would only add passes)
            break
        yield batch
    if rest:
        yield rest


def keep_batch(kept, model, keys, encoded, pad_id):
    """Keeps the pieces by position of the examples keys [(set, index)] (encoded: theirs) from one projection of
    them as a batch (lark.kernel.build.project_examples, as the store pass: the same vectors up to float rounding,
    an example's does not depend on its batch). Returns how many it kept."""
    before = len(kept.examples)
    hold = lambda index, vectors, mask: kept.hold([(b, keys[i]) for b, i in enumerate(index)], vectors, mask)  # noqa: E731
    try:
        kept.projector.keep_positions = kept.held() < kept.budget
        project_examples(model, encoded, kept.projector, pad_id, len(encoded), desc="keeping pieces", keep=hold)
    finally:  # (a failed projection leaves the projector as it found it)
        kept.stop()
    return len(kept.examples) - before


@dataclass
class Example:
    """One kept example's pieces, gathered for a few products per partner batch: the factored blocks grouped by
    their ranks (columns [P, r_out r_in] of the vector, a [P, T, r_out], c [P, T, r_in], scales [P]), every slot
    by position side by side (columns [S], values [T, S]; a tied weight's two parts repeat its columns) and the
    embedding's Rows with their slot's (start, size)."""

    groups: list
    dense: tuple | None
    rows: list
    numel: int

    @staticmethod
    def of(found, spans, shared):
        """From [(parameter, piece)] and Kept.spans; shared: Kept's cache of index tensors (the same for every
        example)."""

        def span(start, size):
            if ("span", start, size) not in shared:
                shared[("span", start, size)] = torch.arange(start, start + size)
            return shared[("span", start, size)]

        by_ranks, columns, values, rows = {}, [], [], []
        for param, piece in found:
            start, size, ranks = spans[param]
            if isinstance(piece, Factors):
                by_ranks.setdefault(ranks, []).append((start, piece))
            elif isinstance(piece, Rows):
                rows.append((start, size, piece))
            else:
                columns.append(span(start, size))
                values.append(piece)
        groups = []
        for (r_out, r_in), pieces in by_ranks.items():
            starts = ("group", *(start for start, _ in pieces))
            if starts not in shared:
                shared[starts] = torch.stack([span(start, r_out * r_in) for start in starts[1:]])
            index = shared[starts]
            a, c = torch.stack([p.a for _, p in pieces]), torch.stack([p.c for _, p in pieces])
            groups.append((index, a, c * torch.tensor([p.scale for _, p in pieces]).view(-1, 1, 1)))
        dense = None
        if values:
            key = ("dense", *(int(c[0]) for c in columns))
            if key not in shared:
                shared[key] = torch.cat(columns)
            dense = shared[key], torch.cat(values, dim=1)
        numel = sum(a.numel() + c.numel() for _, a, c in groups) + sum(r.numel() for *_, r in rows)
        return Example(groups, dense, rows, numel + (dense[1].numel() if dense else 0))

    def parts(self, w):
        """[m, T] from rows w [m, k]: sum over groups of a_s^T W c_s, plus the slots' and rows' products."""
        out, m = 0, len(w)
        for index, a, c in self.groups:  # (a_s^T W for every s, row and matrix: one batched GEMM over the P matrices)
            (n, t, r_out), r_in = a.shape, c.shape[-1]
            slots = w[:, index].view(m, n, r_out, r_in).permute(1, 2, 0, 3).reshape(n, r_out, m * r_in)
            out = out + (torch.bmm(a, slots).view(n, t, m, r_in) * c.unsqueeze(2)).sum((0, 3)).T
        if self.dense is not None:
            out = out + w[:, self.dense[0]] @ self.dense[1].T
        for start, size, piece in self.rows:
            out = out + piece.product(w[:, start : start + size])
        return out


def by_position(found, width):
    """Whether a batch's piece has one row per position on axis 1 (of the batch's `width`)."""
    if isinstance(found, Factors):
        return found.a.dim() == found.c.dim() == 3 and found.a.shape[1] == found.c.shape[1] == width
    if isinstance(found, Rows):
        return found.tokens.shape[1] == width and found.e.shape[1] == width
    return found.dim() == 3 and found.shape[1] == width


def piece_of(found, b, length, norm, cpu):
    """Example b's piece of a batch's (its first `length` positions, copied to the CPU), divided by its per-tensor
    norm (a zero gradient stays zero, as in the store); cpu: Kept.cpu (the hashes' CPU copies)."""
    scale = 1.0 if norm is None else 1.0 / float(norm[b].clamp_min(1e-30))
    if isinstance(found, Factors):
        return Factors(found.a[b, :length].cpu(), found.c[b, :length].cpu(), found.scale * scale)  # (Example stacks)
    if isinstance(found, Rows):
        e, hashes = found.e[b, :length].cpu().clone(), [tuple(map(cpu, h)) for h in (found.out_hash, found.in_hash)]
        return Rows(found.tokens[b, :length].cpu(), e, *hashes, found.size, scale)
    return (found[b, :length] * scale).cpu()
