"""Where the factored projector's error lives: each parameter's slot's error against its exact share of the cosine.

    python benchmarks/factored_error.py --run <run> --epoch 3 --kernel adam --set train   # queries x FT items
    python benchmarks/factored_error.py --run <run> --epoch 3 --kernel adam --set pool    # queries x abstracts
    python benchmarks/factored_error.py ... --vocab factored                               # Bergson's treatment

For `--queries` test queries and `--docs` examples of the set (a run's fine-tuning items, or validate.py's pool of
abstracts), at one checkpoint of a `python train.py` run: every example's exact per-example gradient (autograd; the
kernel's Adam correction applied when it has one) and its factored vector (attribution/projector=factored at the
run's k, the kernel's options). The cosine of a pair is a sum over parameters, cos = sum_p <g_p, h_p> / (|g| |h|),
and the projected one the same sum over the parameters' slots, so each slot's error (its projected share minus
its exact share) is printed by module kind: its error variance over the pairs, its share of the summed
variances, and the mean |exact share|. Per-tensor normalisation (rapidin) is not split this way (use cosine).
"""

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lark.data.datamodule import collate  # noqa: E402
from lark.data.formats import encode  # noqa: E402
from lark.kernel.factory import make_kernel, make_projector  # noqa: E402
from lark.kernel.projectors import example_gradient, trainable  # noqa: E402
from lark.validation.load import CONF, load_run  # noqa: E402
from lark.validation.scores import checkpoint_moments, kernel_config, with_projector  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory written by train.py")
    ap.add_argument("--epoch", type=int, default=3)
    ap.add_argument("--kernel", default="adam", help="cosine | adam | trackstar (conf/attribution/kernel)")
    ap.add_argument("--set", default="train", choices=["train", "pool"])
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--vocab", default=None, help="attribution.projector.vocab (default: the config's)")
    args = ap.parse_args()
    run = load_run(args.run, OmegaConf.load(CONF / "validate.yaml"), log=lambda *a: None)
    checkpoint = args.run / "checkpoints" / f"epoch_{args.epoch:03d}"
    model = AutoModelForCausalLM.from_pretrained(checkpoint).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    attr = with_projector(kernel_config(run.cfg, args.kernel), run.cfg, "factored")
    if args.vocab:
        attr.projector.vocab = args.vocab
    kernel = make_kernel(attr)
    if kernel.normalizer.needs_norms:
        raise SystemExit("per-tensor normalisation does not split by slot: use --kernel cosine, adam or trackstar")
    projector = make_projector(attr, model, kernel, checkpoint_moments(kernel, checkpoint))
    docs = run.train_fields if args.set == "train" else run.pool
    examples = run.queries[: args.queries] + docs[: args.docs]
    encoded = [encode(tokenizer, e, run.cfg.format, run.cfg.max_length) for e in examples]
    pad, n_q = tokenizer.pad_token_id, min(args.queries, len(run.queries))
    vectors = torch.cat(
        [projector.project_batch(model, collate(encoded[i : i + 8], pad)) for i in range(0, len(encoded), 8)]
    )
    pre, params = projector.precondition, trainable(model)
    grads = []
    for e in encoded:
        g = example_gradient(model, collate([e], pad), params)[1]
        grads.append(pre.apply(g) if pre is not None else g)
    names = list(projector.slots)
    norms = torch.stack([torch.cat([g[n].flatten().double() for n in names]) for g in grads]).norm(dim=1)
    scale = norms[:n_q, None] * norms[None, n_q:]
    groups, start, total = collections.defaultdict(lambda: [0.0, 0.0]), 0, 0
    for name in names:
        size = projector.slots[name][0]
        slot = vectors[:, start : start + size].double()
        start += size
        flat = torch.stack([g[name].flatten().double() for g in grads])
        exact = flat[:n_q] @ flat[n_q:].T / scale
        error = slot[:n_q] @ slot[n_q:].T / scale - exact
        total = total + error
        kind = name.split(".")[-2] if ".layers." in name else name
        groups[kind][0] += float(error.pow(2).mean())
        groups[kind][1] += float(exact.abs().mean())
    summed = sum(v for v, _ in groups.values())
    print(
        f"# {args.run} epoch {args.epoch}, kernel {args.kernel}, {n_q} queries x {len(examples) - n_q} {args.set}, "
        f"factored k = {projector.k} ({projector.spec()['vocab']}); cosine error std {float(total.std()):.4f}"
    )
    print(f"{'slot (module kind)':28s} {'err. var.':>10s} {'share':>7s} {'mean |exact|':>13s}")
    for kind, (variance, exact) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"{kind:28s} {variance:10.2e} {variance / summed:7.1%} {exact:13.4f}")


if __name__ == "__main__":
    main()
