"""Caches trusted on the default path, and model-name faults (vla_lit.models, vla_lit.features):
- a converted model copy with a flipped byte (size and mtime kept), a truncated `model.safetensors` or
  `tokenizer.json`, or a deleted file is converted again with a warning naming the file, never loaded;
- a conversion killed with SIGKILL leaves a temporary folder that the next conversion removes, saying so;
- a misspelt embedded name (`dinov2-s14-embeded`) is refused at once with "did you mean ...", no hub call;
- a hub id behind an endpoint that accepts connections and never answers ends within a bounded time:
  loaded from the local HF cache when it is there, else a ModelLoadError naming the hub; what is fetched
  is printed first;
- a feature shard with a flipped byte (size and mtime kept) is recomputed with a warning naming it, and
  `FeatureCache` refuses to read it;
- an image edited in place with its size and mtime kept (same key) is seen on the default path by its
  recorded SHA-256: a warning names it and only its shard is recomputed, equal to a fresh extraction of the
  edited images; `content_hash=True` gives another key;
- a copied data set (mtimes kept: same key, new ctimes and inodes, same bytes) is served from the cache,
  with no forward pass;
- `strict=True` refuses a cache made by `strict=False` that left an item out, naming the item;
- a finished cache on a read-only mount is read through `extract_features` (without the lock, said so).
Models are the tiny RANDOM ones of `vla_lit.models` / `vla_lit.fixtures` (tests only, never pretrained),
except one end-to-end check on the embedded DINOv2 in a temporary cache."""
import json, os, re, shutil, signal, socket, subprocess, sys, threading, time, warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _flip(f: Path, at: int = -20):
    "Flip one bit of `f` in place, keeping its size and mtime (a later write: ctime changes)."
    st = f.stat()
    b = bytearray(f.read_bytes())
    b[at] ^= 1
    time.sleep(0.05)
    f.write_bytes(bytes(b))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def _env(tmp_path, **extra):
    env = {**os.environ, "VLA_LIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HF_HUB_OFFLINE", None)
    return env | extra


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_LIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- converted copies
def _toy_convert(calls):
    def conv(out):
        calls.append(1)
        (out / "model.safetensors").write_bytes(b"weights!" * 1000)
        (out / "tokenizer.json").write_text(json.dumps({"vocab": list(range(100))}))
    return conv


@pytest.mark.parametrize("damage", ["flip", "truncate_weights", "truncate_tokenizer", "delete"])
def test_damaged_converted_copy_is_converted_again(cache, tmp_path, damage):
    from vla_lit.models import converted_dir
    src = tmp_path / "src.bin"
    src.write_bytes(b"source")
    calls = []
    out = converted_dir("toy-embedded", [src], _toy_convert(calls))
    good = {p.name: p.read_bytes() for p in out.iterdir() if p.name in ("model.safetensors", "tokenizer.json")}
    f = out / ("tokenizer.json" if damage == "truncate_tokenizer" else "model.safetensors")
    if damage == "flip":
        _flip(f, 100)
    elif damage == "delete":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[:10])
    with pytest.warns(UserWarning, match=re.escape(str(f))):
        again = converted_dir("toy-embedded", [src], _toy_convert(calls))
    assert len(calls) == 2 and {n: (again / n).read_bytes() for n in good} == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted_dir("toy-embedded", [src], _toy_convert(calls))     # intact: reused, no warning
    assert len(calls) == 2


def test_damaged_embedded_dinov2_gives_the_same_features(cache):
    "End to end on the embedded DINOv2 (a fresh conversion in a temporary cache): flipped weights are not used."
    from vla_lit.models import load_vision
    x = torch.zeros(1, 3, 224, 224)
    ref = load_vision("dinov2-s14-embedded", device="cpu")(x).cls
    _flip(cache / "models" / "dinov2-s14-embedded" / "model.safetensors", -1000)
    with pytest.warns(UserWarning, match="dinov2-s14-embedded/model.safetensors: its sha256 differs"):
        enc = load_vision("dinov2-s14-embedded", device="cpu")
    assert torch.equal(enc(x).cls, ref)


KILLED = r'''
import sys, time
from pathlib import Path
from vla_lit.models import converted_dir
def conv(out):
    (out / "model.safetensors").write_bytes(b"x" * 1_000_000)
    print("converting", flush=True)
    time.sleep(120)
converted_dir("toy-embedded", [Path(sys.argv[1])], conv)
'''


def test_killed_conversion_leaves_no_temporary(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"source")
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(src)], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "converting"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    models = tmp_path / "cache" / "models"
    (left,) = list(models.glob(".toy-embedded.tmp-*"))
    code = ("import sys\nfrom pathlib import Path\nfrom vla_lit.models import converted_dir\n"
            "converted_dir('toy-embedded', [Path(sys.argv[1])], lambda out: (out / 'w.bin').write_bytes(b'1') and None)")
    r = subprocess.run([sys.executable, "-c", code, str(src)], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"removed the stale temporary {left} (left by process {p.pid}, which is gone)" in r.stderr
    assert not list(models.glob(".toy-embedded.tmp-*")) and (models / "toy-embedded" / "w.bin").exists()


# ---------------------------------------------------------------- model names
@pytest.mark.parametrize("name,kind,want", [("dinov2-s14-embeded", "vision", "dinov2-s14-embedded"),
                                            ("smollm2-135m-embeded", "lm", "smollm2-135m-embedded"),
                                            ("Minilm-L6-Embedded2", "lm", "minilm-l6-embedded")])
def test_misspelt_embedded_name_never_reaches_the_hub(name, kind, want, monkeypatch):
    from vla_lit import models
    def no_hub(*a, **k): raise AssertionError("the hub was asked")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_vision", no_hub)
    monkeypatch.setattr(models, "_hub_lm", no_hub)
    t = time.perf_counter()
    with pytest.raises(models.ModelLoadError, match=f"did you mean '{want}'"):
        (models.load_vision if kind == "vision" else models.load_lm)(name)
    assert time.perf_counter() - t < 2


STALLED = r'''
import sys, time
from vla_lit.models import load_lm, ModelLoadError
for hub_id in sys.argv[1:]:
    t = time.time()
    try:
        m = load_lm(hub_id, device="cpu")
        print(hub_id, "LOADED", round(time.time() - t, 1), type(m).__name__, flush=True)
    except ModelLoadError as e:
        print(hub_id, "ERROR", round(time.time() - t, 1), str(e).replace("\n", " "), flush=True)
'''


def _stalled_server():
    "A TCP server that accepts every connection and never answers (a stalled proxy or hub)."
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    held = []
    def accept():
        while True:
            try:
                held.append(s.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    return s, held


def test_stalled_hub_ends_in_bounded_time(tmp_path):
    try:
        server, held = _stalled_server()
    except OSError as e:
        pytest.skip(f"no local TCP server: {e}")
    from vla_lit.fixtures import tiny_models
    src = Path(tiny_models(kinds=["decoder_lm"])["decoder_lm"])      # RANDOM weights (tests only)
    hf = tmp_path / "hf"
    repo = hf / "hub" / "models--someone--tiny-model"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in src.iterdir():
        shutil.copy2(f, snap / f.name)
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = _env(tmp_path, HF_ENDPOINT=endpoint, HF_HOME=str(hf), HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2",
               HF_HUB_DISABLE_TELEMETRY="1")
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", STALLED, "someone/tiny-model", "someone/not-cached"], env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    took = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-3000:]
    cached, missing = r.stdout.strip().splitlines()
    assert cached.startswith("someone/tiny-model LOADED") and cached.endswith("LanguageModel"), r.stdout
    assert missing.startswith("someone/not-cached ERROR") and f"The hub at {endpoint} did not answer" in missing, r.stdout
    assert all(float(line.split()[2]) < 12 for line in (cached, missing)), r.stdout
    assert f"someone/not-cached: fetching from the Hugging Face hub at {endpoint}" in r.stderr
    assert f"the hub at {endpoint} did not answer" in r.stderr and "using the local HF cache only" in r.stderr
    assert took < 60, took


# ---------------------------------------------------------------- feature caches
@pytest.fixture(scope="module")
def enc():
    from vla_lit.models import load_vision
    return load_vision("tiny-random-dinov2")        # RANDOM weights (tests only)


def test_flipped_shard_is_recomputed_and_refused_on_read(tmp_path, enc):
    from vla_lit.data import BadInputError, tuxpaint
    from vla_lit.features import FeatureCache, extract_features
    recs = tuxpaint()[:6]
    a = extract_features(enc, recs, root=tmp_path, shard_size=3, progress=False)
    ref = {n: a[n].clone() for n in a.names}
    f = a.path / "shard-00001.safetensors"
    _flip(f)
    with pytest.raises(BadInputError, match="shard-00001.safetensors: its SHA-256 differs"):
        FeatureCache(a.path)["cls"]
    with pytest.warns(UserWarning, match=r"shard-00001\.safetensors\) its SHA-256 differs"):
        b = extract_features(enc, recs, root=tmp_path, shard_size=3, progress=False)
    assert b.key == a.key and all(torch.equal(b[n], ref[n]) for n in ref)
    assert b.verify() == []


def _image_set(tmp_path, n=3):
    "`n` Tux Paint PNGs copied to tmp_path/img (mtimes kept), as records."
    from vla_lit.data import Record, tuxpaint
    src = [r for r in tuxpaint() if str(r.image).endswith(".png")]
    (tmp_path / "img").mkdir()
    recs = []
    for i, r in enumerate(src[:n]):
        shutil.copy2(r.image, tmp_path / "img" / f"{i}.png")
        recs.append(Record(r.id, str(tmp_path / "img" / f"{i}.png"), r.captions))
    return recs, src[n:]


def _counting(enc):
    "A forward hook counting the encoder's forward passes."
    calls = []
    return calls, enc.register_forward_hook(lambda *a: calls.append(1))


def test_same_size_image_edit_with_mtime_kept(tmp_path, enc):
    "Same key, seen by the recorded SHA-256 on the default path; only its shard recomputed, as a fresh run."
    from vla_lit.features import extract_features
    recs, others = _image_set(tmp_path)
    kw = dict(root=tmp_path / "feat", progress=False, shard_size=2)
    before = extract_features(enc, recs, **kw)
    before_hashed = extract_features(enc, recs, content_hash=True, **kw)
    cls0 = before["cls"].clone()
    shard1 = (before.path / "shard-00001.safetensors").stat()
    f = Path(recs[0].image)
    st = f.stat()
    other = next(Path(r.image).read_bytes() for r in others if Path(r.image).stat().st_size <= st.st_size)
    time.sleep(0.05)
    f.write_bytes(other + b"\0" * (st.st_size - len(other)))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    calls, hook = _counting(enc)
    try:
        with pytest.warns(UserWarning, match=r"shard 0 \(shard-00000\.safetensors\) was computed from other "
                                             rf"bytes of {re.escape(str(f))}"):
            after = extract_features(enc, recs, **kw)
    finally:
        hook.remove()
    assert after.key == before.key and len(calls) == 1                       # the key is unchanged
    assert (after.path / "shard-00001.safetensors").stat().st_ino == shard1.st_ino   # shard 1 kept
    fresh = extract_features(enc, recs, root=tmp_path / "fresh", progress=False, shard_size=2)
    assert all(torch.equal(after[n], fresh[n]) for n in after.names) and not torch.equal(after["cls"], cls0)
    assert extract_features(enc, recs, content_hash=True, **kw).key != before_hashed.key


def test_copied_dataset_is_served_from_cache(tmp_path, enc, monkeypatch):
    "New ctimes and inodes, same bytes and mtimes: same key, each file hashed once, no forward pass."
    from vla_lit import features
    from vla_lit.features import extract_features
    recs, _ = _image_set(tmp_path)
    kw = dict(root=tmp_path / "feat", progress=False, shard_size=2)
    before = extract_features(enc, recs, **kw)
    ref = {n: before[n].clone() for n in before.names}
    shutil.copytree(tmp_path / "img", tmp_path / "copy")          # copy2: mtimes kept
    shutil.rmtree(tmp_path / "img")
    copied = [type(r)(r.id, str(tmp_path / "copy" / Path(r.image).name), r.captions) for r in recs]
    hashed, sha = [], features.sha256_file
    monkeypatch.setattr(features, "sha256_file", lambda p, *a: hashed.append(str(p)) or sha(p, *a))
    calls, hook = _counting(enc)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            after = extract_features(enc, copied, **kw)
            n_hashed = len(hashed)
            again = extract_features(enc, copied, **kw)
    finally:
        hook.remove()
    assert after.key == before.key and again.key == before.key and calls == []
    assert sorted(hashed) == sorted(c.image for c in copied) and n_hashed == len(hashed)   # once, then memoised
    assert all(torch.equal(again[n], ref[n]) for n in ref)
    memo = json.loads((after.path / "images-checked.json").read_text())
    assert sorted(memo) == sorted(c.image for c in copied)


def test_strict_refuses_a_lenient_cache(tmp_path, enc):
    from vla_lit.data import BadInputError, Record, tuxpaint
    from vla_lit.features import extract_features
    recs = list(tuxpaint()[:3]) + [Record("bad", str(tmp_path / "missing.png"), ["x"])]
    lenient = extract_features(enc, recs, root=tmp_path, progress=False)
    assert len(lenient.skipped) == 1 and lenient.manifest["strict"] is False
    with pytest.raises(BadInputError, match=r"missing\.png: file does not exist \(left out of .*strict=False"):
        extract_features(enc, recs, root=tmp_path, progress=False, strict=True)
    assert len(extract_features(enc, recs, root=tmp_path, progress=False)) == 3       # still there


READ = r'''
import sys
from pathlib import Path
from vla_lit.data import tuxpaint
from vla_lit.features import extract_features
from vla_lit.models import load_vision
enc = load_vision("tiny-random-dinov2")
for n in (4, 5):
    try:
        print(n, "READ", len(extract_features(enc, tuxpaint()[:n], root=Path(sys.argv[1]), progress=False)), flush=True)
    except PermissionError as e:
        print(n, "ERROR", str(e), flush=True)
'''


def test_read_only_cache_is_read(tmp_path, enc):
    from vla_lit.data import tuxpaint
    from vla_lit.features import extract_features
    root = tmp_path / "feat"
    fc = extract_features(enc, tuxpaint()[:4], root=root, progress=False)
    # the reading process sees `root` through a read-only bind mount of its own (file modes do not stop root)
    sh = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3" "$1"'
    cmd = ["unshare", "-rm", "sh", "-c", sh, "sh", str(root), sys.executable, READ]
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare -rm)")
    r = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    if "mount" in r.stderr and r.returncode and not r.stdout:
        pytest.skip(f"read-only bind mount refused: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    done, unfinished = r.stdout.strip().splitlines()
    assert done == "4 READ 4", r.stdout
    assert f"{fc.path} is not writable here: reading its finished feature set without the lock" in r.stderr
    assert unfinished.startswith("5 ERROR") and "pass root= a writable folder" in unfinished, r.stdout
