"""Data-parallel training: data split by rank and DataLoader worker, and a real two-process torchrun on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from clipforge.model.data import SequenceBuilder, ShardStream, make_loader, shard_urls
from clipforge.model.config import CogVideoConfig
from clipforge.model.checkpoint import load_checkpoint
from clipforge.tokenizer.text import TextTokenizer


def keys_of(dataset_dir, rank, world, workers):
    text = TextTokenizer(dataset_dir / "text.model")
    cfg = CogVideoConfig(text_vocab=text.vocab_size, image_vocab=64, n_layer=1, n_head=1, n_embd=8, text_slot=12,
                         frames=5, tokens_h=4, tokens_w=4, window=2, shift=1)
    stream = ShardStream(shard_urls(dataset_dir, "train"), SequenceBuilder(cfg, text, "sequential"), shuffle=True,
                         repeat=False, seed=5, open_shards=2, rank=rank, world_size=world)
    return [k for _, _, keys, _ in make_loader(stream, 4, workers) for k in keys]


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2)])
def test_ranks_and_workers_partition_an_epoch(model_dataset, world, workers):
    """2 shards over 2 slots split by shard; over 4 slots (2 ranks x 2 workers) by sample: either way every
    sample of the epoch goes to exactly one (rank, worker)."""
    per_rank = [keys_of(model_dataset, r, world, workers) for r in range(world)]
    everything = keys_of(model_dataset, 0, 1, 0)
    assert len(everything) == 80
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)


def test_torchrun_two_ranks_disjoint_samples_identical_weights(model_dataset, tmp_path):
    """`torchrun --nproc_per_node 2 … train`: gloo on CPU, gradient accumulation to a global batch of 8
    (2 ranks x batch 2 x 2 micro-steps); the ranks train on disjoint samples and hold identical weights."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clipforge.jobs.cli", "train", str(model_dataset), "--out", str(run), "--steps", "3",
           "--batch-size", "2", "--global-batch", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
           "--lr", "3e-3", "--log-interval", "1", "--ckpt-interval", "2", "--record-keys", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["grad_accum"] == 2 and summary["global_batch"] == 8
    seen = {}
    for rank in (0, 1):
        lines = [line.split() for line in (run / "keys" / f"rank{rank}.txt").read_text().splitlines()]
        assert [int(s) for s, _ in lines] == [1] * 4 + [2] * 4 + [3] * 4      # 2 micro-batches of 2 per step
        seen[rank] = {k for _, k in lines}
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]
    for ckpt in (torch.load(run / "ckpt_000002.pt", weights_only=True), load_checkpoint(run)):
        digests = ckpt["rank_weights_sha256"]
        assert ckpt["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert load_checkpoint(run)["step"] == 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_with_c10d_rendezvous(model_dataset, tmp_path):
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`: two agents (as on two machines) meet at
    one rendezvous endpoint on loopback; the two ranks train on disjoint samples and end with equal weights."""
    run = tmp_path / "two-nodes"
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "clipforge-test",
           "-m", "clipforge.jobs.cli", "train", str(model_dataset), "--out", str(run), "--steps", "3",
           "--batch-size", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--lr", "3e-3",
           "--ckpt-interval", "3", "--record-keys", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    summary = json.loads([out for out, _ in outputs if out.strip()][0].strip().splitlines()[-1])
    assert summary["world_size"] == 2
    seen = [{line.split()[1] for line in (run / "keys" / f"rank{rank}.txt").read_text().splitlines()}
            for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]
    digests = load_checkpoint(run)["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
