"""N ranks at batch B train what one process trains at batch N B, random draws included (2 CPU ranks, gloo).

One `torch.multiprocessing` spawn of 2 ranks runs `vla_lit.train.train` on each mechanism with a per-rank
batch B and saves the weights and the history; the single-process references (batch 2B, the same seed and
data) run in the test process itself. What must agree is every random draw of a step: ShareLock's dropout
masks (`GlobalDropout`, swapped in by `train`), ViLex's diffusion noise, timesteps and TailDrop counts,
VLAP's captioned subset and its token mean; LexVLA's penalties on batch statistics (not random, but
per-rank statistics would be another objective); and the accumulated variants (plain and cached), where each
micro-batch draws its rows of the update's one draw. Last, each shipped embedded sweep that trains
(ShareLock, VLAP, LexVLA, ViLex) at smoke size, run by `run_sweep` on 1 process and under `torchrun` x 2, gives
the same metrics.

Tolerances, on |a - b| / (1 + |b|): ShareLock and the accumulation cases run in float64, weights within 1e-8
(measured about 1e-10: AdamW's first steps divide gradients by their own size, which magnifies the
summation-order differences of the gathered loss); ViLex (a float32 UNet), VLAP (a float32 LM) and LexVLA
(float32) within 1e-5.
Logged scalars are float32 (the trainer averages them over ranks in float32): within 1e-6, 1e-5."""
import json, math, os, socket, warnings
from pathlib import Path
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD, B = 2, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(steps, lr=1e-2, seed=0):
    from vla_lit.core import RunConfig
    return RunConfig(seed=seed, steps=steps, lr=lr, device="cpu")


def _fit(mech, data, steps, **kw):
    from vla_lit.train import train
    r = train(mech, data, _cfg(steps), progress=False, device="cpu", warmup=0, **kw)
    return {"state": r.state, "history": [{k: v for k, v in h.items() if k != "time"} for h in r.history]}


def sharelock_case(batch, dropout=0.2):
    "ShareLock (Linear-BN-ReLU-Dropout x 2, Linear) on 64 random pairs, float64, 6 steps."
    from vla_lit.sharelock import ShareLock
    from vla_lit.train import tensor_batches
    g = torch.Generator().manual_seed(0)
    V, T = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    m = ShareLock(6, 5, hidden_dim=16, num_layers=3, dropout=dropout).double()
    return _fit(m, tensor_batches(vision=V, text=T, batch_size=batch, generator=0), 6, lr=1e-2)


class DropReg(nn.Module):
    "Regression through Linear-Tanh-Dropout-Linear: a mean over samples, with a random mask per sample."
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 2)).double()

    def loss(self, batch):
        x, y = batch
        return {"loss": (self.net(x) - y).pow(2).mean()}


class DropCLIP(nn.Module):
    "Two projections with dropout and a gathered InfoNCE; the hooks of cached accumulation."
    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 4)).double()
        self.txt = nn.Linear(5, 4).double()

    def accum_features(self, batch):
        x, t = batch
        return {"img": F.normalize(self.img(x), dim=-1), "txt": F.normalize(self.txt(t), dim=-1)}

    def loss_from_features(self, f):
        from vla_lit.losses import clip_loss
        return {"loss": clip_loss(f["img"], f["txt"], temperature=0.1)}

    def loss(self, batch):
        return self.loss_from_features(self.accum_features(batch))


def accum_case(batch, k, mode="plain"):
    "`DropReg` (plain) or `DropCLIP` (cached) with `k` micro-batches of `batch` rows, float64, 5 updates."
    from vla_lit.train import tensor_batches
    g = torch.Generator().manual_seed(1)
    X = torch.randn(96, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(96, 2 if mode == "plain" else 5, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    m = DropReg() if mode == "plain" else DropCLIP()
    return _fit(m, tensor_batches(X, Y, batch_size=batch, generator=0), 5, accum_steps=k, accum_mode=mode)


def vilex_case(batch):
    "ViLex on the tiny SD-shaped decoder (the fixture of the ViLex notebook), TailDrop 0.5, 3 steps."
    from vla_lit.t2i import tiny_random_sd
    from vla_lit.train import tensor_batches
    from vla_lit.vilex import ViLex
    g = torch.Generator().manual_seed(2)
    px, patches = torch.rand(16, 3, 16, 16, generator=g) * 2 - 1, torch.randn(16, 9, 24, generator=g)
    torch.manual_seed(0)
    vl = ViLex(tiny_random_sd(), feature_dim=24, n_tokens=4, p_taildrop=0.5, width=32, heads=2)
    return _fit(vl, tensor_batches(pixels=px, patches=patches, batch_size=batch, generator=0), 3, lr=1e-3)


def vlap_case(batch, caption_batch):
    "VLAP on the tiny random LM with captioning of the first `caption_batch` pairs (OT objective), 3 steps."
    from vla_lit.models import load_lm
    from vla_lit.train import tensor_batches
    from vla_lit.vlap import VLAP, tokenize_captions
    lm = load_lm("tiny-random-llama")
    g = torch.Generator().manual_seed(3)
    words = ["red", "small dog", "a very big green car", "cat", "two old hats on a chair", "sky"]
    caps = [" ".join([words[i % 6]] * (1 + i % 3)) for i in range(16)]   # captions of 1 to 15 tokens
    data = {"vision": torch.randn(16, 2, 24, generator=g), "text": torch.randn(16, lm.dim, generator=g),
            **tokenize_captions(lm, caps)}
    torch.manual_seed(0)
    mech = VLAP(lm, 24, caption_batch=caption_batch, sinkhorn_iters=3)
    return _fit(mech, tensor_batches(batch_size=batch, generator=0, **data), 3, lr=1e-2)


def lexvla_case(batch, penalty):
    "LexVLA on a random 40-word codebook with the FLOPs or overuse penalty at full weight (batch statistics), 4 steps."
    from vla_lit.lexvla import LexVLA
    from vla_lit.train import tensor_batches
    g = torch.Generator().manual_seed(4)
    E = torch.randn(40, 8, generator=g)
    patches, text = torch.randn(32, 4, 6, generator=g), torch.randn(32, 40, generator=g).clamp_min(0)
    torch.manual_seed(0)
    m = LexVLA(6, E, penalty=penalty, penalty_lambda=1.0, penalty_warmup=0, vision_bias_init=0.5)
    return _fit(m, tensor_batches(patches=patches, text=text, batch_size=batch, generator=0), 4, lr=1e-2)


def _cases(world: int) -> dict:
    """Every case on `world` ranks at per-rank batch B (ShareLock; B/2 for the others), or in one process
    (`world=1`) at the global batch; the accumulation cases use 2 micro-batches on 2 ranks, 1 batch in one
    process."""
    n = WORLD * B // world
    return {"sharelock": sharelock_case(n),
            "sharelock_nodrop": sharelock_case(n, dropout=0.0),
            "plain_accum": accum_case(n // 2, 2) if world > 1 else accum_case(n, 1),
            "cached_accum": accum_case(n // 2, 2, "cached") if world > 1 else accum_case(n, 1, "cached"),
            "vilex": vilex_case(n // 2),
            "vlap": vlap_case(n // 2, caption_batch=3),
            "lexvla_flops": lexvla_case(n, "flops"),
            "lexvla_overuse": lexvla_case(n, "overuse")}


def _worker(rank, port, path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_cases(WORLD), f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The 2-rank results (per-rank batch B) and the 1-process ones (batch 2B)."
    path = tmp_path_factory.mktemp("ddp_equal")
    try:
        mp.spawn(_worker, args=(_free_port(), str(path)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:     # a gloo abort at teardown under a loaded machine: retry once
        warnings.warn(f"2-rank worker died ({e}); running once more on a fresh port")
        mp.spawn(_worker, args=(_free_port(), str(path)), nprocs=WORLD, join=True)
    ranks = [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = _cases(1)
    return ranks, single


def _maxrel(a: dict, b: dict) -> float:
    "Largest |a - b| / (1 + |b|) over the tensors of two states."
    assert a.keys() == b.keys()
    return max(float(((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max()) for k in a)


def _check(runs, case, tol, loss_tol):
    ranks, single = runs
    ref = single[case]
    for r in ranks:
        d = _maxrel(r[case]["state"], ref["state"])
        print(f"{case}: weights within {d:.2g} of one process")
        assert d < tol, f"{case}: weights differ from one process at the global batch by {d:.3g}"
        assert [h["step"] for h in r[case]["history"]] == [h["step"] for h in ref["history"]]
        for h, h1 in zip(r[case]["history"], ref["history"]):
            for k in h1:
                assert math.isclose(h[k], h1[k], rel_tol=loss_tol, abs_tol=loss_tol), (case, h["step"], k, h[k], h1[k])
    for k in ranks[0][case]["state"]:
        assert torch.equal(ranks[0][case]["state"][k], ranks[1][case]["state"][k]), f"{case}: {k} differs between ranks"


def test_sharelock_dropout_batchnorm(runs):
    "Dropout 0.2 and BatchNorm in the projector: 2 ranks x 8 equal 1 x 16 (weights, BN statistics, losses)."
    _check(runs, "sharelock", 1e-8, 1e-6)
    _, single = runs                                   # and the masks mattered: without dropout the run differs
    assert _maxrel(single["sharelock"]["state"], single["sharelock_nodrop"]["state"]) > 1e-4


def test_plain_accumulation_with_dropout(runs):
    "2 ranks x 2 micro-batches x 4 rows, dropout on: the weights of 1 process x 1 batch of 16."
    _check(runs, "plain_accum", 1e-8, 1e-6)


def test_cached_accumulation_with_dropout(runs):
    "Cached accumulation replays each micro-batch's masks in its live pass: 2 ranks x 2 x 4 equal 1 x 16."
    _check(runs, "cached_accum", 1e-8, 1e-6)


def test_vilex_noise_timesteps_taildrop(runs):
    "ViLex's diffusion noise, timesteps and TailDrop counts: 2 ranks x 4 equal 1 x 8 (float32)."
    _check(runs, "vilex", 1e-5, 1e-5)
    assert any(h["kept"] < 4 for h in runs[1]["vilex"]["history"])     # TailDrop did drop tokens


def test_vlap_caption_subset(runs):
    "VLAP captions the first 3 pairs of the global batch (2 on rank 0, 1 on rank 1), one token mean: equal."
    _check(runs, "vlap", 1e-5, 1e-5)


def test_lexvla_batch_penalty(runs):
    "LexVLA's penalties are functions of batch statistics: on the global batch's rows, 2 ranks x 8 equal 1 x 16."
    for case in ("lexvla_flops", "lexvla_overuse"):
        _check(runs, case, 1e-5, 1e-5)
        assert all(h["penalty"] > 0 for h in runs[1][case]["history"])


def _timing(k: str) -> bool:
    "Metrics that measure time or memory (they differ between any two runs)."
    return k in ("wall_s", "peak_host_mb", "peak_device_mb") or "second" in k or k.endswith("s_per_step")


@pytest.mark.parametrize("study", ["sharelock", "vlap", "lexvla", "vilex"])
def test_smoke_sweep_torchrun_equals_one_process(tmp_path, study):
    """Each shipped embedded sweep at its smoke size (tiny random models, feature extraction, floors, baselines,
    every evaluation set), run by `run_sweep` twice: one process at batch 2b, and `torchrun` x 2 at batch b (b:
    half the smoke batch). Every metric but time and memory is the same (30-60 s each on 2 CPU cores)."""
    import yaml
    from vla_lit.sweep import run_sweep
    root = Path(__file__).resolve().parents[1]
    sw = yaml.safe_load((root / f"sweeps/{study}_embedded.yaml").read_text())
    base = {**sw["base"], **sw["smoke"]}
    base |= {k: v[0] for k, v in (sw.get("grid") or {}).items() if k not in base}
    b = max(1, int(base.get("batch_size", 2 * B)) // 2)
    spec = {"name": f"{study}_ddp_equal", "notebook": str(root / sw["notebook"]),
            "base": {**base, "batch_size": 2 * b},
            "runs": [{"_id": "one", "batch_size": 2 * b},
                     {"_id": "two", "batch_size": b, "launcher": {"torchrun": WORLD}}]}
    (tmp_path / "eq.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = run_sweep(tmp_path / "eq.yaml", out_root=tmp_path / "runs", device="cpu", progress=False)
    assert res.status.tolist() == ["ok", "ok"], res.to_string()
    one, two = (json.loads(p.read_text()) for p in
                (next((tmp_path / f"runs/{study}_ddp_equal").glob(f"{i}__*/metrics.json")) for i in ("one", "two")))
    assert one.keys() == two.keys() and len(one) > 30
    differ = {k: (one[k], two[k]) for k in one if not _timing(k)
              and not math.isclose(one[k], two[k], rel_tol=1e-5, abs_tol=1e-6)}
    assert not differ, differ
