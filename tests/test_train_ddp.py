"""`vla_lit.train.train` under torchrun: 2 CPU processes with the gloo backend.
Both ranks must end with identical weights, the loss must go down, only rank 0 writes files, and the
result must equal a single-process run on batches twice the size (DDP averages the two half-batch
gradients; the two shards of `tensor_batches` together are exactly the single-process batch)."""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    from torch import nn
    from vla_lit.core import RunConfig
    from vla_lit.train import train, tensor_batches, dist_info

    class Linear(nn.Module):
        "Tiny linear regression mechanism with a frozen random feature layer."
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(6, 6); self.frozen.requires_grad_(False)
            self.head = nn.Linear(6, 1)
        def loss(self, batch):
            x, y = batch
            return {"loss": (self.head(self.frozen(x)) - y).pow(2).mean()}

    out, per_rank_batch = Path(sys.argv[1]), int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 6, generator=g); Y = X @ torch.randn(6, 1, generator=g) + 0.05 * torch.randn(256, 1, generator=g)
    torch.manual_seed(0); m = Linear()
    rank, _, world = dist_info()
    if rank == 1:                       # a different init on rank 1: DDP must broadcast rank 0's weights
        with torch.no_grad(): m.head.weight.add_(1.0)
    res = train(m, tensor_batches(X, Y, batch_size=per_rank_batch, generator=0), RunConfig(seed=0, steps=60, lr=1e-1, device="cpu"),
                ckpt_dir=out / "ckpt", ckpt_every=10, progress=False, weight_decay=0.0)
    torch.save({"state": res.state, "history": res.history, "world": world}, out / f"rank{rank}.pt")
''')


def _run(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def test_ddp_two_ranks_gloo(tmp_path):
    script = tmp_path / "ddp_job.py"; script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLA_LIT_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"; ddp_out.mkdir(); single_out.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(ddp_out), "16"], tmp_path, env)
    _run([sys.executable, str(script), str(single_out), "32"], tmp_path, env)

    r0, r1 = (torch.load(ddp_out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs between ranks"
    losses = [h["loss"] for h in r0["history"]]
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert [h["loss"] for h in r1["history"]] == losses            # logged losses are averaged over ranks
    # only rank 0 wrote checkpoints; the final checkpoint holds every rank's RNG/data position
    assert sorted(p.name for p in (ddp_out / "ckpt").iterdir()) == ["history.json", "last.pt"]
    ck = torch.load(ddp_out / "ckpt" / "last.pt", weights_only=False)
    assert ck["step"] == 60 and ck["world_size"] == 2 and all(x is not None for x in ck["per_rank"])
    # equal to one process on the union of the two ranks' batches (up to float summation order)
    single = torch.load(single_out / "rank0.pt", weights_only=False)
    assert single["world"] == 1
    for k in single["state"]:
        torch.testing.assert_close(r0["state"][k], single["state"][k], rtol=1e-5, atol=1e-6)
