"""GPU benchmark of the library's hot paths, each as a ratio against a reference measured in the same run.

    bash benchmarks/gpu.sh                          # CUDA machine: the real figures, < 5 minutes, offline
    python benchmarks/gpu_bench.py --smoke          # tiny sizes, CPU, seconds (what the test suite runs)
    python benchmarks/gpu_bench.py --device cpu     # CPU at reduced sizes: NOT the GPU figure
    python benchmarks/gpu_bench.py --json out.json  # also write every number to a JSON file

Every section prints a row `name | measured | reference | ratio`; the ratio is always "how close to the
reference" (1.0 = as fast as the reference, higher is better):

1. extraction: images/s of `vla_lit.features.extract_features` (records -> PNG decode + preprocess in
   DataLoader workers -> forward -> cls/mean pooling -> safetensors shards in a fresh cache folder) against
   the bare forward of the same encoder (`encoder.model(pixel_values=...)`) over the same images, decoded and
   pre-processed beforehand and already on the device, same batch size, same dtype (the library's default on
   CUDA: model weights in bf16). ratio = library / bare. Model: the embedded DINOv2 ViT-S/14
   (`dinov2-s14-embedded`) on Tux Paint stamps; `tiny-random-dinov2` (RANDOM weights) on generated shapes in
   smoke mode or when the embedded files are missing (the row says which).
2. sinkhorn B x K: `vla_lit.sinkhorn.sinkhorn` (3 iterations, eps 0.05, float32, scores in [-1, 1]) against
   its HBM floor. The device's achievable bandwidth is measured first (the better of a streaming `x.sum()`,
   bytes read, and `y.copy_(x)`, bytes read + written, over a tensor far larger than the caches). The floor
   counts the passes over the B x K float32 matrix the algorithm cannot avoid: building the kernel
   exp(S / eps - shift) (read S, write K: 2), two reductions per iteration (K^T u and K v: 2 reads), scaling
   the plan diag(u) K diag(v) (read + write: 2), so 4 + 2 x 3 = 10 passes; floor = 10 B K 4 bytes / bandwidth.
   ratio = floor / measured (goal >= 0.5). The library's kernel makes a few more (the shift's amin/amax pass,
   exp in place after the add, the plan's two in-place multiplies): about 16 passes, so ~0.6 is its ceiling.
3. sharelock step / vlap step: one training step of the real mechanism through the library's trainer
   (`vla_lit.train.Trainer`: batch from `tensor_batches` to the device, forward, loss, backward, gradient
   clipping, AdamW update; bf16 autocast on CUDA, float32 on CPU) on cached features (random tensors of the
   real dims: DINOv2-S 384-d vision, SmolLM2 576-d text) against its matmul floor: the FLOPs of its matmuls
   (2 m n k each, forward; backward adds 2 m n k for each operand that needs a gradient: x3 for a hidden
   layer, x2 for the first layer and for products with frozen data) divided by the measured throughput of
   `torch.matmul` on a large square in the step's dtype. ratio = floor / measured. Element-wise work
   (BatchNorm, ReLU, softmax, the optimiser) is not in the floor.
   ShareLock: text -> vision, a 4-layer 4096-wide projector (the paper's), batch 1024 (the official
   micro-batch). VLAP: the linear map 384 -> 576 on CLS + 2 x 2 pooled patch tokens, scores against all
   49,152 prototypes (a RANDOM-weight stand-in LM of SmolLM2's shape: its token embeddings are the prototypes),
   Sinkhorn assignments (eps 0.01, 3 iterations) and the swapped-prediction loss, batch 256, captioning off
   (that term runs the LLM itself, not cached features). VLAP's step is dominated by B x K element-wise work and
   Sinkhorn, bandwidth-bound, so its matmul-floor fraction is low by construction; section 2 covers Sinkhorn.

Timings: the device is synchronised around each timed call, one warm-up call first, best of `--repeat`.
Nothing is downloaded: tiny or embedded models only. Each section runs in try/except; a failed section prints
its error, the others still run, and the exit status is 1. No time is asserted anywhere.
"""
from __future__ import annotations
import argparse, json, os, shutil, sys, tempfile, time, traceback
from pathlib import Path
import torch

SIZES = {   # per mode: extraction (n images, batch, workers), Sinkhorn shapes, bandwidth / matmul probe sizes,
            # ShareLock (batch, hidden, layers), VLAP (batch, vocabulary, grid)
    "gpu": dict(n_img=1024, img_batch=128, workers=8, sinkhorn=[(512, 49_152), (4096, 152_000)],
                bw_numel=1 << 28, mm=8192, sl=(1024, 4096, 4), vlap=(256, 49_152, 2)),
    "cpu": dict(n_img=32, img_batch=16, workers=1, sinkhorn=[(128, 49_152), (512, 49_152)],
                bw_numel=1 << 25, mm=1024, sl=(256, 1024, 4), vlap=(64, 49_152, 2)),
    "smoke": dict(n_img=8, img_batch=4, workers=0, sinkhorn=[(8, 256), (16, 512)],
                  bw_numel=1 << 20, mm=128, sl=(8, 64, 2), vlap=(4, 256, 1)),
}
V_DIM, T_DIM = 384, 576          # DINOv2 ViT-S/14 features, SmolLM2-135M hidden size


def ms(t: float) -> str:
    "Seconds as milliseconds, 3 significant digits."
    return f"{t * 1e3:.3g} ms"


def best(fn, repeat: int, dev: torch.device) -> float:
    "Best wall seconds of `repeat` calls of `fn` after one warm-up call, the device synchronised around each."
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn(); sync()
    ts = []
    for _ in range(repeat):
        sync(); t0 = time.perf_counter()
        fn(); sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def bandwidth(dev, numel: int, repeat: int) -> float:
    "Achievable memory bandwidth (bytes/s): the better of a streaming sum (read) and a copy (read + write)."
    x = torch.rand(numel, device=dev)
    y = torch.empty_like(x)
    t_sum = best(lambda: x.sum(), repeat, dev)
    t_copy = best(lambda: y.copy_(x), repeat, dev)
    return max(x.nbytes / t_sum, 2 * x.nbytes / t_copy)


def matmul_rate(dev, n: int, dtype: torch.dtype, repeat: int) -> float:
    "Achievable matmul throughput (FLOP/s) of `torch.matmul` on an n x n square in `dtype`."
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n ** 3 / best(lambda: torch.matmul(a, b), repeat, dev)


# ---- 1. feature extraction ------------------------------------------------------------------------------
def _records(n: int, tmp: Path, embedded: bool):
    "n image records: Tux Paint PNG stamps (repeated under new ids if fewer) if `embedded`, else generated."
    from vla_lit.data import Record
    if embedded:
        try:
            from vla_lit.data import tuxpaint
            png = [r for r in tuxpaint() if str(r.image).endswith(".png")]
            if png:
                return [Record(f"{r.id}#{i // len(png)}", r.image) for i, r in
                        ((i, png[i % len(png)]) for i in range(n))], "Tux Paint stamps"
        except Exception as e:  # noqa: BLE001 -- the embedded data is optional here
            print(f"  (Tux Paint stamps unavailable: {type(e).__name__}: {e}; using generated images)")
    from vla_lit.fixtures import shape_item
    (tmp/"img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        p = tmp/"img"/f"{i:05d}.png"
        shape_item(i, size=96)[0].save(p)
        recs.append(Record(f"gen/{i}", str(p)))
    return recs, "generated shapes"


def _encoder(dev, smoke: bool):
    from vla_lit.models import load_vision
    if not smoke:
        try:
            return load_vision("dinov2-s14-embedded", device=dev), True
        except Exception as e:  # noqa: BLE001 -- fall back to the random stand-in, and say so
            print(f"  (dinov2-s14-embedded unavailable: {type(e).__name__}: {e}; using tiny-random-dinov2)")
    return load_vision("tiny-random-dinov2", device=dev), False


def bench_extraction(args, sz, dev, tmp: Path) -> dict:
    from vla_lit.data import load_image
    from vla_lit.features import extract_features
    enc, real = _encoder(dev, args.smoke)
    recs, what = _records(sz["n_img"], tmp, embedded=real)
    bs, workers = sz["img_batch"], args.workers if args.workers is not None else sz["workers"]
    p = next(enc.parameters())
    x = enc.preprocess([load_image(r) for r in recs]).to(dev, p.dtype)     # decoded + preprocessed beforehand

    def bare():
        with torch.inference_mode():
            for s in range(0, len(x), bs):
                enc.model(pixel_values=x[s:s + bs]).last_hidden_state

    def library():
        fc = extract_features(enc, recs, pooling=("cls", "mean"), batch_size=bs, num_workers=workers,
                              root=tmp/"cache", recompute=True, progress=False)
        assert len(fc) == len(recs), f"extract_features stored {len(fc)} of {len(recs)} rows"

    t_bare, t_lib = best(bare, args.repeat, dev), best(library, args.repeat, dev)
    lib, ref = len(recs) / t_lib, len(recs) / t_bare
    return dict(name=f"extraction {enc.name} {str(p.dtype).replace('torch.', '')} (library / bare)",
                measured=f"{lib:.1f} img/s", reference=f"{ref:.1f} img/s bare forward", ratio=lib / ref,
                note=f"{len(recs)} {what}, batch {bs}, {workers} workers", lib_img_s=lib, bare_img_s=ref)


# ---- 2. Sinkhorn -----------------------------------------------------------------------------------------
def SINKHORN_PASSES(n_iters: int) -> int:
    "Passes over the B x K matrix: build the kernel (read + write), 2 reductions an iteration, the plan (r + w)."
    return 2 + 2 * n_iters + 2


def bench_sinkhorn(args, B: int, K: int, bw: float, dev) -> dict:
    from vla_lit.sinkhorn import sinkhorn
    g = torch.Generator(device="cpu").manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(B, T_DIM, generator=g), dim=-1).to(dev)
    q = torch.nn.functional.normalize(torch.randn(K, T_DIM, generator=g), dim=-1).to(dev)
    S = (10 * f @ q.T).clamp_(-1, 1)     # cosines spread like real features' (std ~0.4), within [-1, 1]
    del f, q
    t = best(lambda: sinkhorn(S, 0.05, 3), args.repeat, dev)
    floor = SINKHORN_PASSES(3) * S.nbytes / bw
    return dict(name=f"sinkhorn {B} x {K:,} f32, 3 it (floor / measured)", measured=ms(t),
                reference=f"{ms(floor)} = {SINKHORN_PASSES(3)} passes", ratio=floor / t,
                note=f"bandwidth {bw / 1e9:.0f} GB/s; goal >= 0.5", ms=t * 1e3, floor_ms=floor * 1e3)


# ---- 3. training steps -----------------------------------------------------------------------------------
def mm_units(m: int, n: int, k: int, grads: int) -> float:
    "FLOPs of an m x k @ k x n product in a training step: forward + one product per operand needing a grad."
    return 2.0 * m * n * k * (1 + grads)


def sharelock_flops(B: int, H: int, L: int) -> float:
    "Matmul FLOPs of a ShareLock text->vision step: the projector's Linears, the logits, the batch accuracy."
    dims = [T_DIM] + [H] * (L - 1) + [V_DIM]
    f = sum(mm_units(B, o, i, grads=1 if j == 0 else 2) for j, (i, o) in enumerate(zip(dims, dims[1:])))
    return f + mm_units(B, B, V_DIM, grads=1) + mm_units(B, B, V_DIM, grads=0)


def vlap_flops(B: int, N: int, K: int) -> float:
    "Matmul FLOPs of a VLAP step (ot, no captioning): the map, image scores (with grad), text scores."
    return mm_units(B * N, T_DIM, V_DIM, grads=1) + mm_units(B, K, T_DIM, grads=1) + mm_units(B, K, T_DIM, 0)


def _trainer(mech, data, B: int, dev):
    from vla_lit.core import RunConfig
    from vla_lit.train import Trainer, TrainOptions
    opts = TrainOptions(lr=1e-4, warmup=0, progress=False, device=dev, amp="bf16" if dev.type == "cuda" else None)
    t = Trainer(mech, data, RunConfig(steps=10 ** 6, lr=1e-4, batch_size=B, seed=0), opts)
    t.set_train_mode()

    def step():
        logged, gnorm = t.forward_backward()
        t.log(logged, t.apply_update(), gnorm)
    return step


def bench_sharelock(args, sz, dev, rate: float, dtype: str) -> dict:
    from vla_lit.sharelock import ShareLock
    from vla_lit.train import tensor_batches
    B, H, L = sz["sl"]
    torch.manual_seed(0)
    data = tensor_batches(vision=torch.randn(4 * B, V_DIM), text=torch.randn(4 * B, T_DIM), batch_size=B,
                          generator=0)
    step = _trainer(ShareLock(V_DIM, T_DIM, hidden_dim=H, num_layers=L), data, B, dev)
    t = best(step, args.repeat, dev)
    floor = sharelock_flops(B, H, L) / rate
    return dict(name=f"sharelock step B={B} H={H} L={L} {dtype} (floor / measured)", measured=ms(t),
                reference=f"{ms(floor)} matmul floor", ratio=floor / t,
                note=f"{sharelock_flops(B, H, L) / 1e9:.1f} GFLOP at {rate / 1e12:.1f} TFLOP/s", ms=t * 1e3,
                floor_ms=floor * 1e3)


def _vlap_lm(smoke: bool, K: int):
    "Smoke: tiny-random-llama. Else a RANDOM-weight LanguageModel of SmolLM2's shape (vocab K, 576 dims)."
    from vla_lit.models import LanguageModel, load_lm
    tiny = load_lm("tiny-random-llama", device="cpu")
    if smoke: return tiny
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tiny.tokenizer
    cfg = LlamaConfig(vocab_size=K, hidden_size=T_DIM, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
    return LanguageModel(m, tok, "stand-in-random-smollm2-shape", "stand-in:seed0", is_decoder=True)


def bench_vlap(args, sz, dev, rate: float, dtype: str) -> dict:
    from vla_lit.vlap import VLAP
    from vla_lit.train import tensor_batches
    B, K, grid = sz["vlap"]
    lm = _vlap_lm(args.smoke, K)
    ids = torch.arange(K) if K < lm.vocab_size else None
    K = K if ids is not None else lm.vocab_size
    N = 1 + grid * grid
    torch.manual_seed(0)
    data = tensor_batches(vision=torch.randn(4 * B, N, V_DIM), text=torch.randn(4 * B, lm.dim), batch_size=B,
                          generator=0)
    mech = VLAP(lm, V_DIM, caption_weight=0.0, vocab_ids=ids)
    step = _trainer(mech, data, B, dev)
    t = best(step, args.repeat, dev)
    fl = vlap_flops(B, N, K) if lm.dim == T_DIM else (mm_units(B * N, lm.dim, V_DIM, 1)
                                                        + mm_units(B, K, lm.dim, 1) + mm_units(B, K, lm.dim, 0))
    floor = fl / rate
    return dict(name=f"vlap step B={B} N={N} K={K:,} {dtype} (floor / measured)", measured=ms(t),
                reference=f"{ms(floor)} matmul floor", ratio=floor / t,
                note=f"{fl / 1e9:.2f} GFLOP at {rate / 1e12:.1f} TFLOP/s; text dim {lm.dim}", ms=t * 1e3,
                floor_ms=floor * 1e3)


# ---- driver ----------------------------------------------------------------------------------------------
def _section(rows: list, failed: list, label: str, fn, *a):
    "Run one section; its row, or the error printed and a FAILED row."
    t0 = time.perf_counter()
    try:
        row = fn(*a)
    except Exception as e:  # noqa: BLE001 -- report and go on; the exit status says it failed
        traceback.print_exc()
        print(f"[{label}] FAILED: {type(e).__name__}: {e}", flush=True)
        failed.append(label)
        row = dict(name=f"{label} FAILED", measured="-", reference="-", ratio=float("nan"),
                   note=f"{type(e).__name__}: {e}"[:100])
    row["seconds"] = time.perf_counter() - t0
    print(f"[{label}] done in {row['seconds']:.1f} s", flush=True)
    rows.append(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and tiny RANDOM models (CPU ok, seconds)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats per measurement (best of)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers of the extraction")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but CUDA is not available here"); return 2
    mode = "smoke" if args.smoke else "gpu" if dev.type == "cuda" else "cpu"
    sz = SIZES[mode]
    args.repeat = args.repeat or (1 if args.smoke else 3)
    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"vla_lit GPU benchmark: mode {mode}, device {dev} ({what}), torch {torch.__version__}, "
          f"best of {args.repeat}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if mode != "gpu":
        print("NOTE: " + ("smoke sizes: checks the wiring, the figures mean nothing" if args.smoke else
                          "CPU at reduced sizes: NOT the GPU figure"))
    rows, failed, ctx = [], [], {}
    tmp = Path(tempfile.mkdtemp(prefix="vla_gpu_bench_"))
    try:
        _section(rows, failed, "extraction", bench_extraction, args, sz, dev, tmp)
        try:
            ctx["bw"] = bandwidth(dev, sz["bw_numel"], args.repeat + 2)
            print(f"measured bandwidth: {ctx['bw'] / 1e9:.1f} GB/s", flush=True)
        except Exception:  # noqa: BLE001 -- the Sinkhorn rows then fail with it
            traceback.print_exc(); failed.append("bandwidth")
        for B, K in sz["sinkhorn"]:
            _section(rows, failed, f"sinkhorn {B}x{K}", lambda B=B, K=K: bench_sinkhorn(args, B, K, ctx["bw"], dev))
            if dev.type == "cuda": torch.cuda.empty_cache()
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        dname = str(dtype).replace("torch.", "")
        try:
            ctx["rate"] = matmul_rate(dev, sz["mm"], dtype, args.repeat + 2)
            print(f"measured matmul throughput ({sz['mm']}^2, {dname}): {ctx['rate'] / 1e12:.2f} TFLOP/s", flush=True)
        except Exception:  # noqa: BLE001 -- the training-step rows then fail with it
            traceback.print_exc(); failed.append("matmul")
        _section(rows, failed, "sharelock", lambda: bench_sharelock(args, sz, dev, ctx["rate"], dname))
        _section(rows, failed, "vlap", lambda: bench_vlap(args, sz, dev, ctx["rate"], dname))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    w = max(len(r["name"]) for r in rows)
    print(f"\n{'name':<{w}}  {'measured':>14}  {'reference':>34}  {'ratio':>7}")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['measured']:>14}  {r['reference']:>34}  {r['ratio']:>7.3f}")
    print("\nnotes:\n" + "\n".join(f"  {r['name']}: {r.get('note', '')}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(mode=mode, device=str(dev), device_name=what, rows=rows,
                                                   bandwidth=ctx.get("bw"), matmul_rate=ctx.get("rate"),
                                                   failed=failed), indent=1))
    if failed: print(f"FAILED sections: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
