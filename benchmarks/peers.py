"""Peer projectors for the benchmark, behind the same project_batch(model, batch) interface as LARK's.

Each materialises the per-example gradients (one backward per example, as those libraries do on a CPU) and then
applies the peer's own projection; the Captum rows get theirs from Captum's own TracInCP code. Installed by
`pip install -e ".[peers]"` (never in the default install; the extra leaves the installed torch alone). Missing
packages give None, and the benchmark prints why.
"""

import tempfile
import warnings
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy

from lark.kernel.projectors import ExactProjector, trainable


class PeerProjector:
    """Materialised per-example gradients [B, P] -> a peer library's projection [B, k]."""

    def __init__(self, model, k, project):
        self.k, self.project = k, project
        self.flat = ExactProjector({n: tuple(p.shape) for n, p in trainable(model)})

    def project_batch(self, model, batch):
        return self.project(self.flat.project_batch(model, batch))


def trak_basic(model, k, seed=0):
    """TRAK's BasicProjector (traker): a dense Rademacher matrix generated block by block at every call."""
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return None
    grad_dim = sum(p.numel() for _, p in trainable(model))
    proj = BasicProjector(
        grad_dim=grad_dim, proj_dim=k, seed=seed, proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32
    )
    return PeerProjector(model, k, lambda grads: proj.project(grads, model_id=0))


def dattri_random(model, k, seed=0, batch=8):
    """dattri's random_project on a CPU (its dense `normal` projection; SJLT and GraSS need CUDA)."""
    try:
        from dattri.func.projection import random_project
    except ImportError:
        return None
    grad_dim = sum(p.numel() for _, p in trainable(model))
    fn = random_project(torch.zeros(batch, grad_dim), batch, k, batch, proj_seed=seed, proj_type="normal", device="cpu")
    return PeerProjector(model, k, fn)


class Logits(torch.nn.Module):
    """The LM as Captum calls it: forward(input_ids, attention_mask) -> logits [B, T, V]."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class TokenRows(Logits):
    """Logits [B*T, V] with the output layer applied to hidden states [B*T, H]: one row per token."""

    def forward(self, input_ids, attention_mask):
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return self.lm.get_output_embeddings()(hidden.flatten(0, 1))


class ExampleLoss(torch.nn.Module):
    """Per-example loss [B] (Captum's "per-example" loss_fn, reduction none): the mean next-token cross-entropy
    over the example's loss tokens (labels -100 ignored), i.e. what HF computes for a batch of one."""

    reduction = "none"

    def forward(self, logits, labels):
        labels = labels[:, 1:]
        tokens = cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="none")
        return tokens.sum(1) / (labels != -100).sum(1)


def load_checkpoint(wrapper, path):
    """Captum's checkpoints_load_func: load the saved state into the model, return the learning rate."""
    wrapper.lm.load_state_dict(torch.load(path))
    return 1.0


class NoIndex:
    """TracInCPFastRandProj builds a nearest-neighbour index (Annoy) over its training set; we only read vectors."""

    def setup(self, data):
        pass


class CaptumPeer:
    """Captum's compute_intermediate_quantities -> [B, k]. Its checkpoint is the model as it was at make(),
    saved once to a temporary file (Captum loads it at every call; the parameters keep their values)."""

    def __init__(self, model, k, build, rows):
        self.k, self.rows, self.tmp = k, rows, tempfile.TemporaryDirectory()
        path = str(Path(self.tmp.name) / "model.pt")
        torch.save(model.state_dict(), path)
        flags = [p.requires_grad for p in model.parameters()]
        with torch.random.fork_rng(), warnings.catch_warnings():  # Captum seeds the global generator
            warnings.filterwarnings("ignore", message=".*entire `train_dataset`")  # ours is one probe batch
            self.tracin = build([path])
        for p, flag in zip(model.parameters(), flags):  # TracInCPFast sets requires_grad on its layer
            p.requires_grad_(flag)

    def project_batch(self, model, batch):
        return self.rows(self.tracin, batch).float()


def captum_tracincp(model, k=None):
    """Captum's TracInCP over all parameters (layers=None), one checkpoint: each row is the example's full
    gradient (k = P whatever k is asked, no projection). sample_wise_grads_per_batch=False, so loss_fn is
    per-example (reduction none) and Captum runs one forward on the batch and one autograd.grad per example
    (each back through the whole batch's graph: B full-batch backwards). Its batched trick (True, loss reduced
    by sum) hooks only nn.Linear / nn.Conv2d, so on an LM it silently leaves out the embeddings and norms, and
    it leaves .grad and .sample_grad set on the parameters."""
    try:
        from captum.influence import TracInCP
    except ImportError:
        return None

    def build(checkpoints):
        return TracInCP(
            Logits(model),
            [],
            checkpoints,
            load_checkpoint,
            layers=None,
            loss_fn=ExampleLoss(),
            sample_wise_grads_per_batch=False,
        )

    def rows(tracin, batch):
        return tracin.compute_intermediate_quantities((batch["input_ids"], batch["attention_mask"], batch["labels"]))

    return CaptumPeer(model, sum(p.numel() for p in model.parameters()), build, rows)


def captum_fast_rand_proj(model, k, seed=0):
    """Captum's TracInCPFastRandProj at projection_dim=k: the output layer's (lm_head's) gradient only.

    Its trick assumes one row per example: the final layer's gradient is the outer product g a^T of the
    gradient g of the model's [B, V] output and the layer's [B, H] input a, projected as (R_g^T g)(R_a^T a)^T
    with R_g [V, sqrt k], R_a [H, sqrt k]. An LM example's lm_head gradient is a sum over its tokens,
    G = sum_t g_t a_t^T / n, not one outer product, so the model is presented token by token (TokenRows: rows
    [B*T, V], layer input [B*T, H], loss_fn = summed token cross-entropy, labels shifted, -100 ignored) and the
    token rows of an example are summed and divided by its n loss tokens: the projection is linear, so this is
    exactly R_g^T G R_a. Captum projects to min(sqrt k, V) x min(sqrt k, H) (no projection if V*H <= k), fewer
    than k on a narrow model: the rest of the k columns are zeros.
    """
    try:
        from captum.influence import TracInCPFastRandProj
    except ImportError:
        return None
    device = next(model.parameters()).device
    probe = torch.utils.data.DataLoader(  # Captum reads V and H from one batch of its "training set"
        [
            (
                torch.zeros(1, 2, dtype=torch.long, device=device),
                torch.ones(1, 2, dtype=torch.long, device=device),
                torch.zeros(2, dtype=torch.long, device=device),
            )
        ],
        batch_size=None,
    )

    def build(checkpoints):
        return TracInCPFastRandProj(
            TokenRows(model),
            model.get_output_embeddings(),
            probe,
            checkpoints,
            load_checkpoint,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
            nearest_neighbors=NoIndex(),
            projection_dim=k,
            seed=seed,
        )

    def rows(tracin, batch):
        labels = batch["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        tokens = tracin.compute_intermediate_quantities(
            (batch["input_ids"], batch["attention_mask"], targets.flatten())
        )
        examples = tokens.view(*labels.shape, -1).sum(1) / (targets != -100).sum(1, keepdim=True)
        return torch.nn.functional.pad(examples, (0, k - examples.shape[1]))

    return CaptumPeer(model, k, build, rows)


PEERS = {
    "TRAK BasicProjector": trak_basic,
    "dattri random_project": dattri_random,
    "Captum TracInCP": captum_tracincp,
    "Captum TracInCPFastRandProj": captum_fast_rand_proj,
}
