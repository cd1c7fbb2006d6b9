"Data specs: every user format resolves from tiny generated fixtures (string and dict form); bad input is refused."
import io, json, tarfile
from pathlib import Path
import pytest
from PIL import Image
from vla_lit.data import BadInputError, check_data_spec, data_specs, parse_data_spec, resolve_data


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _png_bytes(colour=(30, 200, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("specs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLA_LIT_CACHE", str(tmp_path_factory.mktemp("cache")))  # the inverted copies land here
        yield _fixtures(d)


def _fixtures(d: Path) -> Path:
    for i in range(3):
        _png(d/"img"/f"im{i}.png")
    (d/"captions_val.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"im{i}.png"} for i in range(3)],
        "annotations": [{"image_id": i, "caption": f"a red square {i}"} for i in range(3)]}))
    (d/"dataset_toy.json").write_text(json.dumps({"dataset": "toy", "images": [
        {"filename": f"im{i}.png", "imgid": i, "split": s, "sentences": [{"raw": f"square {i}"}, {"raw": "red"}]}
        for i, s in enumerate(["train", "restval", "test"])]}))
    for cls, n in [("cat", 2), ("dog", 1)]:
        for i in range(n):
            _png(d/"folder"/cls/f"x{i}.png")
    (d/"classnames.txt").write_text("a cat\na dog\n")
    (d/"pairs.csv").write_text("image,caption\nim0.png,first\nim1.png,second\nim0.png,again\n")
    for k in range(2):
        with tarfile.open(d/f"shard-{k:03d}.tar", "w") as tf:
            for j in range(2):
                for name, data in [(f"{k}{j}.png", _png_bytes()), (f"{k}{j}.txt", f"sample {k}{j}".encode())]:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return d


def _cases(d: Path):
    "(string spec, dict spec, expected record count, expected set name)"
    return [
        (f"coco:{d}/captions_val.json?images={d}/img",
         {"format": "coco", "path": f"{d}/captions_val.json", "images": f"{d}/img"}, 3, "captions_val"),
        (f"karpathy:{d}/dataset_toy.json?images={d}/img&split=train",
         {"format": "karpathy", "path": f"{d}/dataset_toy.json", "images": f"{d}/img", "split": "train"}, 2,
         "dataset_toy_train"),
        (f"imagefolder:{d}/folder?classnames={d}/classnames.txt&name=pets",
         {"format": "imagefolder", "path": f"{d}/folder", "classnames": f"{d}/classnames.txt", "name": "pets"}, 3,
         "pets"),
        (f"csv:{d}/pairs.csv?images={d}/img&limit=1",
         {"format": "csv", "path": f"{d}/pairs.csv", "images": f"{d}/img", "limit": 1}, 1, "pairs"),
        (f"wds:{d}/shard-{{000..001}}.tar", {"format": "wds", "path": f"{d}/shard-{{000..001}}.tar"}, 4, "specs0"),
    ]


def test_user_formats_resolve(fx):
    for text, as_dict, n, name in _cases(fx):
        s = check_data_spec(text)
        assert check_data_spec(as_dict) == s == parse_data_spec(str(s))
        a, b = resolve_data(text), resolve_data(as_dict)
        assert a.ids == b.ids and len(a) == n, (text, a.ids)
        expected = name if not name.startswith("specs") else fx.name
        assert a.name == s.name == expected, (a.name, s.name)
        assert all(r.captions for r in a) and not a.skipped, (text, a.skipped)


def test_contents(fx):
    karp = resolve_data(f"karpathy:{fx}/dataset_toy.json?images={fx}/img&split=test")
    assert karp.ids == ["toy/2"] and karp[0].captions == ["square 2", "red"]
    folder = resolve_data(f"imagefolder:{fx}/folder?classnames={fx}/classnames.txt")
    assert folder.classnames == ["a cat", "a dog"] and [r.label for r in folder] == [0, 0, 1]
    csv = resolve_data(f"csv:{fx}/pairs.csv?images={fx}/img")
    assert csv[0].captions == ["first", "again"]
    wds = resolve_data(f"wds:{fx}/shard-{{000..001}}.tar")
    assert [r.caption for r in wds] == ["sample 00", "sample 01", "sample 10", "sample 11"]
    (fx/"latin.csv").write_bytes("image,caption\nim0.png,un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(BadInputError, match="latin.csv: line 2: .* encoding=latin-1"):
        resolve_data(f"csv:{fx}/latin.csv?images={fx}/img")
    assert resolve_data(f"csv:{fx}/latin.csv?images={fx}/img&encoding=latin-1").captions == ["un caf\u00e9"]
    inv = resolve_data(f"coco:{fx}/captions_val.json?images={fx}/img&invert=true")
    assert inv.name == "captions_val_inverted" and Image.open(inv[0].image).getpixel((0, 0)) == (55, 225, 225)
    assert [s.name for s in data_specs([c[0] for c in _cases(fx)])][:2] == ["captions_val", "dataset_toy_train"]


def _bad(d: Path):
    (d/"bad_names.txt").write_text("only one name\n")
    (d/"broken.json").write_text('{"images": [{"filename": "im0.png", "split": "test",}]}')
    return [
        ("cocoa:/x.json", "unknown format 'cocoa'; known formats: tuxpaint"),
        (f"coco:{d}/captions_val.json?images={d}/img&colour=red", "unknown option 'colour'"),
        ("fashion-mnist?limit=many", "limit=many: expected an integer"),
        ("tuxpaint?invert=yes", "expected true or false"),
        (f"coco:{d}/nothing.json?images={d}/img", "is not an existing file"),
        (f"coco:{d}/captions_val.json?images={d}/no_images", "is not an existing folder"),
        (f"karpathy:{d}/dataset_toy.json?images={d}/img&split=val", "its splits: restval, test, train"),
        (f"imagefolder:{d}/folder?classnames={d}/bad_names.txt", "1 class names for 2 class folders"),
        (f"wds:{d}/shard-{{005..009}}.tar", "matches no file"),
        (f"coco:{d}/captions_val.json", "needs option images="),
        (f"karpathy:{d}/dataset_toy.json", "needs option images="),
        ("imagenet-photos?templates=nowhere", "not a clip_benchmark data set"),
        ("tuxpaint?name=my-set", "letters, digits and _"),
        (f"wds:{d}/nothing-*.tar", "matches no file"),
        (f"karpathy:{d}/broken.json?images={d}/img&split=test", "broken.json: not valid JSON"),
    ]


@pytest.mark.parametrize("k", range(15))
def test_bad_input(fx, k):
    spec, says = _bad(fx)[k]
    with pytest.raises(BadInputError) as e:
        check_data_spec(spec)
    assert f"data spec {spec!r}" in str(e.value) and says in str(e.value), str(e.value)
    with pytest.raises(BadInputError):
        resolve_data(spec)


def test_bad_dict_and_duplicates(fx):
    with pytest.raises(BadInputError, match="needs option images="):
        check_data_spec({"format": "coco", "path": f"{fx}/captions_val.json"})
    with pytest.raises(BadInputError, match="several sets named"):
        data_specs([f"wds:{fx}/shard-000.tar?name=a", f"csv:{fx}/pairs.csv?name=a"])
