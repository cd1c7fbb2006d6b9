"""What the integrity checks on the default path cost, against an unchecked cached read in the same run (CPU).

Prints, measured interleaved (A B A B ...) so that machine load hits both alike, medians over --reps:
  1. feature cache (vla_lit.features), the embedded DINOv2 on Tux Paint stamps, for the default poolings and with
     patches: a cached read (repeat `extract_features` call + reading every row) with the checks of the default
     path against the same read with a size-only check (unchecked); the time spent inside the checks; and what a
     full read of the shards costs: SHA-256 (`verify=True`) and CRC-32 (zlib), the fast hash one could use instead.
  2. converted model copies (vla_lit.models): a cached `load_vision` / `load_lm` of the embedded models with the
     default check against the same load unchecked, and a full SHA-256 / CRC-32 of the copy's files.
  3. change detection of the images: `records_fingerprint` by size + mtime (default) against `content=True`.
Goal: the default checks under 5% of the unchecked cached read.

Usage:  .venv/bin/python benchmarks/cache_integrity.py [--n 64] [--reps 5] [--model dinov2-s14-embedded]
        [--lms smollm2-135m-embedded,minilm-l6-embedded] [--json out.json]
The first run converts the embedded models if they are not in the cache yet (not timed).
"""
from __future__ import annotations
import argparse, json, os, shutil, statistics, tempfile, time, zlib
from pathlib import Path
import torch
from vla_lit import features as vf, models as vm
from vla_lit.data import tuxpaint
from vla_lit.features import FeatureCache, extract_features, records_fingerprint, sha256_file


def _size_only(f, rec, memo, full=False):
    "The check of the unchecked baseline: the file is there and has the recorded size."
    return None if f.is_file() and f.stat().st_size == rec["bytes"] else "size"


class _Timed:
    "Wrap a function, adding the wall time of its calls to `.s`."
    def __init__(self, fn):
        self.fn, self.s = fn, 0.0

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.s += time.perf_counter() - t


def _crc32_file(p) -> int:
    with open(p, "rb") as f:
        c = 0
        while b := f.read(1 << 22):
            c = zlib.crc32(b, c)
        return c


def _interleaved(fns: dict, reps: int) -> dict:
    "Median wall seconds of each function: one warm-up call each, then calls interleaved, order reversed every rep."
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for rep in range(reps):
        for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def feature_part(enc, recs, pooling, root: Path, reps: int) -> dict:
    kw = dict(pooling=pooling, batch_size=32, root=root, progress=False)
    fc = extract_features(enc, recs, **kw)               # computed once, not timed
    shards = [fc.path / s["file"] for s in fc.shards]
    real, timed = vf._shard_problem, _Timed(vf._shard_problem)

    def read(check):
        vf._shard_problem = check
        try:
            c = FeatureCache(extract_features(enc, recs, **kw).path)
            for n in pooling:
                c[n]
        finally:
            vf._shard_problem = real

    t = _interleaved({"unchecked": lambda: read(_size_only), "checked": lambda: read(timed),
                      "sha256": lambda: [sha256_file(p) for p in shards],
                      "crc32": lambda: [_crc32_file(p) for p in shards]}, reps)
    t["inside_checks"] = timed.s / (reps + 1)     # the warm-up call is counted too
    t["bytes"] = sum(p.stat().st_size for p in shards)
    return t


def model_part(name: str, reps: int) -> dict:
    load = vm.load_vision if name in vm.known_models("vision") else vm.load_lm
    load(name, device="cpu")                             # converts on the first run, not timed
    d = vm.cache_dir("models") / name
    files = [d / rel for rel in json.loads((d / "vla_lit.json").read_text()).get("files", {})] or \
        [p for p in d.iterdir() if p.is_file()]
    real, timed = vm._copy_problems, _Timed(vm._copy_problems)

    def run(check):
        vm._copy_problems = check
        try:
            load(name, device="cpu")
        finally:
            vm._copy_problems = real

    t = _interleaved({"unchecked": lambda: run(lambda out, files: []), "checked": lambda: run(timed),
                      "sha256": lambda: [vm._sha256(p) for p in files],
                      "crc32": lambda: [_crc32_file(p) for p in files]}, reps)
    t["inside_checks"] = timed.s / (reps + 1)     # the warm-up call is counted too
    t["bytes"] = sum(p.stat().st_size for p in files)
    return t


def _line(label: str, t: dict):
    u = t["unchecked"]
    print(f"{label:<44} unchecked {u * 1e3:8.1f} ms   checked {t['checked'] * 1e3:8.1f} ms "
          f"(x{t['checked'] / u:.3f}; inside the checks {t['inside_checks'] * 1e3:.2f} ms = "
          f"{t['inside_checks'] / u:.1%} of the unchecked read)")
    print(f"{'':<44} a full read of the {t['bytes'] / 2**20:.1f} MiB: SHA-256 {t['sha256'] * 1e3:.1f} ms "
          f"({t['sha256'] / u:.0%} of it), CRC-32 {t['crc32'] * 1e3:.1f} ms ({t['crc32'] / u:.0%})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dinov2-s14-embedded")
    ap.add_argument("--lms", default="smollm2-135m-embedded,minilm-l6-embedded")
    ap.add_argument("--n", type=int, default=64, help="number of stamps")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    tux = tuxpaint()
    recs = tux.subset([tux[round(i * len(tux) / a.n)] for i in range(a.n)])
    enc = vm.load_vision(a.model, device="cpu")
    print(f"{len(recs)} Tux Paint stamps, {a.model}, {a.reps} reps, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    res, tmp = {}, Path(tempfile.mkdtemp(prefix="vla_integrity_"))
    try:
        for pooling in (("cls", "mean"), ("cls", "mean", "patches")):
            res["features_" + "+".join(pooling)] = feature_part(enc, recs, pooling, tmp, a.reps)
        res["fingerprint"] = _interleaved({"size_mtime": lambda: records_fingerprint(recs),
                                           "content": lambda: records_fingerprint(recs, content=True)}, a.reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in [a.model, *filter(None, a.lms.split(","))]:
        if name.endswith("-embedded") and name != "minilm-l6-embedded":   # MiniLM is no converted copy
            res["model_" + name] = model_part(name, a.reps)
    print()
    for k, t in res.items():
        if k != "fingerprint":
            _line(k.replace("features_", "feature cache read, ").replace("model_", "cached load of "), t)
    f = res["fingerprint"]
    read = res["features_cls+mean"]["unchecked"]
    print(f"{'image change detection (records_fingerprint)':<44} size+mtime {f['size_mtime'] * 1e3:.1f} ms, "
          f"content_hash {f['content'] * 1e3:.1f} ms (x{f['content'] / f['size_mtime']:.1f}; "
          f"{(f['content'] - f['size_mtime']) / read:.0%} of the cached read)")
    worst = max(t["inside_checks"] / t["unchecked"] for k, t in res.items() if k != "fingerprint")
    print(f"\nworst default-check cost: {worst:.2%} of an unchecked cached read (goal < 5%)")
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
