"""The GPU benchmark's smoke mode runs on the CPU and prints every ratio as a finite number (no timing asserts)."""
import json, math, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("extraction", "sinkhorn 8 x 256", "sinkhorn 16 x 512", "sharelock step", "vlap step")


def test_gpu_bench_smoke_prints_finite_ratios(tmp_path):
    out = tmp_path/"bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT/"benchmarks"/"gpu_bench.py"), "--smoke", "--device", "cpu",
                        "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    table = p.stdout.split("\nname ", 1)[1].split("\nnotes:", 1)[0].strip().splitlines()[1:]
    for s in SECTIONS:
        line = next((row for row in table if row.startswith(s)), None)
        assert line is not None, f"no table row for {s!r} in:\n{p.stdout[-2000:]}"
        assert math.isfinite(float(line.split()[-1])), line
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(SECTIONS) and all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows)


def test_gpu_bench_floors_count_what_the_docstring_says():
    sys.path.insert(0, str(ROOT/"benchmarks"))
    try:
        import gpu_bench as gb
    finally:
        sys.path.pop(0)
    assert gb.SINKHORN_PASSES(3) == 10                        # kernel r+w, 2 reads per iteration, plan r+w
    assert gb.mm_units(2, 3, 4, grads=2) == 3 * 2 * 2 * 3 * 4  # forward + both operands' gradients
    B, H = 8, 16                                               # 2 layers: 576 -> 16 -> 384, logits, accuracy
    want = 2 * B * (576 * H * 2 + H * 384 * 3) + 2 * B * B * 384 * (2 + 1)
    assert gb.sharelock_flops(B, H, 2) == want
