"""The sweep runner's submitit executors (vla_lit.sweep, nbs/50_sweep.ipynb, "Running on Slurm"): a sweep run as
one job per run through submitit's local executor, killed mid-way (the runner, then one job), resumed, and collected
as a local run; and the Slurm options as the sweep file and sbatch see them (no cluster needed)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import nbformat, pytest, yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from vla_lit.sweep import Run, SweepError, _job_params, _LocalJobRef, load_sweep, run_sweep
from vla_lit.results import collect

CLI = [sys.executable, "-m", "vla_lit.cli"]
KERNEL = {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}}


def write_nb(path: Path, *cells: str, params: str) -> Path:
    "A notebook whose first code cell (untagged, found by its out_dir) holds the parameters (as in test_sweep.py)."
    nb = new_notebook(cells=[new_markdown_cell("# test"), new_code_cell(params), *map(new_code_cell, cells)], metadata=KERNEL)
    nbformat.write(nb, path)
    return path


def gated_nb(path: Path) -> Path:
    "score = 10 a + b + seed / 10; runs with a == 2 wait for the file `gate`; each finished run appends to `done_log`."
    return write_nb(path,
        "import json, os, time\nfrom pathlib import Path",
        "if gate and a == 2:\n    Path(out_dir, 'waiting').write_text(str(os.getpid()))\n    t0 = time.time()\n"
        "    while not Path(gate).exists() and time.time() - t0 < 600: time.sleep(0.2)",
        "Path(out_dir, 'metrics.json').write_text(json.dumps({'score': 10 * a + b + seed / 10}))\n"
        "if done_log:\n    with open(done_log, 'a') as f: f.write(f'a={a}__b={b}\\n')",
        params="a = 1\nb = 1\nseed = 0\ngate = ''\ndone_log = ''\nout_dir = '.'")


def wait_for(cond, what: str, limit: float = 300):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < limit, f"timed out waiting for {what}"
        time.sleep(0.5)


def status(d: Path) -> dict:
    try:
        return json.loads((d/"status.json").read_text())
    except (OSError, ValueError):
        return {}


def comparable(t):
    "A collected table without its timing columns (wall time differs from run to run)."
    return t.drop(columns=[c for c in t.columns if "wall" in c]).reset_index(drop=True)


def test_submitit_local_kill_resume_collect(tmp_path):
    """Four runs as submitit-local jobs: the runner is killed while two runs wait, one of their jobs is killed
    too; the re-run skips the two finished runs, waits for the live job instead of submitting another, reruns the
    killed one; every run finishes exactly once and the table equals the local runner's."""
    nb = gated_nb(tmp_path/"exp.ipynb")
    grid = {"a": [1, 2], "b": [1, 2]}
    ref = run_sweep({"name": "ref", "notebook": str(nb), "grid": grid}, out_root=tmp_path/"runs", progress=False)
    assert set(ref.status) == {"ok"}
    want = comparable(collect(tmp_path/"runs"/"ref"))
    assert len(want) == 4 and "score_mean" in want, want

    gate, done_log = tmp_path/"gate", tmp_path/"done.txt"
    (tmp_path/"s.yaml").write_text(yaml.safe_dump({"name": "sl", "notebook": "exp.ipynb", "grid": grid,
        "base": {"gate": str(gate), "done_log": str(done_log)}, "executor": "submitit-local", "timeout": 600}))
    sd = tmp_path/"runs"/"sl"
    with open(tmp_path/"runner.log", "w") as out:
        p = subprocess.Popen([*CLI, "sweep", str(tmp_path/"s.yaml"), "--out", str(tmp_path/"runs"), "--jobs", "4",
                              "--no-collect"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        waiting = ["a=2__b=1", "a=2__b=2"]
        wait_for(lambda: all(status(sd/r).get("status") == "ok" for r in ("a=1__b=1", "a=1__b=2"))
                 and all((sd/r/"waiting").exists() and status(sd/r).get("job_id") for r in waiting),
                 "two runs done and two waiting")
    finally:
        os.kill(p.pid, signal.SIGKILL)        # the runner dies (a lost login session); its jobs run on
        p.wait()
    log = (tmp_path/"runner.log").read_text()
    assert "submitted a=2__b=2: submitit-local job" in log, log
    jobs = {r: status(sd/r)["job_id"] for r in waiting}
    assert all(status(sd/r)["executor"] == "submitit-local" for r in waiting)
    killed, live = _LocalJobRef(jobs["a=2__b=1"]), _LocalJobRef(jobs["a=2__b=2"])
    assert not killed.done() and not live.done()
    os.kill(int(killed.job_id), signal.SIGTERM)  # kill one job: its run stops, the job records it
    wait_for(killed.done, "the killed job to end", 120)
    assert status(sd/"a=2__b=1")["status"] in ("failed", "running"), status(sd/"a=2__b=1")
    assert not live.done()

    gate.write_text("go")
    res = run_sweep(tmp_path/"s.yaml", out_root=tmp_path/"runs", jobs=4, progress=False)
    assert res.status.to_dict() == {"a=1__b=1": "skipped", "a=1__b=2": "skipped", "a=2__b=1": "ok", "a=2__b=2": "ok"}, res
    assert status(sd/"a=2__b=2")["job_id"] == jobs["a=2__b=2"]          # waited for, not submitted again
    assert status(sd/"a=2__b=1")["job_id"] != jobs["a=2__b=1"]          # its job was gone: a new one
    assert sorted(done_log.read_text().split()) == ["a=1__b=1", "a=1__b=2", "a=2__b=1", "a=2__b=2"]  # once each
    ids = {f.name.split("_")[0] for f in (sd/"a=2__b=2"/"submitit").glob("*_log.out")}
    assert ids == {jobs["a=2__b=2"]}, ids                                # one job on that run folder
    got = comparable(collect(sd))
    assert got.equals(want), (got, want)
    assert set(run_sweep(tmp_path/"s.yaml", out_root=tmp_path/"runs", progress=False).status) == {"skipped"}


def test_slurm_options(tmp_path):
    "The sweep file's Slurm block is checked against sbatch's options; a torchrun run asks for a GPU per process."
    nb = gated_nb(tmp_path/"exp.ipynb")
    sw = load_sweep({"name": "s", "notebook": str(nb), "launcher": {"torchrun": 4},
                     "executor": {"slurm": {"partition": "gpu", "time": "02:00:00", "gpus_per_node": 1, "mem": 64,
                                            "account": "lab", "setup": ["module load cuda"]}}})
    assert sw["executor"] == {"kind": "slurm", "options": {"partition": "gpu", "time": 120, "gpus_per_node": 1,
                                                            "mem": "64G", "account": "lab", "setup": ["module load cuda"]}}
    with pytest.raises(SweepError, match="unknown Slurm option"):
        load_sweep({"name": "s", "notebook": str(nb), "executor": {"slurm": {"gpus": 1}}})
    from submitit.slurm.slurm import _make_sbatch_string
    params = _job_params("slurm", sw["executor"]["options"], Run("r", {}, {}, sw["launcher"]), None, "s")
    sb = _make_sbatch_string(command="python -m submitit.core._submit F", folder=tmp_path, **params)
    for line in ("--partition=gpu", "--gpus-per-node=4", "--time=120", "--mem=64G", "--account=lab",
                 "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}" in sb, (line, sb)
    assert "module load cuda" in sb
