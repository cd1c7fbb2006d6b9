"""Where `make demo`'s time goes, read back from the executed run notebooks of a finished demo.

    python benchmarks/demo_profile.py [runs] [--total SECONDS] [--install SECONDS]

Every run folder `runs/<sweep>-demo/<run>/run.ipynb` carries papermill's wall time per cell and the run's
progress bars (their final `[mm:ss<...]` elapsed times). Each cell's time is attributed, in this order:
  1. to the progress bars printed inside it, by bar name: `features <vision model>` -> image features,
     `text features <lm>` -> text features, `decoder pre-training` -> ViLex decoder pre-training,
     `Converting ... GGUF` -> model conversion, `load images` -> image decoding, any other bar -> training;
  2. the rest of the cell by what its source calls: `extract_features` / `extract_text_features` /
     `lexical_codebook` -> feature extraction without a bar, `load_vision` / `load_lm` -> model loading,
     `evaluate` / `recon_metrics` / `score` -> evaluation, a cell that starts with imports -> imports, else other.
A run's papermill duration minus its cells is kernel start-up and papermill; `--total` (the demo's own
"finished in N s" line) minus the runs is the runner, collection, plots and summary notebooks; `--install`
is `make`'s set-up (pip, Debian packages), timed outside. Prints a table; nothing is asserted."""
from __future__ import annotations
import argparse, json, re
from collections import defaultdict
from pathlib import Path

BAR = re.compile(r"([^\r\n|]+?):\s+100%\|[^|]*\|\s*\d+/\d+\s+\[(?:(\d+):)?(\d+):(\d+)<")

def bar_category(name: str) -> str:
    if name.startswith("text features"): return "text features (LM forward)"
    if name.startswith("features"): return "image features (vision forward)"
    if name.startswith("decoder pre-training"): return "ViLex decoder pre-training"
    if "GGUF" in name: return "model conversion"
    if name.startswith("load images"): return "image decoding"
    return "training"

def source_category(src: str, first: bool) -> str:
    if first or re.match(r"(import|from) ", src): return "imports (first-use model conversion included)"
    if re.search(r"extract_(text_)?features|lexical_codebook|text_rows|class_rows", src):
        return "feature extraction (no progress bar)"
    if re.search(r"\bevaluate\(|recon_metrics|score_run|reconstruct", src): return "evaluation, sampling"
    if re.search(r"load_(vision|lm)\(", src): return "model loading"
    return "other (training set-up, plots, writing)"

def bars(cell) -> list[tuple[str, float]]:
    "(name, seconds) of each finished progress bar in a cell (tqdm prints the last state twice: kept once)."
    text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))
    out = []
    for m in BAR.finditer(text):
        s = int(m.group(2) or 0) * 3600 + int(m.group(3)) * 60 + int(m.group(4))
        item = (m.group(1).strip(), float(s))
        if not out or out[-1] != item: out.append(item)
    return out

def profile_run(nb_path: Path) -> dict[str, float]:
    nb = json.loads(nb_path.read_text())
    cats, cells = defaultdict(float), 0.0
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, c in enumerate(code):
        d = float((c.get("metadata", {}).get("papermill", {}) or {}).get("duration") or 0.0)
        cells += d
        left = d
        for name, s in bars(c):
            s = min(s, left)
            cats[bar_category(name)] += s
            left -= s
        cats[source_category("".join(c["source"]), i == 0)] += max(left, 0.0)
    total = float(nb["metadata"].get("papermill", {}).get("duration") or cells)
    cats["kernel start-up, papermill"] += max(total - cells, 0.0)
    return dict(cats)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default="runs")
    ap.add_argument("--total", type=float, default=None, help="the demo's own wall time (its last line)")
    ap.add_argument("--install", type=float, default=None, help="make's set-up time, measured outside")
    ap.add_argument("--glob", default="*-demo")
    args = ap.parse_args(argv)
    per_sweep, cats = defaultdict(float), defaultdict(float)
    for nb in sorted(Path(args.runs).glob(f"{args.glob}/*/run.ipynb")):
        for k, v in profile_run(nb).items():
            cats[k] += v
            per_sweep[nb.parent.parent.name] += v
    in_runs = sum(cats.values())
    if args.total is not None: cats["runner, collection, plots, summary notebooks"] = max(args.total - in_runs, 0)
    if args.install is not None: cats["install (make: venv, pip, Debian packages)"] = args.install
    grand = sum(cats.values())
    print(f"{'where the time goes':48s} {'seconds':>8s} {'share':>6s}")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"{k:48s} {v:8.0f} {100 * v / grand:5.1f}%")
    print(f"{'total':48s} {grand:8.0f}")
    print("\nper sweep (inside its runs):")
    for k, v in sorted(per_sweep.items(), key=lambda kv: -kv[1]):
        print(f"  {k:40s} {v:7.0f} s")

if __name__ == "__main__":
    main()
