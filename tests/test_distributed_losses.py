"""The losses room and Sinkhorn across 2 CPU processes (gloo): N ranks x B equals 1 process x N*B.

One `torch.multiprocessing` spawn of 2 ranks runs every check (float64) and saves what it measured; the
tests below read it. The 1-process references are computed in the same workers with `gather=False` /
`dist_rows=False` on the concatenated batch. open_clip's `ClipLoss(gather_with_grad=True)` is the oracle
for the gathered loss value and its gradients."""
import math, os, socket, warnings
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
SPLIT = (5, 7)                      # uneven rows per rank (a short last batch) for the checks that allow it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head(nn.Module):
    "Two tiny linear projections and a learnable logit scale; the loss is `loss_fn(zi, zt, scale)`."
    def __init__(self, loss_fn):
        super().__init__()
        self.img, self.txt = nn.Linear(6, 4).double(), nn.Linear(5, 4).double()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.loss_fn = loss_fn

    def forward(self, x, y):
        zi, zt = F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1)
        return self.loss_fn(zi, zt, self.log_scale.exp())


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _maxdiff(a, b):
    if isinstance(a, dict):
        return max(_maxdiff(a[k], b[k]) for k in a)
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def _loss_case(rank, loss_fn, X, Y, rows):
    "Loss and DDP-averaged gradients of `loss_fn` on this rank's `rows`, and the 1-process reference."
    from vla_lit.losses import clip_loss
    torch.manual_seed(0)
    ref = Head(lambda zi, zt, s: clip_loss(zi, zt, s, gather=False))
    ref_loss = ref(X, Y)
    ref_loss.backward()
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Head(loss_fn))
    loss = ddp(X[rows], Y[rows])
    loss.backward()
    return {"loss": _maxdiff(loss.detach(), ref_loss.detach()),
            "grad": _maxdiff(_grads(ddp.module), _grads(ref)), "value": float(loss.detach())}


def _infonce_checks(rank, out):
    from open_clip.loss import ClipLoss
    from vla_lit.losses import clip_loss, gather_features
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    even = slice(6 * rank, 6 * rank + 6)
    uneven = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], sum(SPLIT))
    out["ours"] = _loss_case(rank, clip_loss, X, Y, even)
    out["ours_uneven"] = _loss_case(rank, clip_loss, X, Y, uneven)
    by_temperature = lambda zi, zt, s: clip_loss(zi, zt, temperature=1 / s)     # VLAP's contrastive form
    out["ours_temperature"] = _loss_case(rank, by_temperature, X, Y, even)
    for local in (False, True):
        oc = ClipLoss(local_loss=local, gather_with_grad=True, rank=rank, world_size=WORLD)
        r = _loss_case(rank, oc, X, Y, even)
        mean = torch.tensor(r["value"], dtype=torch.float64)
        dist.all_reduce(mean)                                   # local_loss: the mean over ranks is the loss
        r["mean_value"] = float(mean) / WORLD
        out[f"open_clip_local{local}"] = r
    x = torch.randn(SPLIT[rank], 3, dtype=torch.float64, requires_grad=True)
    gx = gather_features(x)
    gx.sum().backward()
    allx = [torch.zeros(s, 3, dtype=torch.float64) for s in SPLIT]
    dist.all_gather_object(allx, x.detach())
    out["gather_rows"] = _maxdiff(gx.detach(), torch.cat(allx))
    out["gather_grad_is_local"] = bool(torch.equal(x.grad, torch.ones_like(x)))
    zi, zt = F.normalize(X[even], dim=-1), F.normalize(torch.randn(6, 6, generator=g, dtype=torch.float64), dim=-1)
    with torch.no_grad():                                       # evaluation: local, no collective
        out["nograd_local"] = _maxdiff(clip_loss(zi, zt, 5.0), clip_loss(zi, zt, 5.0, gather=False))


def _sinkhorn_checks(rank, out):
    from vla_lit.sinkhorn import sinkhorn
    g = torch.Generator().manual_seed(2)
    B, K = sum(SPLIT), 37
    S = torch.randn(3, B, K, generator=g, dtype=torch.float64)
    a = torch.rand(B, generator=g, dtype=torch.float64) + 0.1
    a = a / a.sum()
    b = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    b = b / b.sum()
    rows = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], B)
    cases = {"3 iters, a and b": dict(epsilon=0.1, n_iters=3, a=a, b=b),
             "tol 1e-11": dict(epsilon=0.2, tol=1e-11, b=b),
             "rows, uniform": dict(epsilon=0.05, n_iters=5, normalize="rows"),
             "eps 1e-3 (rebuilds)": dict(epsilon=1e-3, n_iters=10),
             "cost, cols": dict(epsilon=0.1, n_iters=3, is_cost=True, normalize="cols")}
    diffs = {}
    for name, kw in cases.items():
        full = sinkhorn(S, full=True, dist_rows=False, **kw)
        kw_r = {**kw, "a": kw["a"][rows]} if "a" in kw else kw
        part = sinkhorn(S[:, rows], full=True, dist_rows=True, **kw_r)
        diffs[name] = _maxdiff(part.plan, full.plan[:, rows])
        assert (part.n_iters, part.n_rebuilds) == (full.n_iters, full.n_rebuilds), name
        assert abs(part.err - full.err) < 1e-12, name
        if name.startswith("eps"):
            assert full.n_rebuilds > 0
    out["sinkhorn"] = diffs
    S2 = S[0]
    out["sinkhorn_auto"] = _maxdiff(sinkhorn(S2[rows], 0.1), sinkhorn(S2, 0.1, dist_rows=False)[rows])
    with torch.no_grad():
        out["sinkhorn_nograd_local"] = _maxdiff(sinkhorn(S2[rows], 0.1), sinkhorn(S2[rows], 0.1, dist_rows=False))
    out["sinkhorn_local_differs"] = _maxdiff(sinkhorn(S2[rows], 0.1, dist_rows=False),
                                             sinkhorn(S2, 0.1, dist_rows=False)[rows])
    try:                                                        # VLAP's assignments, unchanged
        from vla_lit.vlap import assignments
    except Exception as e:                                      # pragma: no cover
        out["vlap"] = repr(e)
        return
    prior = b.float()
    with torch.no_grad():                                       # one process: the whole batch, local
        ref = assignments(S2.float(), 0.05, 3, prior)
    out["vlap"] = _maxdiff(assignments(S2[rows].float(), 0.05, 3, prior), ref[rows])   # training: global


def _worker(rank, port, path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)    # open_clip's all_gather: deprecated in torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = {}
        _infonce_checks(rank, out)
        _sinkhorn_checks(rank, out)
        torch.save(out, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    try:
        mp.spawn(_worker, args=(_free_port(), str(path)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:     # one gloo abort seen under a loaded CI (SIGABRT at teardown): retry
        warnings.warn(f"2-rank worker died ({e}); running the checks once more on a fresh port")
        mp.spawn(_worker, args=(_free_port(), str(path)), nprocs=WORLD, join=True)
    res = [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    print({k: v for k, v in res[0].items()})
    return res


def test_gather_features(measured):
    for r in measured:
        assert r["gather_rows"] == 0.0 and r["gather_grad_is_local"]


def test_gathered_infonce_equals_one_process(measured):
    for r in measured:
        for case in ("ours", "ours_uneven", "ours_temperature"):
            assert r[case]["loss"] < 1e-13 and r[case]["grad"] < 1e-13, (case, r[case])
        assert r["nograd_local"] == 0.0
    assert measured[0]["ours"]["value"] == measured[1]["ours"]["value"]     # the same loss on every rank


def test_open_clip_oracle(measured):
    for r in measured:
        g, l = r["open_clip_localFalse"], r["open_clip_localTrue"]
        assert abs(g["value"] - r["ours"]["value"]) < 1e-13                 # full-batch loss on each rank
        assert abs(l["mean_value"] - r["ours"]["value"]) < 1e-13            # local losses average to it
        assert g["grad"] < 1e-13 and l["grad"] < 1e-13                       # and the same gradients


def test_distributed_sinkhorn_equals_one_process(measured):
    for r in measured:
        for name, d in r["sinkhorn"].items():
            assert d < 1e-10, (name, d)
        assert r["sinkhorn_auto"] < 1e-10 and r["sinkhorn_nograd_local"] == 0.0
        assert r["sinkhorn_local_differs"] > 1e-4                            # the per-rank plan is not it


def test_vlap_assignments_are_global(measured):
    for r in measured:
        if isinstance(r["vlap"], str):
            pytest.skip(f"vla_lit.vlap does not import: {r['vlap']}")
        assert r["vlap"] < 1e-6
