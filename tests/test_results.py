"""The figures, headline tables and claims of vla_lit.results (nbs/51_results.ipynb) on small fake sweeps written
to disk as the runner leaves them, and the shipped sweep files' `plot:` / `claims:` against their own runs.
Figures are checked as matplotlib objects (axes, bars, lines, labels), never as pixels. Seconds on a CPU."""
import json, math
from fnmatch import fnmatchcase
from pathlib import Path
import pytest
from matplotlib.container import BarContainer
from vla_lit.results import aggregate, claim_row, claims_table, collect, draw_figure, load_runs, verdict
from vla_lit.sweep import expand_runs, load_sweep, run_id

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT/"sweeps").glob("*.yaml"))


def fake_sweep(sd: Path, runs: list[tuple[dict, dict]], **meta) -> Path:
    "A sweep folder: one run folder per (knobs, metrics) (config.json, status.json, metrics.json), sweep.json."
    for knobs, metrics in runs:
        d = sd/run_id(knobs)
        d.mkdir(parents=True)
        (d/"config.json").write_text(json.dumps({"knobs": knobs, "params": knobs}))
        (d/"status.json").write_text(json.dumps({"status": "ok", "wall_s": 1.0, "error": None}))
        (d/"metrics.json").write_text(json.dumps(metrics))
    ids = [run_id(knobs) for knobs, _ in runs]                    # the sweep's order, as the runner records it
    (sd/"sweep.json").write_text(json.dumps({"name": sd.name, "seed_key": "seed", "run_ids": ids, **meta}))
    return sd


def lm_sweep(tmp_path: Path, seeds=(0,)) -> Path:
    "Decoder vs encoder, trained and floor top-1 on 100 held-out images, chance 0.25; seed s adds 0.01 s."
    runs = [({"lm_name": lm, "seed": s}, {"heldout_top1": top1 + 0.01 * s, "heldout_top1_floor": floor,
                                          "heldout_top1_chance": 0.25, "heldout_n": 100})
            for lm, top1, floor in [("smollm2", 0.6, 0.1), ("minilm", 0.5, 0.3)] for s in seeds]
    claims = [{"claim": "decoder beats encoder", "metric": "heldout_top1",
               "a": {"lm_name": "smollm2", "label": "SmolLM2"}, "b": {"lm_name": "minilm", "label": "MiniLM"}}]
    plot = [{"x": "lm_name", "kind": "bar", "title": "Which LM aligns?", "name": "lm",
             "metrics": ["{panel}_top1", "{panel}_top1_floor"], "panels": ["heldout"],
             "references": [{"metric": "{panel}_top1_chance", "label": "chance"}],
             "labels": {"smollm2": "SmolLM2 (decoder)", "{panel}_top1_floor": "random-LM floor"}}]
    return fake_sweep(tmp_path/"lm", runs, claims=claims, plot=plot, headline={"heldout_top1": "held-out top-1"})


def test_bar_figure_categorical(tmp_path):
    "Categories: grouped bars (trained, floor) per LM, reader labels on the ticks, chance as a horizontal line."
    runs = load_runs(lm_sweep(tmp_path))
    fig = draw_figure(aggregate(runs, runs.attrs["all_metrics"]), runs.attrs["plot"][0])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["SmolLM2 (decoder)", "minilm"]
    assert [[round(p.get_height(), 6) for p in c.patches] for c in ax.containers] == [[0.6, 0.5], [0.1, 0.3]]
    chance = [ln for ln in ax.get_lines() if ln.get_label() == "chance"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.25, 0.25]
    assert ax.get_title() == "heldout" and fig._suptitle.get_text().startswith("Which LM aligns?")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["heldout_top1", "random-LM floor", "chance"]


def test_bar_error_bars_only_with_seeds(tmp_path):
    "One seed: no error bars; three seeds: one error bar per bar, ± the sample std."
    one = load_runs(lm_sweep(tmp_path/"one"))
    three = load_runs(lm_sweep(tmp_path/"three", seeds=(0, 1, 2)))
    spec = one.attrs["plot"][0]
    bars = lambda r: [c for c in draw_figure(aggregate(r, r.attrs["all_metrics"]), spec).axes[0].containers
                      if isinstance(c, BarContainer)]
    bars1, bars3 = bars(one), bars(three)
    assert all(c.errorbar is None for c in bars1)
    seg = bars3[0].errorbar.lines[2][0].get_segments()[0]          # SmolLM2's trained bar: 0.61 ± 0.01
    assert math.isclose(seg[1][1] - seg[0][1], 2 * 0.01, rel_tol=1e-6)


def test_line_figure_numeric_and_from_metric_names(tmp_path):
    "A numeric knob gives a curve with a ± std band; `{k}` in a metric name puts k on x, capped by `x_max`."
    runs = [({"taildrop": td, "n_tokens": 4, "seed": s},
             {**{f"h_vilex_k{k}_cos": 0.5 + (k if td == "on" else 0) / 100 + s / 1000 for k in (1, 2, 4, 8)},
              "h_caption_cos": 0.5}) for td in ("on", "off") for s in (0, 1)]
    spec = {"x": "k", "metrics": ["h_vilex_k{k}_cos"], "hue": "taildrop", "x_max": "n_tokens",
            "references": [{"metric": "h_caption_cos", "label": "caption prompt"}, 0.45]}
    r = load_runs(fake_sweep(tmp_path/"v", runs, plot=[spec]))
    ax = draw_figure(aggregate(r, r.attrs["all_metrics"]), spec).axes[0]
    curves = [ln for ln in ax.get_lines() if ln.get_gid() != "reference"]
    assert [list(ln.get_xdata()) for ln in curves] == [[1, 2, 4], [1, 2, 4]]          # k = 8 > 4 tokens: dropped
    assert [ln.get_label() for ln in curves] == ["taildrop=on", "taildrop=off"]
    assert len(ax.collections) == 2                                                   # the two seed bands
    refs = [(ln.get_label(), ln.get_ydata()[0]) for ln in ax.get_lines() if ln.get_gid() == "reference"]
    assert refs == [("caption prompt", 0.5), ("0.45", 0.45)]


def test_scatter_frontier(tmp_path):
    "x and y both metrics: one point per setting, joined per penalty in order of its weight, annotated."
    runs = [({"penalty": p, "lam": lam, "seed": 0}, {"active": act, "r10": r})
            for p, lam, act, r in [("overuse", 0.1, 10., 0.40), ("overuse", 0.01, 50., 0.50),
                                   ("flops", 0.01, 60., 0.45)]]
    spec = {"x": "active", "y": "r10", "hue": "penalty", "annotate": "lam", "logx": True}
    r = load_runs(fake_sweep(tmp_path/"lx", runs, plot=[spec]))
    ax = draw_figure(aggregate(r, r.attrs["all_metrics"]), spec).axes[0]
    assert [list(ln.get_xdata()) for ln in ax.get_lines()] == [[50., 10.], [60.]]
    assert [t.get_text() for t in ax.texts] == ["lam=0.01", "lam=0.1", "lam=0.01"]
    assert (ax.get_xscale(), ax.get_xlabel(), ax.get_ylabel()) == ("log", "active", "r10")


def test_collect_writes_named_figure_and_headline(tmp_path):
    "collect: the figure under its name, results.md led by the headline and the claims, the full table below."
    sd = lm_sweep(tmp_path)
    t = collect(sd)
    assert [Path(p).name for p in t.attrs["plots"]] == ["lm.png"]
    md = (sd/"results.md").read_text()
    assert md.index("## Headline") < md.index("## Claims") < md.index("## Every tabulated metric")
    assert "| lm_name | seeds | held-out top-1 |" in " ".join(md.split())


def test_claim_row_from_fake_runs(tmp_path):
    "One seed: the binomial s.e. on 100 items; d = 0.1 < 2s = 0.14: inconclusive. Three seeds: seed s.e. decides."
    row = claim_row(load_runs(lm_sweep(tmp_path/"one")), {"claim": "c", "metric": "heldout_top1",
                                                          "a": {"lm_name": "smollm2"}, "b": {"lm_name": "minilm"}})
    assert math.isclose(row["d"], 0.1) and math.isclose(row["s"], math.sqrt((0.24 + 0.25) / 100))
    assert (row["verdict"], row["data"], row["seeds"]) == ("inconclusive at this scale", "heldout (100 items)",
                                                           "1 / 1")
    df, md = claims_table([lm_sweep(tmp_path/"three", seeds=(0, 1, 2))])
    # both sides add 0.00, 0.01, 0.02: equal spreads, so s = sqrt(2 * 0.01**2 / 3) and d = 0.1 >> 2s
    assert math.isclose(df.s[0], math.sqrt(2 * 0.01 ** 2 / 3)) and df.verdict[0] == "holds"
    assert "| decoder beats encoder |" in " ".join(md.split()) and "holds if d > 2s" in md


@pytest.mark.parametrize("d, s, test, want", [
    (0.2, 0.1, "better", "inconclusive at this scale"), (0.2 + 1e-9, 0.1, "better", "holds"),
    (-0.2, 0.1, "better", "inconclusive at this scale"), (-0.2 - 1e-9, 0.1, "better", "does not hold"),
    (3.0, None, "better", "inconclusive at this scale"), (0.0, 0.0, "better", "inconclusive at this scale"),
    (-0.2, 0.1, "no_worse", "holds"), (-0.2 - 1e-9, 0.1, "no_worse", "does not hold"),
    (1.0, None, "no_worse", "inconclusive at this scale")])
def test_verdict_edges(d, s, test, want):
    "The rule at its edges: d = ±2s is inconclusive, beyond it decides; no noise estimate: inconclusive."
    assert verdict(d, s, test) == want


def _hits(runs, side: dict) -> list:
    "The runs one claim side selects: its knob values (`id`: a run-id glob), as vla_lit.results does."
    where = {k: v for k, v in side.items() if k not in ("metric", "label")}
    return [r for r in runs if all(fnmatchcase(r.id, str(v)) if k == "id" else str(r.knobs.get(k)) == str(v)
                                   for k, v in where.items())]


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_shipped_claims_select_runs(sweep_file):
    """Every claim side of a shipped sweep selects runs of the full study, and of the demo for the embedded sweeps
    (`vla_lit demo` prints their claims): no typo in a knob or a value."""
    sw = load_sweep(sweep_file)
    sizes = [False, True] if sweep_file.name.endswith("_embedded.yaml") else [False]
    for demo in sizes:
        runs = expand_runs(sw, demo=demo)
        for c in sw["claims"]:
            for side in ("a", "b"):
                assert _hits(runs, c[side]), f"{c['claim']!r}: side {side} selects no run (demo={demo})"
