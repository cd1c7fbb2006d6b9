"""A run on an empty cache gives the numbers every rerun gives: extraction and model conversion may draw from
torch's RNG, so an experiment must seed its mechanism's initialisation after them (tiny random models)."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = Path(sys.executable).parent / "papermill"
SMOKE = ["-p", "seed", "0", "-p", "vision", "tiny-random-dinov2", "-p", "lm_name", "tiny-random-llama", "-p", "steps", "2",
         "-p", "batch_size", "4", "-p", "train_data", "tuxpaint?split=train&limit=21", "-p", "vocab_top", "64",
         "-y", json.dumps({"eval_data": ["tuxpaint?split=test&task=retrieval&limit=3"]}), "-p", "n_caption_eval", "2",
         "-p", "max_new_tokens", "3", "-p", "show", "False"]


def _run(tmp: Path, name: str) -> dict:
    out = tmp / name
    env = {**os.environ, "VLA_LIT_CACHE": str(tmp / "cache")}
    subprocess.run([str(PAPERMILL), "-k", "python3", str(ROOT / "nbs/experiments/vlap_train.ipynb"), str(tmp / f"{name}.ipynb"),
                    "-p", "out_dir", str(out), *SMOKE], check=True, env=env, capture_output=True, cwd=tmp)
    return json.loads((out / "metrics.json").read_text())


def test_cold_cache_run_equals_warm_rerun(tmp_path):
    cold, warm = _run(tmp_path, "cold"), _run(tmp_path, "warm")
    assert cold["peak_host_mb"] > 0 and warm["peak_host_mb"] > 0     # measured, different in every process
    keys = [k for k in cold if "second" not in k and "step" not in k and not k.startswith("peak_")]
    assert keys and {k: cold[k] for k in keys} == {k: warm[k] for k in keys}
