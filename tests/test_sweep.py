"""The sweep runner (vla_lit.sweep, nbs/50_sweep.ipynb), the results (vla_lit.results, nbs/51_results.ipynb)
and the command line (vla_lit.cli, nbs/52_cli.ipynb) end to end: papermill runs in subprocesses, failures
and resumption, the collected table, torchrun with gloo, the CLI, and a smoke run of every shipped sweep
file (so sweeps added later are covered)."""
import json, math, os, subprocess, sys, time
from pathlib import Path
import nbformat, pytest, yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from vla_lit.sweep import SweepError, check_parameters, expand_runs, load_sweep, notebook_parameters, run_sweep
from vla_lit.results import collect, load_runs, summarize, write_summary_notebook
from vla_lit.data import data_specs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "vla_lit.cli"]       # the `vla_lit` command, whatever the installed entry point
SWEEPS = sorted((ROOT/"sweeps").glob("*.yaml"))
KERNEL = {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}}


def write_nb(path: Path, *cells: str, params: str = "a = 1\nb = 1\nseed = 0\nout_dir = '.'") -> Path:
    "A notebook whose first code cell (untagged, found by its out_dir) holds the parameters."
    nb = new_notebook(cells=[new_markdown_cell("# test"), new_code_cell(params), *map(new_code_cell, cells)], metadata=KERNEL)
    nbformat.write(nb, path)
    return path


def grid_nb(path: Path, broken: bool) -> Path:
    "score = 10 a + b + seed / 10; the (a=2, b=2) run raises while `broken`."
    return write_nb(path,
        "import json, os, sys\nfrom pathlib import Path",
        "if a == 2 and b == 2: raise ValueError('broken corner a=2 b=2')" if broken else "pass",
        "Path(out_dir, 'metrics.json').write_text(json.dumps({'score': 10 * a + b + seed / 10}))\n"
        "Path(out_dir, 'env.json').write_text(json.dumps({'python': sys.executable, "
        "'device_env': os.environ.get('VLA_LIT_DEVICE'), 'device': globals().get('device')}))")


def mtimes(d: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in d.glob("*/run.ipynb")}


def test_grid_failure_and_resume(tmp_path):
    "2x2 grid: one run raises, three finish and are reported; after the fix a re-run executes only the missing/failed."
    grid_nb(tmp_path/"exp.ipynb", broken=True)
    cfg = {"name": "g", "notebook": str(tmp_path/"exp.ipynb"), "grid": {"a": [1, 2], "b": [1, 2]}}
    res = run_sweep(cfg, out_root=tmp_path/"runs", jobs=2, progress=False)
    sd = tmp_path/"runs"/"g"
    assert res.status.to_dict() == {"a=1__b=1": "ok", "a=1__b=2": "ok", "a=2__b=1": "ok", "a=2__b=2": "failed"}
    assert "ValueError: broken corner a=2 b=2" in res.loc["a=2__b=2", "error"]
    st = json.loads((sd/"a=2__b=2"/"status.json").read_text())
    assert st["status"] == "failed" and "broken corner" in st["traceback"] and st["wall_s"] > 0
    assert (sd/"a=2__b=2"/"run.ipynb").exists() and not (sd/"a=2__b=2"/"metrics.json").exists()
    for rid in ("a=1__b=1", "a=1__b=2", "a=2__b=1"):
        files = {p.name for p in (sd/rid).iterdir()}
        assert {"run.ipynb", "params.json", "config.json", "metrics.json", "status.json", "log.txt"} <= files
    assert json.loads((sd/"a=2__b=1"/"metrics.json").read_text()) == {"score": 21.0}
    env = json.loads((sd/"a=1__b=1"/"env.json").read_text())
    assert env["python"] == sys.executable                 # the venv's own kernel
    table = collect(sd)
    assert table.n.tolist() == [1, 1, 1, 0] and table.failed.tolist() == [0, 0, 0, 1]
    assert "a=2__b=2" in (sd/"results.md").read_text() and "broken corner" in (sd/"results.md").read_text()

    # fix the notebook, lose one finished run: the re-run executes exactly those two
    grid_nb(tmp_path/"exp.ipynb", broken=False)
    before = mtimes(sd)
    import shutil; shutil.rmtree(sd/"a=1__b=2")
    res2 = run_sweep(cfg, out_root=tmp_path/"runs", jobs=2, progress=False)
    assert res2.status.to_dict() == {"a=1__b=1": "skipped", "a=1__b=2": "ok", "a=2__b=1": "skipped", "a=2__b=2": "ok"}
    after = mtimes(sd)
    assert after["a=1__b=1"] == before["a=1__b=1"] and after["a=2__b=1"] == before["a=2__b=1"]
    assert json.loads((sd/"a=2__b=2"/"metrics.json").read_text()) == {"score": 22.0}
    # a third run has nothing to do; --force re-runs everything selected
    assert set(run_sweep(cfg, out_root=tmp_path/"runs", progress=False).status) == {"skipped"}
    assert run_sweep(cfg, out_root=tmp_path/"runs", only="a=1__b=1", force=True, progress=False).status.to_dict() == {"a=1__b=1": "ok"}
    # changing a base parameter makes finished runs stale (their params.json no longer matches)
    stale = {**cfg, "base": {"seed": 3}}
    assert set(run_sweep(stale, out_root=tmp_path/"runs", only=1, progress=False).status) == {"ok"}


def _fake_run(sd: Path, rid: str, knobs: dict, metrics: dict | None, status: str = "ok"):
    d = sd/rid; d.mkdir(parents=True)
    (d/"config.json").write_text(json.dumps({"knobs": knobs, "params": knobs}))
    (d/"status.json").write_text(json.dumps({"status": status, "wall_s": 1.0, "error": None if status == "ok" else "boom"}))
    if metrics is not None: (d/"metrics.json").write_text(json.dumps(metrics))


def test_collect_table_by_hand(tmp_path):
    "mean and sample std over seeds, grouped by the other knobs; failed runs counted, not averaged."
    sd = tmp_path/"s"
    vals = {("ot", 0): 1.0, ("ot", 1): 2.0, ("ot", 2): 4.0, ("clip", 0): 5.0, ("clip", 1): 7.0}
    for (m, s), v in vals.items(): _fake_run(sd, f"m={m}__seed={s}", {"method": m, "seed": s}, {"acc": v, "ok": True, "note": "x"})
    _fake_run(sd, "m=clip__seed=2", {"method": "clip", "seed": 2}, None, status="failed")
    t = collect(sd)
    assert t.method.tolist() == ["clip", "ot"] or t.method.tolist() == ["ot", "clip"]
    t = t.set_index("method")
    # ot: 1, 2, 4 -> mean 7/3, s = sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2) = sqrt(7/3)
    assert math.isclose(t.loc["ot", "acc_mean"], 7 / 3) and math.isclose(t.loc["ot", "acc_std"], math.sqrt(7 / 3))
    # clip: 5, 7 (seed 2 failed) -> mean 6, s = sqrt(2)
    assert math.isclose(t.loc["clip", "acc_mean"], 6.0) and math.isclose(t.loc["clip", "acc_std"], math.sqrt(2))
    assert t.loc["ot", "n"] == 3 and t.loc["clip", "n"] == 2 and t.loc["clip", "failed"] == 1
    assert t.loc["ot", "ok_mean"] == 1.0 and "note_mean" not in t            # bools as 0/1, strings ignored
    md = " ".join((sd/"results.md").read_text().split())
    assert "| ot | 3 | 0 | 2.333 ± 1.5 |" in md and "| clip | 2 | 1 | 6 ± 1.4 |" in md, md
    import pandas as pd
    csv = pd.read_csv(sd/"results.csv").set_index("method")
    assert math.isclose(csv.loc["ot", "acc_std"], math.sqrt(7 / 3))
    assert len(pd.read_csv(sd/"runs.csv")) == 6
    assert [p.name for p in (sd/"plots").glob("*.png")] == ["vs_method.png"]
    s = summarize(sd)
    assert s.markdown == (sd/"results.md").read_text() and len(s.plots) == 1


def test_single_seed_and_no_knobs(tmp_path):
    "n = 1 gives an empty std; a sweep without knobs is one row."
    sd = tmp_path/"s"
    _fake_run(sd, "run", {}, {"acc": 0.5})
    t = collect(sd)
    assert len(t) == 1 and t.acc_mean[0] == 0.5 and math.isnan(t.acc_std[0])
    assert "| 1 | 0.5 |" in " ".join((sd/"results.md").read_text().split())


def test_torchrun_gloo_two_processes(tmp_path):
    "A run with launcher torchrun x2: both ranks execute the notebook (gloo all_reduce); rank 0's outputs are kept."
    write_nb(tmp_path/"ddp.ipynb",
        "import json, os, torch, torch.distributed as dist\nfrom pathlib import Path\n"
        "dist.init_process_group('gloo')\nr, w = dist.get_rank(), dist.get_world_size()\n"
        "t = torch.tensor([float(a * (r + 1))])\ndist.all_reduce(t)\n"
        "Path(out_dir, 'metrics.json').write_text(json.dumps({'sum': t.item(), 'world': w, 'rank': r,"
        " 'env_rank': int(os.environ['RANK'])}))\ndist.destroy_process_group()",
        params="a = 1\nout_dir = '.'")
    cfg = {"name": "ddp", "notebook": str(tmp_path/"ddp.ipynb"), "base": {"a": 3},
           "launcher": {"torchrun": {"nproc_per_node": 2}}, "timeout": 300}
    res = run_sweep(cfg, out_root=tmp_path/"runs", progress=False)
    d = tmp_path/"runs"/"ddp"/"run"
    assert res.status.to_dict() == {"run": "ok"}, (d/"log.txt").read_text()[-3000:]
    assert json.loads((d/"metrics.json").read_text()) == {"sum": 9.0, "world": 2, "rank": 0, "env_rank": 0}  # 3*1 + 3*2
    assert not (d/"ranks").exists()                                     # rank 1's copy removed on success
    assert json.loads((d/"config.json").read_text())["launcher"] == {"torchrun": {"nproc_per_node": 2}}


def test_timeout_and_missing_metrics(tmp_path):
    "A run past the sweep's timeout is killed (its kernel too) and recorded; a notebook that writes no metrics.json fails."
    write_nb(tmp_path/"slow.ipynb", "import os, time\nfrom pathlib import Path\nPath(out_dir, 'kernel.pid').write_text(str(os.getpid()))",
             "if a == 1: time.sleep(600)", params="a = 1\nout_dir = '.'")
    t0 = time.time()
    res = run_sweep({"name": "t", "notebook": str(tmp_path/"slow.ipynb"), "base": {"a": 1}, "timeout": 20},
                    out_root=tmp_path/"runs", progress=False)
    assert time.time() - t0 < 120
    assert res.status.to_dict() == {"run": "failed"} and "timed out after 20 s" in res.loc["run", "error"]
    pid_file = tmp_path/"runs"/"t"/"run"/"kernel.pid"
    if pid_file.exists():     # (on a very slow machine the kernel may not have got that far)
        kernel = int(pid_file.read_text()); t0 = time.time()
        while Path(f"/proc/{kernel}").exists() and time.time() - t0 < 20: time.sleep(0.5)
        assert not Path(f"/proc/{kernel}").exists(), "the timed-out run's kernel is still alive"
    res = run_sweep({"name": "t2", "notebook": str(tmp_path/"slow.ipynb"), "base": {"a": 2}}, out_root=tmp_path/"runs", progress=False)
    assert res.status.to_dict() == {"run": "failed"} and "wrote no metrics.json" in res.loc["run", "error"]


def test_device_and_checks(tmp_path):
    "--device reaches the notebook as a parameter (when it has one) and as VLA_LIT_DEVICE; bad sweeps fail before running."
    nb = write_nb(tmp_path/"dev.ipynb",
        "import json, os\nfrom pathlib import Path\n"
        "Path(out_dir, 'metrics.json').write_text(json.dumps({'x': 1}))\n"
        "Path(out_dir, 'env.json').write_text(json.dumps({'device': device, 'env': os.environ.get('VLA_LIT_DEVICE')}))",
        params="device = None\nout_dir = '.'")
    res = run_sweep({"name": "d", "notebook": str(nb)}, out_root=tmp_path/"runs", device="cpu", progress=False)
    assert res.status.to_dict() == {"run": "ok"}
    assert json.loads((tmp_path/"runs"/"d"/"run"/"env.json").read_text()) == {"device": "cpu", "env": "cpu"}
    with pytest.raises(SweepError, match=r"\['lr'\] are not defined"):
        run_sweep({"name": "d", "notebook": str(nb), "grid": {"lr": [1, 2]}}, out_root=tmp_path/"runs", progress=False)
    assert not (tmp_path/"runs"/"d"/"lr=1").exists()


def test_cli(tmp_path):
    "`vla_lit sweep` exits 1 when a run failed (after running the others), `vla_lit collect` prints the table."
    grid_nb(tmp_path/"exp.ipynb", broken=True)
    (tmp_path/"s.yaml").write_text(yaml.safe_dump({"name": "cli", "notebook": "exp.ipynb", "base": {"a": 2}, "grid": {"b": [1, 2]}}))
    r = subprocess.run([*CLI, "sweep", str(tmp_path/"s.yaml"), "--out", str(tmp_path/"runs"), "--jobs", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED b=2" in r.stderr and "results.md" in r.stdout
    r = subprocess.run([*CLI, "collect", str(tmp_path/"runs"/"cli")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "| 21 |" in " ".join(r.stdout.split()), r.stdout + r.stderr
    r = subprocess.run([*CLI, "sweep", str(tmp_path/"missing.yaml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_console_script(tmp_path):
    "The installed `vla_lit` executable is the command of vla_lit.cli (settings.ini: console_scripts)."
    sd = tmp_path/"s"
    _fake_run(sd, "run", {}, {"acc": 0.5})
    r = subprocess.run([str(BIN/"vla_lit"), "collect", str(sd)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "| 1 | 0.5 |" in " ".join(r.stdout.split()), r.stdout + r.stderr


def test_summary_notebook(tmp_path):
    "nbs/experiments/summary.ipynb shows a collected sweep (papermill, parameter sweep_dir)."
    sd = tmp_path/"s"
    for s in (0, 1): _fake_run(sd, f"k=1__seed={s}", {"k": 1, "seed": s}, {"acc": 0.5 + s})
    for s in (0, 1): _fake_run(sd, f"k=2__seed={s}", {"k": 2, "seed": s}, {"acc": 1.5 + s})
    out = write_summary_notebook(sd, root=ROOT)
    nb = nbformat.read(out, as_version=4)
    text = json.dumps([c.get("outputs", []) for c in nb.cells], ensure_ascii=False)
    assert "1 ± 0.71" in text and "image/png" in text


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_smoke(sweep_file, tmp_path):
    """Every shipped sweep file is valid, and its notebook runs once with the sweep's smoke overrides; a GPU sweep
    (`*_gpu.yaml`) runs its rehearsal instead: every distinct run, tiny random local models, generated data."""
    sw = load_sweep(sweep_file)
    if sweep_file.name.endswith("_gpu.yaml"): return _rehearse(sweep_file, sw, tmp_path)
    assert sw["smoke"], f"{sweep_file.name} has no `smoke` overrides"
    _, defaults = notebook_parameters(sw["notebook"])
    assert defaults is None or "out_dir" in defaults
    assert len(expand_runs(sw)) >= 1
    for demo in (False, True):     # every run of the full study and of the demo size names real parameters
        check_parameters(expand_runs(sw, demo=demo), defaults, sw["notebook"], sweep_file.name)
    has_demo = any(sw["demo"].values())
    if sweep_file.name.endswith("_embedded.yaml"):   # the main job (`vla_lit demo`) runs these in demo size
        assert has_demo, f"{sweep_file.name} has no `demo` block, so `vla_lit demo` would run the whole study"
    # the smoke run goes through the demo block when there is one: that is the main job's path
    res = run_sweep(sweep_file, out_root=tmp_path, smoke=True, demo=has_demo, only=1, progress=False)
    sdir = tmp_path/(sw["name"] + ("-demo" if has_demo else "") + "-smoke")
    rid = res.index[0]
    assert res.status.tolist() == ["ok"], (sdir/rid/"log.txt").read_text()[-4000:]
    m = json.loads((sdir/rid/"metrics.json").read_text())
    assert m and all(isinstance(v, (int, float)) for v in m.values()), m
    params = json.loads((sdir/rid/"params.json").read_text())
    missing = _missing_metrics(sw, m, params)
    assert not missing, f"{sweep_file.name} tabulates {missing}, which its notebook's metrics.json lacks"
    collect(sdir)


def _missing_metrics(sw, m, params) -> list[str]:
    """The tabulated metrics a run's metrics.json lacks, leaving out those of evaluation sets the run did not
    score (a smoke run or a rehearsal scores fewer sets): a key belongs to the longest set name it starts with."""
    sets = {s.name for s in data_specs(params.get("eval_data"))}
    declared = [sw["base"].get("eval_data"), (sw["demo"].get("params") or {}).get("eval_data")]
    names = sets | {s.name for d in declared for s in data_specs(d)}
    owner = lambda k: max([n for n in names if k.startswith(f"{n}_")], key=len, default=None)
    return [k for k in sw["metrics"] or [] if k not in m and owner(k) in sets | {None}]


def _rehearse(sweep_file, sw, tmp_path):
    "The rehearsal of a GPU sweep: every run ok, every tabulated metric written, the table collected."
    assert any(sw["rehearsal"].values()), f"{sweep_file.name} has no `rehearsal` block"
    _, defaults = notebook_parameters(sw["notebook"])
    check_parameters(expand_runs(sw), defaults, sw["notebook"], sweep_file.name)
    res = run_sweep(sweep_file, out_root=tmp_path, rehearse=True, progress=False)
    sdir = tmp_path/(sw["name"] + "-rehearsal")
    for rid, st in res.status.items():
        assert st == "ok", (sdir/rid/"log.txt").read_text()[-4000:]
        m = json.loads((sdir/rid/"metrics.json").read_text())
        params = json.loads((sdir/rid/"params.json").read_text())
        missing = _missing_metrics(sw, m, params)
        assert not missing, f"{sweep_file.name} tabulates {missing}, which its rehearsal's metrics.json lacks"
        hub = [v for v in params.values() if isinstance(v, str) and v in sw["rehearsal"]["models"]]
        assert not hub, f"{rid}: hub ids left in a rehearsal run: {hub}"
    collect(sdir)


def test_ctrl_c_interrupts_and_resumes(tmp_path):
    "Ctrl-C stops the running run (its kernel too) and records it as interrupted; the next call resumes it."
    import signal
    write_nb(tmp_path/"slow.ipynb",
        "import json, os, time\nfrom pathlib import Path\nPath(out_dir, 'kernel.pid').write_text(str(os.getpid()))\n"
        "if wait: time.sleep(300)",
        "Path(out_dir, 'metrics.json').write_text(json.dumps({'x': 1.0}))", params="wait = True\nout_dir = '.'")
    (tmp_path/"s.yaml").write_text(yaml.safe_dump({"name": "i", "notebook": "slow.ipynb"}))
    cmd = [*CLI, "sweep", str(tmp_path/"s.yaml"), "--out", str(tmp_path/"runs")]
    # a shell that runs the tests in the background (`cmd &`, CI runners, nohup) starts them with SIGINT
    # ignored, and an ignored SIGINT is inherited: give the sweep the terminal's default, as Ctrl-C would find it
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid_file = tmp_path/"runs"/"i"/"run"/"kernel.pid"
    t0 = time.time()
    while not pid_file.exists() and time.time() - t0 < 180: time.sleep(0.5)
    assert pid_file.exists(), "the run never started"
    kernel = int(pid_file.read_text())
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, out + err
    assert json.loads((tmp_path/"runs"/"i"/"run"/"status.json").read_text())["status"] == "interrupted"
    t0 = time.time()
    while Path(f"/proc/{kernel}").exists() and time.time() - t0 < 20: time.sleep(0.5)
    assert not Path(f"/proc/{kernel}").exists(), "the run's kernel outlived the interrupted sweep"
    (tmp_path/"s.yaml").write_text(yaml.safe_dump({"name": "i", "notebook": "slow.ipynb", "base": {"wait": False}}))
    res = run_sweep(tmp_path/"s.yaml", out_root=tmp_path/"runs", progress=False)
    assert res.status.to_dict() == {"run": "ok"}
