"The LexVLA sweep: the full study compares none / overuse / FLOPs over 3 seeds, and its demo block keeps that comparison."
from pathlib import Path
from vla_lit.sweep import load_sweep, expand_runs

ROOT = Path(__file__).resolve().parents[1]

def _by_penalty(runs):
    out = {}
    for r in runs: out.setdefault(r.params["penalty"], set()).add(r.params["seed"])
    return out

def test_full_study_three_seeds_per_penalty():
    sw = load_sweep(ROOT/"sweeps/lexvla_embedded.yaml")
    assert _by_penalty(expand_runs(sw)) == {"none": {0, 1, 2}, "overuse": {0, 1, 2}, "flops": {0, 1, 2}}

def test_demo_keeps_the_main_comparison():
    sw = load_sweep(ROOT/"sweeps/lexvla_embedded.yaml")
    runs = expand_runs(sw, demo=True)
    assert _by_penalty(runs) == {"none": {0}, "overuse": {0}, "flops": {0}}
    lams = {r.params["penalty"]: r.params["penalty_lambda"] for r in runs}
    assert lams["overuse"] == lams["flops"] > 0                      # same weight for both penalties
    assert all(r.params["steps"] >= 100 for r in runs)                # long enough for the notebook's word assertions
