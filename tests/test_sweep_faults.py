"""The sweep runner (vla_lit.sweep, nbs/50_sweep.ipynb, "Stopping, killing, two runners") when things go wrong:
the runner stopped by SIGTERM or SIGHUP, killed by SIGKILL, a second runner on the same folder, a run left
`running` by a dead runner (adopted from its metrics, or run again), a metrics.json with a NaN or a string, and
YAML 1.1 booleans in a sweep file. Every run is counted (each appends to a log), and no process may be left."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import nbformat, psutil, pytest, yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from vla_lit.sweep import SweepError, _lock_run, is_finished, load_sweep, run_sweep
from vla_lit.results import collect

CLI = [sys.executable, "-m", "vla_lit.cli"]
KERNEL = {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}}
RIDS = ["a=1", "a=2"]


def gated_nb(path: Path) -> Path:
    """Runs that wait for `gate` to hold a time earlier than their own start (so a run started before the gate
    opened never goes on), logging `start`/`end` lines to `log` and their kernel's pid to `out_dir/started`."""
    cells = [new_markdown_cell("# gated"), new_code_cell("a = 1\ngate = ''\nlog = ''\nout_dir = '.'"),
             new_code_cell("import json, os, time\nfrom pathlib import Path\nt_start = time.time()\n"
                           "Path(out_dir, 'started').write_text(str(os.getpid()))\n"
                           "with open(log, 'a') as f: f.write(f'start a={a}\\n')\n"
                           "def gate_open():\n    try:\n        return float(Path(gate).read_text()) < t_start\n"
                           "    except (OSError, ValueError):\n        return False\n"
                           "while not gate_open() and time.time() - t_start < 120: time.sleep(0.1)"),
             new_code_cell("Path(out_dir, 'metrics.json').write_text(json.dumps({'score': 10.0 * a}))\n"
                           "with open(log, 'a') as f: f.write(f'end a={a}\\n')")]
    nbformat.write(new_notebook(cells=cells, metadata=KERNEL), path)
    return path


def sweep_file(tmp: Path) -> Path:
    gated_nb(tmp/"exp.ipynb")
    f = tmp/"s.yaml"
    f.write_text(yaml.safe_dump({"name": "f", "notebook": "exp.ipynb", "grid": {"a": [1, 2]},
                                 "base": {"gate": str(tmp/"gate"), "log": str(tmp/"log.txt")}}))
    return f


def wait_for(cond, what: str, limit: float = 120):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < limit, f"timed out waiting for {what}"
        time.sleep(0.2)


def status(d: Path) -> dict:
    try:
        return json.loads((d/"status.json").read_text())
    except (OSError, ValueError):
        return {}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_runner(f: Path, tmp: Path) -> subprocess.Popen:
    "`vla_lit sweep` in a session of its own (as a scheduler or a login shell would start it)."
    # SIGHUP back to its default: under `nohup` (a CI wrapper) the test process inherits it ignored, and the
    # runner rightly keeps an ignored SIGHUP ignored
    return subprocess.Popen([*CLI, "sweep", str(f), "--out", str(tmp/"runs"), "--jobs", "2", "--no-collect"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))


def started(sd: Path) -> list[int]:
    "Wait until both runs wait at the gate; their processes' and kernels' pids."
    wait_for(lambda: all((sd/r/"started").exists() and status(sd/r).get("pid") for r in RIDS), "both runs to start")
    return [status(sd/r)["pid"] for r in RIDS] + [int((sd/r/"started").read_text()) for r in RIDS]


def open_gate_and_rerun(f: Path, tmp: Path):
    (tmp/"gate").write_text(repr(time.time()))
    return run_sweep(f, out_root=tmp/"runs", jobs=2, progress=False)


def log_lines(tmp: Path) -> list[str]:
    return (tmp/"log.txt").read_text().splitlines()


def assert_once_and_clean(tmp: Path, res, pids: list[int]):
    "Each run ended exactly once (the aborted attempts never did), all ok, no process of either attempt left."
    assert res.status.to_dict() == {"a=1": "ok", "a=2": "ok"}, res
    lines = log_lines(tmp)
    assert sorted(x for x in lines if x.startswith("end")) == ["end a=1", "end a=2"], lines
    assert sorted(x for x in lines if x.startswith("start")) == ["start a=1", "start a=1", "start a=2", "start a=2"]
    sd = tmp/"runs"/"f"
    pids = pids + [status(sd/r)["pid"] for r in RIDS] + [int((sd/r/"started").read_text()) for r in RIDS]
    wait_for(lambda: not any(alive(p) for p in pids), "every run process and kernel to end", 20)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_runner_stopped_by_signal(tmp_path, sig):
    """SIGTERM (a scheduler, `timeout`) or SIGHUP (a dropped SSH session) stop the runner as Ctrl-C does: its runs'
    processes and kernels end, the runs are recorded interrupted, naming the signal; a re-run runs each once."""
    f = sweep_file(tmp_path)
    sd = tmp_path/"runs"/"f"
    p = start_runner(f, tmp_path)
    try:
        pids = started(sd)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 128 + sig, out + err
    assert f"interrupted ({sig.name})" in err, err
    for r in RIDS:
        st = status(sd/r)
        assert st["status"] == "interrupted" and st["error"].startswith(f"interrupted ({sig.name})"), st
    wait_for(lambda: not any(alive(q) for q in pids), "the runs' processes and kernels to end", 20)
    assert_once_and_clean(tmp_path, open_gate_and_rerun(f, tmp_path), pids)


def test_runner_killed_runs_die_with_it(tmp_path):
    """SIGKILL of the runner: its runs' processes are sent SIGTERM by the kernel (PR_SET_PDEATHSIG) and end, their
    kernels too; the records left `running` (pid and host) are stale; a re-run started at once waits for the
    dying runs' locks, then runs each run once."""
    f = sweep_file(tmp_path)
    sd = tmp_path/"runs"/"f"
    p = start_runner(f, tmp_path)
    try:
        pids = started(sd)
    finally:
        p.kill()
        p.communicate(timeout=60)
    for r in RIDS:
        st = status(sd/r)
        assert st["status"] == "running" and st["host"] and st["pid"] in pids, st
    res = open_gate_and_rerun(f, tmp_path)      # at once: the killed runner's runs may still be stopping
    assert_once_and_clean(tmp_path, res, pids)
    assert all(status(sd/r)["note"].startswith("run again: its earlier `running` record") for r in RIDS)


def test_second_runner_leaves_locked_runs_alone(tmp_path):
    """A second `vla_lit sweep` while the first still runs: it reports the runs busy (exit 1), touches nothing;
    the first finishes them, each once."""
    f = sweep_file(tmp_path)
    sd = tmp_path/"runs"/"f"
    p = start_runner(f, tmp_path)
    try:
        pids = started(sd)
        r = subprocess.run([*CLI, "sweep", str(f), "--out", str(tmp_path/"runs"), "--no-collect"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        for rid in RIDS:
            assert f"BUSY {rid}: not run: another process holds its lock (pid {p.pid} on " in r.stderr, r.stderr
        assert all(status(sd/rid)["pid"] in pids for rid in RIDS)          # the first runner's records, kept
        (tmp_path/"gate").write_text(repr(time.time() - 3600))             # opens for the first runner's runs
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 0, out + err
    assert sorted(log_lines(tmp_path)) == ["end a=1", "end a=2", "start a=1", "start a=2"], log_lines(tmp_path)
    assert all(is_finished(sd/rid) for rid in RIDS)
    wait_for(lambda: not any(alive(q) for q in pids), "every run process and kernel to end", 20)


def test_orphan_of_an_older_runner_is_not_doubled(tmp_path):
    """A run left `running` with its process alive but no lock (an orphan of a runner that took none): busy,
    found by its command line; once it is gone, the run is executed."""
    f = sweep_file(tmp_path)
    sd = tmp_path/"runs"/"f"
    (tmp_path/"gate").write_text(repr(time.time() - 3600))
    d = sd/"a=1"
    d.mkdir(parents=True)
    ghost = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "_run_notebook", str(d)])
    try:
        wait_for(lambda: "_run_notebook" in psutil.Process(ghost.pid).cmdline(), "the orphan's command line", 10)
        (d/"status.json").write_text(json.dumps({"status": "running", "host": os.uname().nodename,
                                                 "runner_pid": 999999999}))
        res = run_sweep(f, out_root=tmp_path/"runs", jobs=2, only=["a=1"], progress=False)
        assert res.status.to_dict() == {"a=1": "busy"}, res
        assert f"process {ghost.pid} on this host still executes it" in res.error["a=1"]
        assert status(d)["status"] == "running" and not (tmp_path/"log.txt").exists()
    finally:
        ghost.kill()
        ghost.wait()
    res = run_sweep(f, out_root=tmp_path/"runs", jobs=2, only=["a=1"], progress=False)
    assert res.status.to_dict() == {"a=1": "ok"} and log_lines(tmp_path) == ["start a=1", "end a=1"]


def test_stale_running_record_adopted_or_rerun(tmp_path):
    """A finished run whose record still says `running` (its runner died before judging it) is adopted from its
    complete metrics.json, not run again; with a broken metrics.json it is run again."""
    f = sweep_file(tmp_path)
    sd = tmp_path/"runs"/"f"
    (tmp_path/"gate").write_text(repr(time.time() - 3600))
    assert set(run_sweep(f, out_root=tmp_path/"runs", jobs=2, progress=False).status) == {"ok"}
    for rid in RIDS:
        st = status(sd/rid)
        (sd/rid/"status.json").write_text(json.dumps({**st, "status": "running", "error": None}))
    (sd/"a=2"/"metrics.json").write_text('{"score": 2')        # cut short
    res = run_sweep(f, out_root=tmp_path/"runs", jobs=2, progress=False)
    assert res.status.to_dict() == {"a=1": "skipped", "a=2": "ok"}, res
    st = status(sd/"a=1")
    assert st["status"] == "ok" and st["adopted"].startswith("adopted: its runner") and st["wall_s"] >= 0
    assert log_lines(tmp_path).count("end a=1") == 1 and log_lines(tmp_path).count("end a=2") == 2
    assert collect(sd)["score_mean"].tolist() == [10.0, 20.0]


def test_locked_run_via_cli_exits_1(tmp_path):
    "A run whose folder another process locks is reported BUSY by `vla_lit sweep` (exit 1), not run."
    f = sweep_file(tmp_path)
    d = tmp_path/"runs"/"f"/"a=1"
    d.mkdir(parents=True)
    fd = _lock_run(d)
    try:
        r = subprocess.run([*CLI, "sweep", str(f), "--out", str(tmp_path/"runs"), "--only", "a=1", "--no-collect"],
                           capture_output=True, text=True, timeout=120)
    finally:
        os.close(fd)
    assert r.returncode == 1 and f"BUSY a=1: not run: another process holds its lock (pid {os.getpid()} on" in r.stderr, r.stderr
    assert not (tmp_path/"log.txt").exists() and not (d/"status.json").exists()


def metrics_nb(path: Path, text: str) -> Path:
    cells = [new_markdown_cell("# m"), new_code_cell("a = 1\nout_dir = '.'"),
             new_code_cell(f"from pathlib import Path\nPath(out_dir, 'metrics.json').write_text({text!r})")]
    nbformat.write(new_notebook(cells=cells, metadata=KERNEL), path)
    return path


def test_metrics_nan_or_string_fail_the_run(tmp_path):
    """A metrics.json with a NaN or a string fails the run, naming the keys; an older `ok` record with a NaN
    metric is not finished, so a re-run executes it."""
    nb = metrics_nb(tmp_path/"m.ipynb", '{"score": 1.0, "x": NaN, "y": "abc", "z": [1]}')
    cfg = {"name": "m", "notebook": str(nb)}
    res = run_sweep(cfg, out_root=tmp_path/"runs", progress=False)
    assert res.status.tolist() == ["failed"]
    assert res.error.iloc[0] == ("metrics.json: key 'x' is NaN; key 'y' is a string \"abc\", not a number; "
                                 "key 'z' is a list [1], not a number"), res.error.iloc[0]
    t = collect(tmp_path/"runs"/"m")
    assert t.failed.tolist() == [1] and "score_mean" not in t
    d = tmp_path/"runs"/"m"/"run"
    st = status(d)
    (d/"status.json").write_text(json.dumps({**st, "status": "ok", "error": None}))   # as an older runner wrote it
    assert not is_finished(d)
    metrics_nb(nb, '{"score": 1.0}')
    assert run_sweep(cfg, out_root=tmp_path/"runs", progress=False).status.tolist() == ["ok"]


def test_yaml_booleans_are_yaml_1_2(tmp_path):
    "In a sweep file `no`, `on`, `off`, `yes` are strings (in values, lists and keys); only true/false are booleans."
    nbformat.write(new_notebook(cells=[new_code_cell("norm = 'x'\nmode = 'x'\nflag = False\nout_dir = '.'")],
                                metadata=KERNEL), tmp_path/"y.ipynb")
    (tmp_path/"s.yaml").write_text("name: y\nnotebook: y.ipynb\nbase: {norm: no, flag: true}\n"
                                   "grid: {mode: [on, off, yes, No]}\nsmoke: {flag: False}\n")
    sw = load_sweep(tmp_path/"s.yaml")
    assert sw["base"] == {"norm": "no", "flag": True} and sw["smoke"] == {"flag": False}
    assert sw["grid"] == {"mode": ["on", "off", "yes", "No"]}
    (tmp_path/"t.yaml").write_text("name: t\nnotebook: y.ipynb\ngrid: {on: [1]}\n")
    with pytest.raises(SweepError, match=r"\['on'\] are not defined"):    # a key `on` stays the string 'on'
        run_sweep(tmp_path/"t.yaml", out_root=tmp_path/"runs", progress=False)
