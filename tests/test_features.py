"""Feature-cache behaviour that needs processes (nbs/03_features.ipynb covers the rest):
- 2-process extraction under torchrun with the gloo backend on CPU: each rank computes its own shards
  (shard k on rank k % 2), rank 0 writes the manifest, the result equals a 1-process run, and the skipped
  report collects the bad items of both ranks;
- two processes (no torchrun) extracting the same key at once: one computes, the other waits on the key's
  lock and reads the finished cache, and nothing is deleted under anyone's feet;
- resume after the extracting process is killed (SIGKILL, no chance to clean up): finished shards are kept,
  the rerun computes only the rest, and the result equals an uninterrupted run;
- 2-process extraction of streamed webdataset shards (`WebDatasetSource`) under torchrun/gloo, with a
  DataLoader worker per rank: tar shard k on rank k % 2, rank 0 writes the manifest, the result (rows, ids,
  captions, skipped report) equals a 1-process run;
- another input side (`image_size`) reaches the DataLoader worker processes, and the encoder's own side is
  restored afterwards.
The encoder is a stand-in (tiny, seeded random weights; NOT a pretrained model) so the tests run in seconds.
"""
import importlib.util, json, os, signal, subprocess, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys, time
from collections import namedtuple
import numpy as np, torch, torch.nn as nn
import torch.distributed as dist
from vla_lit.data import Record, tuxpaint
from vla_lit.features import extract_features

VisionOutput = namedtuple("VisionOutput", "cls patches")

class StandInEncoder(nn.Module):
    "Stand-in for tests only (seeded random weights, NOT pretrained), VisionEncoder interface, 32x32 inputs."
    def __init__(self, sleep=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.name, self.dim, self.patch_size, self.image_size, self.fingerprint = "stand-in", 8, 8, 32, "stand-in:seed0"
        self.embed = nn.Conv2d(3, 8, 8, 8)
        with torch.no_grad():
            for p in self.parameters(): p.copy_(torch.randn(p.shape, generator=g))
        self.sleep, self.calls = sleep, 0
        self.requires_grad_(False).eval()
    def preprocess(self, images):
        return torch.stack([torch.from_numpy(np.asarray(im.resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
    def forward(self, x):
        self.calls += 1
        if self.sleep: time.sleep(self.sleep)
        p = self.embed(x).flatten(2).transpose(1, 2)
        return VisionOutput(p.mean(1), p)

def records(n=22):
    rs = list(tuxpaint()[:n])
    rs.insert(9, Record("missing/one", "/nonexistent/missing_stamp.png", ["A stamp that is not there."]))
    return rs

def run(root, sleep=0.0, num_workers=0):
    enc = StandInEncoder(sleep)
    fc = extract_features(enc, records(), pooling=("cls", "mean", "patches"), batch_size=2, shard_size=4,
                          num_workers=num_workers, root=root, progress=False)
    return fc, enc

def wds_run(root, pattern, num_workers=0):
    from vla_lit.features import WebDatasetSource
    enc = StandInEncoder()
    fc = extract_features(enc, WebDatasetSource(pattern), pooling=("cls", "patches"), batch_size=2,
                          num_workers=num_workers, root=root, progress=False)
    return fc, enc

if __name__ == "__main__":
    mode, root = sys.argv[1], sys.argv[2]
    if mode == "wds_dist":
        dist.init_process_group("gloo")
        fc, enc = wds_run(root, sys.argv[3], num_workers=1)
        out = {"rank": dist.get_rank(), "key": fc.key, "calls": enc.calls, "rows": len(fc)}
        (__import__("pathlib").Path(root) / f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
        dist.destroy_process_group()
    elif mode == "dist":
        dist.init_process_group("gloo")
        fc, enc = run(root)
        out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "key": fc.key, "calls": enc.calls, "rows": len(fc)}
        Path = __import__("pathlib").Path
        (Path(root) / f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
        dist.destroy_process_group()
    else:
        run(root, sleep=float(sys.argv[3]))
'''


def _load_script(tmp_path):
    path = tmp_path / "extract_script.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("extract_script", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return path, mod


def _env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLA_LIT_CACHE": str(tmp_path / "vla_cache"),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _same(a, b):
    assert a.ids == b.ids
    for name in a.names:
        assert torch.equal(a[name], b[name]), name


def test_two_process_gloo_extraction(tmp_path):
    script, mod = _load_script(tmp_path)
    root = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "dist", str(root)]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    outs = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [o["world"] for o in outs] == [2, 2] and outs[0]["key"] == outs[1]["key"]
    (key_dir,) = [d for d in root.iterdir() if d.is_dir()]
    manifest = json.loads((key_dir / "manifest.json").read_text())
    n_shards = len(manifest["shards"])
    assert n_shards == 6  # 23 records in shards of 4
    assert [s["rank"] for s in manifest["shards"]] == [k % 2 for k in range(n_shards)]
    # each rank ran only its own shards (rank 0: shards 0, 2, 4; rank 1: 1, 3, 5), 2 batches per shard
    assert outs[0]["calls"] == 6 and outs[1]["calls"] == 6
    assert manifest["skipped"] == [["/nonexistent/missing_stamp.png", "/nonexistent/missing_stamp.png: file does not exist"]]
    # same features as one process
    single, _ = mod.run(tmp_path / "single")
    from vla_lit.features import FeatureCache
    dist_fc = FeatureCache(key_dir)
    assert dist_fc.key == single.key and len(dist_fc) == 22
    _same(dist_fc, single)


def test_resume_after_killed_process(tmp_path):
    script, mod = _load_script(tmp_path)
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), "single", str(root), "0.3"], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            receipts = list(root.glob("*/shard-*.json"))
            if len(receipts) >= 2 or proc.poll() is not None: break
            time.sleep(0.05)
        assert proc.poll() is None, f"the extraction finished before it could be killed: {proc.stdout.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL); proc.wait(30)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    (key_dir,) = [d for d in root.iterdir() if d.is_dir()]
    assert not (key_dir / "manifest.json").exists()
    done = sorted(p.name for p in key_dir.glob("shard-*.json"))
    assert 2 <= len(done) < 6, done
    # rerun: only the unfinished shards are computed, the result equals an uninterrupted run
    resumed, enc = mod.run(root)
    full, enc_full = mod.run(tmp_path / "full")
    assert enc.calls == enc_full.calls - 2 * len(done)  # 2 batches per shard; finished shards are not redone
    assert resumed.key == full.key
    _same(resumed, full)
    assert resumed.verify() == [] and not list(key_dir.glob("*.tmp*"))


def test_workers_match_main_process(tmp_path):
    "Image decoding in DataLoader worker processes gives the same rows as decoding in the main process."
    _, mod = _load_script(tmp_path)
    a, _ = mod.run(tmp_path / "w0", num_workers=0)
    b, _ = mod.run(tmp_path / "w2", num_workers=2)
    _same(a, b)
    assert a.skipped == b.skipped and len(a.skipped) == 1


def test_two_processes_same_key_wait_for_each_other(tmp_path):
    """Two sweep runs asking for the same uncached features at once (--jobs 2) take turns on the key's lock.
    The test holds the lock itself first, so both processes must wait (no timing luck involved); then it lets go."""
    import fcntl
    script, mod = _load_script(tmp_path)
    alone, _ = mod.run(tmp_path / "alone")            # the reference, and the key the processes will use
    root = tmp_path / "shared"
    key_dir = root / alone.key; key_dir.mkdir(parents=True)
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    with open(key_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, str(script), "single", str(root), "0.05"], cwd=tmp_path, env=_env(tmp_path),
                                  stdout=open(log, "w"), stderr=subprocess.STDOUT) for log in logs]
        try:
            deadline = time.time() + 240
            while time.time() < deadline and not all("waiting for another process" in l.read_text() for l in logs):
                assert all(p.poll() is None for p in procs), [l.read_text()[-2000:] for l in logs]
                time.sleep(0.1)
            assert all("waiting for another process" in l.read_text() for l in logs), [l.read_text()[-2000:] for l in logs]
            assert not list(key_dir.glob("shard-*")), "a process wrote shards without holding the lock"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    rcs = [p.wait(timeout=300) for p in procs]
    assert rcs == [0, 0], [l.read_text()[-2000:] for l in logs]
    from vla_lit.features import FeatureCache
    shared = FeatureCache(key_dir)
    assert shared.verify() == [] and len(shared) == 22 and not list(key_dir.glob("*.tmp*"))
    _same(shared, alone)


def test_image_size_reaches_workers_and_is_restored(tmp_path):
    "At image_size=112, images preprocessed in worker processes give the main process's rows; the side is restored."
    from vla_lit.data import tuxpaint
    from vla_lit.features import extract_features
    from vla_lit.models import load_vision
    enc = load_vision("tiny-random-dinov2")  # tiny random weights, not pretrained
    recs = tuxpaint()[:6]
    kw = dict(pooling=("patches",), image_size=112, batch_size=3, progress=False)
    a = extract_features(enc, recs, root=tmp_path / "w0", **kw)
    b = extract_features(enc, recs, root=tmp_path / "w2", num_workers=2, **kw)
    assert enc.image_size == 224
    assert a.key == b.key and a.shapes["patches"] == (6, (112 // 14) ** 2, enc.dim)
    assert torch.equal(a["patches"], b["patches"])


def _write_shards(d, n_shards=5, per=3):
    "Webdataset tar shards of Tux Paint stamps (PNG + caption); sample 0 of shard 1 has a truncated PNG."
    import webdataset as wds
    from vla_lit.data import tuxpaint
    pngs = [r for r in tuxpaint() if str(r.image).endswith(".png")]
    d.mkdir()
    for k in range(n_shards):
        with wds.TarWriter(str(d / f"part-{k:03d}.tar")) as w:
            for j, r in enumerate(pngs[k * per:(k + 1) * per]):
                png = Path(r.image).read_bytes()
                w.write({"__key__": f"{j:04d}", "png": png[:150] if (k, j) == (1, 0) else png, "txt": r.caption})
    return str(d / ("part-{000..%03d}.tar" % (n_shards - 1)))


def test_two_process_gloo_streamed_shards(tmp_path):
    script, mod = _load_script(tmp_path)
    pattern = _write_shards(tmp_path / "shards")
    root = tmp_path / "wdist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "wds_dist", str(root), pattern]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    outs = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert outs[0]["key"] == outs[1]["key"]
    (key_dir,) = [d for d in root.iterdir() if d.is_dir()]
    manifest = json.loads((key_dir / "manifest.json").read_text())
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0, 1, 0]
    assert [s["rows"] for s in manifest["shards"]] == [3, 2, 3, 3, 3]
    # rank 0: shards 0, 2, 4 (3 samples each, batches of 2 -> 2 forwards each); rank 1: shard 1 (2 good: 1), 3 (2)
    assert outs[0]["calls"] == 6 and outs[1]["calls"] == 3
    (bad,) = manifest["skipped"]
    assert bad[0].endswith("part-001.tar::0000") and "cannot decode image" in bad[1]
    single, _ = mod.wds_run(tmp_path / "wsingle", pattern)
    from vla_lit.features import FeatureCache
    dist_fc = FeatureCache(key_dir)
    assert dist_fc.key == single.key and len(dist_fc) == 14
    _same(dist_fc, single)
    assert dist_fc.captions() == single.captions() and dist_fc.skipped == single.skipped
    assert dist_fc.ids[0] == "wds/part-000/0000"
