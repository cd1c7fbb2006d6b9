"""Benchmark of the feature cache (vla_lit.features) with the embedded DINOv2 ViT-S/14 on Tux Paint stamps, CPU.

Prints, measured in the same run and interleaved (A B A B ...) so that machine load hits both alike:
  1. images/s of the full cache pipeline (`extract_features`: decode + preprocess in DataLoader workers,
     forward, pooling, sharded safetensors writes) against the bare model forward on pre-decoded,
     pre-processed tensors at the same batch size -- the reference. Goal: pipeline >= 0.9 x bare.
  2. time to get the cached features back (a repeat `extract_features` call: fingerprint + manifest check;
     and reading every row through the memory map) against recomputing them.

Usage:  .venv/bin/python benchmarks/feature_cache.py [--n 128] [--batch-size 32] [--workers 1] [--reps 2]
        [--image-size S] (--n 0: all ~950 stamps; --image-size: encode at side S instead of the model's own,
        `extract_features(image_size=S)`, with the bare forward on tensors preprocessed at the same side). No wall-clock assert anywhere: the numbers are printed, not checked.
Wall-clock figures are only meaningful on an otherwise idle machine (the load average is printed); the CPU
seconds per image (this process + its DataLoader workers) measure the work done and hold under load.
"""
from __future__ import annotations
import argparse, json, os, resource, shutil, statistics, tempfile, time
from pathlib import Path
import torch
from vla_lit import data as vdata
from vla_lit.data import load_image, tuxpaint
from vla_lit.features import FeatureCache, extract_features


def _cpu() -> float:
    "CPU seconds of this process (all threads) and of its reaped children (DataLoader workers)."
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def bare_forward(enc, x: torch.Tensor, batch_size: int) -> tuple[float, float]:
    "(wall, CPU) seconds of the model forward over pre-decoded tensors `x`, in batches, pooled like the cache."
    t, c = time.perf_counter(), _cpu()
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            out = enc(x[s:s + batch_size])
            out.cls.float().cpu(); out.patches.float().mean(1).cpu()
    return time.perf_counter() - t, _cpu() - c


def pipeline(enc, recs, batch_size: int, workers: int, root: Path, pooling, image_size=None) -> tuple[float, float]:
    "(wall, CPU) seconds of `extract_features` into an empty cache folder."
    shutil.rmtree(root, ignore_errors=True)
    t, c = time.perf_counter(), _cpu()
    fc = extract_features(enc, recs, pooling=pooling, batch_size=batch_size, shard_size=1024, num_workers=workers,
                          root=root, progress=False, image_size=image_size)
    dt, dc = time.perf_counter() - t, _cpu() - c
    assert len(fc) + len([s for s in fc.skipped if s not in recs.skipped]) == len(recs)
    return dt, dc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dinov2-s14-embedded")
    ap.add_argument("--n", type=int, default=128, help="number of stamps (0: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of the pipeline")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--pooling", default="cls,mean")
    ap.add_argument("--image-size", type=int, default=None, help="input side (default: the model's own)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    from vla_lit.models import load_vision
    pooling = tuple(a.pooling.split(","))

    enc = load_vision(a.model, device="cpu")
    tux = tuxpaint()
    # an evenly spaced subset, so PNG photos, clip art and SVG-only stamps are all represented
    recs = tux if a.n <= 0 or a.n >= len(tux) else tux.subset([tux[round(i * len(tux) / a.n)] for i in range(a.n)])
    n_svg = sum(str(r.image).endswith(".svg") for r in recs)
    side = a.image_size or enc.image_size
    print(f"model {enc.name} ({enc.dim}-d, {side}px), {len(recs)} Tux Paint stamps ({n_svg} SVG), "
          f"batch {a.batch_size}, workers {a.workers}, pooling {pooling}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    # pre-decode once (this also fills the SVG raster cache, as any earlier pass over the data would)
    t = time.perf_counter()
    good = []
    for r in recs:
        try: good.append(load_image(r))
        except vdata.BadInputError: pass
    own = enc.image_size
    enc.image_size = side   # the bare forward gets tensors at the side the pipeline encodes at
    try:
        x = enc.preprocess(good)
    finally:
        enc.image_size = own
    decode_s = time.perf_counter() - t
    print(f"decode + preprocess of {len(good)} images in the main process: {decode_s:.1f} s "
          f"({len(good) / decode_s:.1f} img/s)")
    bare_forward(enc, x[:a.batch_size], a.batch_size)  # warm-up

    tmp = Path(tempfile.mkdtemp(prefix="vla_bench_"))
    bare, pipe, bare_c, pipe_c = [], [], [], []
    try:
        for rep in range(a.reps):
            w, c = bare_forward(enc, x, a.batch_size); bare.append(w); bare_c.append(c)
            w, c = pipeline(enc, recs, a.batch_size, a.workers, tmp / "cache", pooling, a.image_size); pipe.append(w); pipe_c.append(c)
            print(f"  rep {rep}: bare forward {len(good) / bare[-1]:.2f} img/s ({bare_c[-1] / len(good):.3f} CPU s/img), "
                  f"pipeline {len(good) / pipe[-1]:.2f} img/s ({pipe_c[-1] / len(good):.3f} CPU s/img), "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
        bare_s, pipe_s = statistics.median(bare), statistics.median(pipe)
        bare_cs, pipe_cs = statistics.median(bare_c), statistics.median(pipe_c)

        # cold pipeline: SVG rasters not cached (the first pass a user ever makes over a new SVG set)
        vdata.SVG_RASTER_CACHE = False
        cold_s, cold_cs = pipeline(enc, recs, a.batch_size, a.workers, tmp / "cold", pooling, a.image_size)
        vdata.SVG_RASTER_CACHE = True

        # reading back: the repeat call (fingerprint of the records + manifest + shard sizes), then every row
        t = time.perf_counter()
        fc = extract_features(enc, recs, pooling=pooling, batch_size=a.batch_size, num_workers=a.workers,
                              root=tmp / "cache", progress=False, image_size=a.image_size)
        repeat_s = time.perf_counter() - t
        t = time.perf_counter()
        fc = FeatureCache(fc.path)
        feats = {nm: fc[nm] for nm in pooling}
        read_s = time.perf_counter() - t
        assert all(len(v) == len(good) for v in feats.values())
        t = time.perf_counter()
        for b in fc.batches(list(pooling), batch_size=64, shuffle=True, seed=0): pass
        shuffled_s = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(good)
    res = {"images": n, "image_size": side, "batch_size": a.batch_size, "workers": a.workers, "reps": a.reps, "load_average": os.getloadavg()[0],
           "bare_forward_img_s": n / bare_s, "pipeline_img_s": n / pipe_s, "pipeline_over_bare": bare_s / pipe_s,
           "bare_cpu_s_per_img": bare_cs / n, "pipeline_cpu_s_per_img": pipe_cs / n, "pipeline_cpu_over_bare_cpu": pipe_cs / bare_cs,
           "pipeline_cold_svg_cpu_over_bare_cpu": cold_cs / bare_cs,
           "pipeline_cold_svg_img_s": n / cold_s, "pipeline_cold_svg_over_bare": bare_s / cold_s,
           "recompute_s": pipe_s, "repeat_call_s": repeat_s, "read_all_s": read_s, "read_shuffled_batches_s": shuffled_s,
           "recompute_over_repeat_call": pipe_s / repeat_s, "recompute_over_read_all": pipe_s / read_s}
    print()
    print(f"bare model forward (reference, pre-decoded tensors): {res['bare_forward_img_s']:8.2f} img/s")
    print(f"cache pipeline (extract_features)                  : {res['pipeline_img_s']:8.2f} img/s"
          f"   = {res['pipeline_over_bare']:.3f} x bare   (goal >= 0.90)")
    print(f"cache pipeline, SVG raster cache off (first pass)  : {res['pipeline_cold_svg_img_s']:8.2f} img/s"
          f"   = {res['pipeline_cold_svg_over_bare']:.3f} x bare")
    print(f"CPU seconds per image: bare {res['bare_cpu_s_per_img']:.3f}, pipeline {res['pipeline_cpu_s_per_img']:.3f} "
          f"(= {res['pipeline_cpu_over_bare_cpu']:.3f} x bare; SVG cache off {res['pipeline_cold_svg_cpu_over_bare_cpu']:.3f} x)"
          "  -- the work done, insensitive to other processes' load")
    print(f"recompute (pipeline)                               : {pipe_s:8.3f} s")
    print(f"repeat extract_features call (cache hit)           : {repeat_s:8.3f} s   recompute / repeat = {res['recompute_over_repeat_call']:.0f} x")
    print(f"{'read all ' + '+'.join(pooling) + ' rows via memory map':<51}: {read_s:8.3f} s   recompute / read = {res['recompute_over_read_all']:.0f} x")
    print(f"one shuffled pass in batches of 64                 : {shuffled_s:8.3f} s")
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
