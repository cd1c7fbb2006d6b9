"""`vla_lit.train.train` under torchrun: 2 CPU processes with the gloo backend.

One torchrun job makes several `train` calls in the same process group (the group outlives them), and
each is compared with a single-process run at the same global batch (twice the per-rank batch):
- plain regression with checkpoints: identical weights on both ranks, the loss goes down, only rank 0
  writes files, and the result equals one process on batches twice the size (DDP averages the two
  half-batch gradients; the two shards of `tensor_batches` together are exactly the single batch);
- keep-best with patience: every rank returns rank 0's best step, metric, state, stop reason, history;
- a BatchNorm in the trainable head: synchronised, 2 ranks x B equal 1 x 2B (weights and running
  statistics); with `sync_bn=False` they do not;
- gradient accumulation under DDP: 2 ranks x 2 micro-batches x B/2 equal 1 x B without accumulation.
A last, in-process test: plain accumulation over k micro-batches of B equals one batch of k x B."""
import os, subprocess, sys, textwrap
import pytest
import torch

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path
    import torch
    from torch import nn
    from vla_lit.core import RunConfig
    from vla_lit.train import train, tensor_batches, dist_info, init_distributed
    from vla_lit.features import _dist

    class Linear(nn.Module):
        "Tiny linear regression mechanism with a frozen random feature layer."
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(6, 6); self.frozen.requires_grad_(False)
            self.head = nn.Linear(6, 1)
        def loss(self, batch):
            x, y = batch
            return {"loss": (self.head(self.frozen(x)) - y).pow(2).mean()}

    class BNHead(nn.Module):
        "Regression through Linear -> BatchNorm -> Linear: the BN statistics depend on the whole batch."
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 1))   # a bias before BN has no gradient
        def loss(self, batch):
            x, y = batch
            return {"loss": (self.net(x) - y).pow(2).mean()}

    out, per_rank_batch = Path(sys.argv[1]), int(sys.argv[2])
    rank, _, world = dist_info()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 6, generator=g); Y = X @ torch.randn(6, 1, generator=g) + 0.05 * torch.randn(256, 1, generator=g)
    res = {"world": world}
    cfg = lambda steps, lr: RunConfig(seed=0, steps=steps, lr=lr, device="cpu")
    data = lambda b: tensor_batches(X, Y, batch_size=b, generator=0)

    # 1. plain regression with checkpoints
    torch.manual_seed(0); m = Linear()
    if rank == 1:                       # a different init on rank 1: DDP must broadcast rank 0's weights
        with torch.no_grad(): m.head.weight.add_(1.0)
    r = train(m, data(per_rank_batch), cfg(60, 1e-1), ckpt_dir=out / "ckpt", ckpt_every=10, progress=False,
              weight_decay=0.0)
    res["plain"] = {"state": r.state, "history": r.history}
    res["group"] = (init_distributed(), _dist(), dist_info())          # the group outlived the call

    # 2. keep-best with patience: eval_fn runs on rank 0 only, every rank returns its outcome
    script = iter([0.3, 0.5, 0.4, 0.45, 0.9])
    torch.manual_seed(0); m = Linear()
    r = train(m, data(per_rank_batch), cfg(40, 5e-2), eval_fn=lambda mm: {"acc": next(script)}, eval_every=5,
              keep_best="acc", patience=2, progress=False)
    res["best"] = {"best_step": r.best_step, "best_metric": r.best_metric, "best_state": r.best_state,
                   "stopped": r.stopped, "steps": r.steps, "state": r.state,
                   "acc": [(h["step"], h["acc"]) for h in r.history if "acc" in h]}

    # 3. BatchNorm in the trainable head, synchronised (default) and not
    for sync in (True, False):
        torch.manual_seed(0); m = BNHead()
        r = train(m, data(per_rank_batch), cfg(6, 5e-2), sync_bn=sync, progress=False, weight_decay=0.0)
        assert type(m.net[1]) is nn.BatchNorm1d                         # the original module is back
        res[f"bn_sync={sync}"] = {"state": r.state, "loss0": r.history[0]["loss"]}

    # 4. accumulation: accum_steps micro-batches of per_rank_batch / 2
    for k in (1, 2):                    # a mean over independent samples (no BatchNorm: its statistics are per micro-batch)
        torch.manual_seed(0); m = Linear()
        r = train(m, data(per_rank_batch // k), cfg(8, 5e-2), accum_steps=k, progress=False, weight_decay=0.0)
        res[f"accum={k}"] = {"state": r.state, "steps": r.steps}
    torch.save(res, out / f"rank{rank}.pt")
''')


def _run(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def _close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The torchrun job (2 ranks, per-rank batch 16) and the single process (batch 32), run once."
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ddp_job.py"; script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLA_LIT_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    ddp_out, single_out = tmp / "ddp", tmp / "single"; ddp_out.mkdir(); single_out.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(ddp_out), "16"], tmp, env)
    _run([sys.executable, str(script), str(single_out), "32"], tmp, env)
    load = lambda p: torch.load(p, weights_only=False)
    return load(ddp_out / "rank0.pt"), load(ddp_out / "rank1.pt"), load(single_out / "rank0.pt"), ddp_out


def test_ddp_two_ranks_gloo(runs):
    r0, r1, single, ddp_out = runs
    assert r0["world"] == r1["world"] == 2 and single["world"] == 1
    a, b = r0["plain"], r1["plain"]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"{k} differs between ranks"
    losses = [h["loss"] for h in a["history"]]
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert [h["loss"] for h in b["history"]] == losses            # logged losses are averaged over ranks
    # only rank 0 wrote checkpoints; the final checkpoint holds every rank's RNG/data position
    assert sorted(p.name for p in (ddp_out / "ckpt").iterdir()) == ["history.json", "last.pt"]
    ck = torch.load(ddp_out / "ckpt" / "last.pt", weights_only=False)
    assert ck["step"] == 60 and ck["world_size"] == 2 and all(x is not None for x in ck["per_rank"])
    # equal to one process on the union of the two ranks' batches (up to float summation order)
    _close(a["state"], single["plain"]["state"])


def test_process_group_outlives_train(runs):
    r0, r1, single, _ = runs
    # after a train() call the group is still there, and the feature cache's view of it agrees
    assert r0["group"] == ((0, 2), (0, 2), (0, 0, 2)) and r1["group"] == ((1, 2), (1, 2), (1, 1, 2))
    assert single["group"] == ((0, 1), (0, 1), (0, 0, 1))


def test_every_rank_returns_rank0_outcome(runs):
    r0, r1, single, _ = runs
    a, b = r0["best"], r1["best"]
    assert (a["best_step"], a["best_metric"], a["stopped"], a["steps"]) == (10, 0.5, "patience", 20)
    for key in ("best_step", "best_metric", "stopped", "steps", "acc"):
        assert a[key] == b[key] == single["best"][key], key
    assert a["acc"] == [(5, 0.3), (10, 0.5), (15, 0.4), (20, 0.45)]
    assert all(torch.equal(a["best_state"][k], b["best_state"][k]) for k in a["best_state"])
    assert not torch.equal(a["best_state"]["head.weight"], a["state"]["head.weight"])   # the best is not the last
    _close(a["best_state"], single["best"]["best_state"])


def test_sync_batchnorm_equals_global_batch(runs):
    r0, r1, single, _ = runs
    ref = single["bn_sync=True"]
    assert single["bn_sync=False"]["state"].keys() == ref["state"].keys()
    for r in (r0, r1):                                            # weights and running statistics, both ranks
        _close(r["bn_sync=True"]["state"], ref["state"])
        assert abs(r["bn_sync=True"]["loss0"] - ref["loss0"]) < 1e-5
    # unsynchronised: the running statistics differ between ranks and from the global batch
    un0, un1 = r0["bn_sync=False"]["state"], r1["bn_sync=False"]["state"]
    assert not torch.allclose(un0["net.1.running_mean"], un1["net.1.running_mean"])
    diff = max((un0[k] - ref["state"][k]).abs().max().item() for k in ref["state"] if k.endswith("weight"))
    assert diff > 1e-3, diff


def test_accumulation_under_ddp(runs):
    r0, r1, single, _ = runs
    ref = single["accum=1"]                                       # 1 process, 1 batch of 32 per update
    for r in (r0, r1):
        assert r["accum=2"]["steps"] == 8                         # steps count optimizer updates
        _close(r["accum=2"]["state"], ref["state"])               # 2 ranks x 2 micro-batches x 8
    _close(single["accum=2"]["state"], ref["state"])              # 1 process x 2 micro-batches x 16


def test_plain_accumulation_equals_big_batch():
    "One process: accum_steps=k micro-batches of B give the update of one batch of k x B (mean-of-samples loss)."
    from torch import nn
    from vla_lit.core import RunConfig
    from vla_lit.train import train, tensor_batches

    class Reg(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        def loss(self, batch):
            x, y = batch
            err = self.head(x) - y
            return {"loss": err.pow(2).mean(), "mae": err.abs().mean()}

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(256, 6, generator=g), torch.randn(256, 2, generator=g)
    runs = {}
    for k, b in ((1, 32), (4, 8)):
        torch.manual_seed(0)
        m = Reg()
        runs[k] = train(m, tensor_batches(X, Y, batch_size=b, generator=0), RunConfig(seed=0, steps=20, lr=1e-2, device="cpu"),
                        accum_steps=k, ema_decay=0.9, progress=False, device="cpu")
    assert runs[4].steps == 20 and [h["step"] for h in runs[4].history] == list(range(1, 21))
    _close(runs[4].state, runs[1].state)
    _close(runs[4].ema_state, runs[1].ema_state)
    for h1, h4 in zip(runs[1].history, runs[4].history):           # logged: the mean over the micro-batches
        assert abs(h1["loss"] - h4["loss"]) < 1e-5 and abs(h1["grad_norm"] - h4["grad_norm"]) < 1e-5
