"""Shared test settings: offline everything, one tiny-model cache per session, the small run overrides."""

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# A run small enough for a test (seconds on 2 cores) that still exercises every stage.
SMALL = [
    "data.world.n_train=24",
    "data.world.n_test=12",
    "data.world.n_facts=30",
    "data.world.n_medical_docs=100",
    "data.world.n_entertainment_docs=40",
    "model.tokenizer.vocab_size=512",
    "model.pretrain.steps=20",
    "model.pretrain.batch_size=8",
    "model.pretrain.max_length=64",
    "source.size=8",
    "max_length=128",
    "attribution.projector.k=512",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No hub, W&B offline, and a session-wide cache for the tiny pretrained model."""
    os.environ["PROJECT_ROOT"] = str(ROOT)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("LARK_CACHE", str(tmp_path_factory.mktemp("lark_cache")))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any connection that leaves this machine (loopback and local sockets stay allowed)."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if not (host.startswith("127.") or host in ("localhost", "::1")):
                raise OSError(f"network access blocked in tests: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


# The 2-layer, 64-wide OLMo-3 the kernel tests build (lark.models.build_tiny's model config)
TINY_OLMO3 = {"config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}}
TINY_OLMO3["config"].update(num_key_value_heads=4, max_position_embeddings=256)


def compose(overrides=(), config_name="train"):
    """The real Hydra config, composed as train.py would (without the hydra runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def data_spec(name, **over):
    """The shipped `data=<name>` config as a plain dict (paths resolved), with dotted-key overrides."""
    from omegaconf import OmegaConf

    cfg = compose([f"data={name}", *[f"data.{k}={v}" for k, v in over.items()]]).data
    return OmegaConf.to_container(cfg, resolve=True)


def official_test_ids():
    """The 500 official PubMedQA test PMIDs shipped with LARK (conf/data/pubmedqa.yaml's data.test_ids)."""
    from lark.data.readers import read_ids

    return read_ids((ROOT / "lark" / "resources" / "pubmedqa_test_pmids.txt").read_text().splitlines())


def load_pubmedqa_local(path, test_ids=None, bad=None):
    """PubMedQA rows of a local JSON Lines file through data=pubmedqa_local's mapping (train, test)."""
    from lark.data.io import BadRows
    from lark.data.readers import JsonlRows, split_qa

    bad = bad or BadRows()
    return split_qa(*JsonlRows(path)(bad), data_spec("pubmedqa_local"), test_ids, bad, str(path))


def load_pubmedqa_hub(hub_id, hub_config, hub_split="train", test_ids=None, bad=None):
    """PubMedQA rows of a `datasets` dataset through data=pubmedqa's mapping, split by the official test ids."""
    from lark.data.io import BadRows
    from lark.data.readers import HubRows, split_qa

    bad = bad or BadRows()
    rows = HubRows(hub_id, hub_config, hub_split)(bad)
    return split_qa(
        *rows,
        data_spec("pubmedqa"),
        official_test_ids() if test_ids is None else test_ids,
        bad,
        f"{hub_id}/{hub_config}",
    )


@pytest.fixture
def one_thread():
    """One torch thread, like the subprocess runs: bit-identical results need the same thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_with_norms():
    """(tokenizer, model, texts): a random-init tiny OLMo-3 on one thread with its norm weights drawn away from 1 (so
    a norm's gradient is not its input's), and the world texts its tokenizer was trained on."""
    import torch
    from omegaconf import OmegaConf

    from lark.data.world import generate_world
    from lark.models import build_tiny, train_tokenizer

    torch.set_num_threads(1)
    world = generate_world(seed=0, n_train=10, n_test=5, n_facts=10, n_medical_docs=60, n_entertainment_docs=20)
    texts = [d["text"] for d in world.medical_docs + world.entertainment_docs]
    tok = train_tokenizer(texts, 400)
    torch.manual_seed(0)
    model = build_tiny(OmegaConf.create(TINY_OLMO3), tok).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return tok, model, texts
