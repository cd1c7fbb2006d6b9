"""Benchmark of streamed feature extraction (vla_lit.features.extract_features over webdataset shards), CPU.

Prints, each number against a reference measured in the same run:
  1. throughput: images/s of the streamed pipeline (`extract_features(encoder, WebDatasetSource(...))`: tar
     members streamed by webdataset, decoded + preprocessed in DataLoader workers, forward, pooling, safetensors
     shard writes) against the bare model forward on the same images, pre-decoded and pre-processed, at the same
     batch size -- the reference. Interleaved (A B A B ...) so that machine load hits both alike.
     Goal: ratio >= 0.9 with workers. Model: the embedded DINOv2 ViT-S/14 on Tux Paint stamps (--model tiny: a
     seeded random stand-in, NOT pretrained, for a quick run).
  2. memory: peak host RSS (main process: VmHWM; the largest DataLoader worker: ru_maxrss, which counts the
     pages it shares with the main process since the fork) when streaming a generated
     webdataset of 1k and of 10k records (random 64x64 PNGs + captions, 500 per shard) through a seeded random
     stand-in patch encoder (NOT pretrained; storing 64 patch tokens of 64 dims per image, so holding the set in
     memory would show), each run in a fresh subprocess -- the reference is the 1k run. Goal: ratio ~1 (flat).
     Then the anonymous memory (RssAnon) added by one shuffled pass of `FeatureCache.batches` over the 10k
     patches, against the size of the patches tensor: reads are memory-mapped.
Usage:  .venv/bin/python benchmarks/extraction.py [--model dinov2-s14-embedded|tiny] [--n 32] [--batch-size 16]
        [--workers 1] [--reps 2] [--sizes 1000,10000] [--skip-throughput] [--skip-memory]
No wall-clock assert anywhere: the numbers are printed, not checked. Wall-clock figures are only meaningful on an
otherwise idle machine (the load average is printed).
"""
from __future__ import annotations
import argparse, io, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
import webdataset as wds
from PIL import Image


class StandInPatchEncoder(nn.Module):
    "Benchmark stand-in (seeded random weights, NOT pretrained): VisionEncoder interface, 64x64 in, 64 patches."
    def __init__(self, dim=64, side=64, patch=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.name, self.dim, self.patch_size, self.image_size = "stand-in-random-patch-encoder", dim, patch, side
        self.fingerprint = f"{self.name}:seed0:dim{dim}:side{side}"
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.head = nn.Linear(dim, dim)
        with torch.no_grad():
            for p in self.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.eval().requires_grad_(False)

    def preprocess(self, images):
        s = self.image_size
        arrs = [np.asarray(im.convert("RGB").resize((s, s)), dtype=np.float32) / 127.5 - 1 for im in images]
        return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrs])

    def forward(self, x):
        from collections import namedtuple
        p = self.embed(x).flatten(2).transpose(1, 2)
        return namedtuple("VisionOutput", "cls patches")(torch.tanh(self.head(p.mean(1))), p)


def load_encoder(model: str):
    if model == "tiny": return StandInPatchEncoder()
    from vla_lit.models import load_vision
    return load_vision(model)


def write_stamp_shard(path: Path, recs) -> str:
    "One webdataset tar shard of Tux Paint stamps (PNG bytes + caption), as a corpus would ship them."
    with wds.TarWriter(str(path)) as w:
        for j, r in enumerate(recs):
            w.write({"__key__": f"{j:06d}", "png": Path(r.image).read_bytes(), "txt": r.caption or ""})
    return str(path)


def write_random_shards(d: Path, n: int, per_shard: int = 500, seed: int = 0) -> str:
    "n records of random 64x64 RGB PNGs with a caption, `per_shard` a shard; returns the brace pattern."
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    n_shards = (n + per_shard - 1) // per_shard
    for k in range(n_shards):
        with wds.TarWriter(str(d / f"rand-{k:05d}.tar")) as w:
            for j in range(k * per_shard, min(n, (k + 1) * per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
                w.write({"__key__": f"{j:08d}", "png": buf.getvalue(), "txt": f"random picture number {j}"})
    return str(d / ("rand-{00000..%05d}.tar" % (n_shards - 1)))


def bare_forward(enc, x: torch.Tensor, batch_size: int) -> float:
    "Wall seconds of the forward over pre-decoded tensors `x`, in batches, pooled like the cache."
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            out = enc(x[s:s + batch_size])
            out.cls.float().cpu(); out.patches.float().mean(1).cpu()
    return time.perf_counter() - t


def streamed(enc, pattern: str, batch_size: int, workers: int, root: Path) -> tuple[float, int]:
    "(wall seconds, rows) of a streamed `extract_features` into an empty cache folder."
    from vla_lit.features import WebDatasetSource, extract_features
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    fc = extract_features(enc, WebDatasetSource(pattern), pooling=("cls", "mean"), batch_size=batch_size,
                          num_workers=workers, root=root, progress=False)
    return time.perf_counter() - t, len(fc)


def throughput(args, tmp: Path):
    from vla_lit.data import load_image, tuxpaint
    recs = [r for r in tuxpaint() if str(r.image).endswith(".png")][:args.n]
    pattern = write_stamp_shard(tmp / "stamps-000.tar", recs)
    enc = load_encoder(args.model)
    x = enc.preprocess([load_image(r) for r in recs])
    bare_forward(enc, x[:2], 2)  # warm-up
    bare, pipe = [], []
    for _ in range(args.reps):
        bare.append(bare_forward(enc, x, args.batch_size))
        dt, rows = streamed(enc, pattern, args.batch_size, args.workers, tmp / "cache-tp")
        assert rows == len(recs), rows
        pipe.append(dt)
    b, p = len(recs) / min(bare), len(recs) / min(pipe)
    print(f"\n[throughput] {args.model}, {len(recs)} Tux Paint stamps in one webdataset shard, batch {args.batch_size}, "
          f"{args.workers} decoding worker(s), best of {args.reps} interleaved")
    print(f"  bare forward (reference)   {b:8.2f} img/s")
    print(f"  streamed extract_features  {p:8.2f} img/s   ratio {p / b:.3f}  (goal >= 0.9)")


CHILD = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
from extraction import StandInPatchEncoder
from vla_lit.features import WebDatasetSource, extract_features
pattern, root, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
fc = extract_features(StandInPatchEncoder(), WebDatasetSource(pattern), pooling=("cls", "patches"), batch_size=64,
                      num_workers=workers, root=root, progress=False)
dt = time.perf_counter() - t
def status_kb(field):  # this process's own figures (ru_maxrss would carry the parent's over fork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
out = {"rows": len(fc), "seconds": dt, "rss_main_kb": status_kb("VmHWM"),
       "rss_worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "key": fc.key,
       "patch_bytes": len(fc) * fc.shapes["patches"][1] * fc.shapes["patches"][2] * 4}
anon_kb = lambda: status_kb("RssAnon")
a0, peak = anon_kb(), 0
for b in fc.batches(["patches"], batch_size=256, shuffle=True, seed=0):
    s = float(b["patches"].sum())
    peak = max(peak, anon_kb() - a0)
out["read_anon_growth_kb"] = peak
print("RESULT " + json.dumps(out))
'''


def memory(args, tmp: Path):
    here = str(Path(__file__).resolve().parent)
    child = tmp / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(here).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = {}
    for n in args.sizes:
        pattern = write_random_shards(tmp / f"rand{n}", n)
        p = subprocess.run([sys.executable, str(child), pattern, str(tmp / f"cache{n}"), str(args.workers), here],
                           capture_output=True, text=True, env=env)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None: raise SystemExit(f"child for {n} records failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        res[n] = json.loads(line[7:])
        assert res[n]["rows"] == n, res[n]
    ref = args.sizes[0]
    print(f"\n[memory] streaming generated webdatasets (500 records a shard) through a random stand-in encoder "
          f"(NOT pretrained; cls + 64 patch tokens x 64 dims stored), {args.workers} worker(s); reference: the {ref} run")
    print(f"  {'records':>8} {'img/s':>8} {'peak RSS main':>14} {'ratio':>6} {'peak RSS worker':>16} {'ratio':>6}"
          f" {'patches in cache':>17}")
    for n, r in res.items():
        print(f"  {n:8d} {n / r['seconds']:8.0f} {r['rss_main_kb'] / 1024:11.0f} MB {r['rss_main_kb'] / res[ref]['rss_main_kb']:6.2f}"
              f" {r['rss_worker_kb'] / 1024:13.0f} MB {r['rss_worker_kb'] / max(res[ref]['rss_worker_kb'], 1):6.2f}"
              f" {r['patch_bytes'] / 2**20:14.0f} MB")
    big = res[args.sizes[-1]]
    print(f"  one shuffled pass of FeatureCache.batches(batch_size=256) over the {args.sizes[-1]} rows' patches: "
          f"anonymous memory +{big['read_anon_growth_kb'] / 1024:.1f} MB against {big['patch_bytes'] / 2**20:.0f} MB "
          f"of patches (ratio {big['read_anon_growth_kb'] * 1024 / big['patch_bytes']:.3f}; memory-mapped reads)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dinov2-s14-embedded", help="vision model of the throughput part, or 'tiny'")
    ap.add_argument("--n", type=int, default=32, help="stamps in the throughput part")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader decoding workers")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--sizes", default="1000,10000", help="record counts of the memory part (first: the reference)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tmp = Path(tempfile.mkdtemp(prefix="vla_extraction_bench_"))
    try:
        if not args.skip_throughput: throughput(args, tmp)
        if not args.skip_memory: memory(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
