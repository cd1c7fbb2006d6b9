"""Readers and image loading on bad input: each case starts from a valid generated fixture (vla_lit.fixtures),
corrupts a copy, and expects a clear error naming the file and the item, or a reported skip; never a silently
wrong record set."""
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vla_lit import data as D
from vla_lit.data import BadInputError
from vla_lit.features import texts_fingerprint
from vla_lit.fixtures import data_fixtures


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict:
    return data_fixtures(tmp_path_factory.mktemp("fx"), n=4)


def _copy(fx, kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fx[kind], tmp_path/kind))


def _coco(fx, tmp_path):
    "(captions file, image folder, its JSON) of a copy of the COCO fixture's val split."
    d = _copy(fx, "coco", tmp_path)
    p = d/"annotations"/"captions_val2017.json"
    return p, d/"val2017", json.loads(p.read_text())


def _flickr(fx, tmp_path):
    d = _copy(fx, "flickr30k", tmp_path)
    p = d/"dataset_flickr30k.json"
    return p, d/"flickr30k-images", json.loads(p.read_text())


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def _write_tar(shard: Path, members: dict[str, bytes]):
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _raises(fn, *parts: str) -> str:
    "The message of the BadInputError `fn()` raises, checked to hold every one of `parts`."
    with pytest.raises(BadInputError) as e:
        fn()
    msg = str(e.value)
    for p in parts:
        assert p in msg, (p, msg)
    return msg


def test_valid_fixtures_read_whole(fx):
    "The untouched fixtures: every record, no skip (the behaviour on valid input)."
    rs = [D.read_coco(fx["coco"]/"annotations"/"captions_val2017.json", fx["coco"]/"val2017"),
          D.read_karpathy(fx["flickr30k"]/"dataset_flickr30k.json", fx["flickr30k"]/"flickr30k-images", "test"),
          D.read_imagefolder(fx["imagefolder"]/"val"),
          D.read_csv(fx["csv"]/"captions.tsv", fx["csv"]/"images"),
          D.read_webdataset(str(fx["cc3m"]/"*.tar"))]
    assert [len(r) for r in rs] == [4, 4, 4, 4, 4] and not any(r.skipped for r in rs), [r.skipped for r in rs]
    assert all(len(r.captions) == 2 for r in rs[0]) and rs[3][0].captions[0].startswith("a ")
    for r in rs:
        D.load_image(r[0])


def test_csv_caption_column_not_recognised(fx, tmp_path):
    d = _copy(fx, "csv", tmp_path)
    p = d/"captions.tsv"
    p.write_text(p.read_text().replace("image\tcaption", "image\tlabel"))
    _raises(lambda: D.read_csv(p, d/"images"), str(p), "['image', 'label']", "has no caption column",
            "name the caption column one of caption")
    _raises(lambda: D.resolve_data(f"csv:{p}?images={d/'images'}"), "has no caption column")
    p.write_text(p.read_text().replace("image\tlabel", "filename\tlabel"))
    _raises(lambda: D.read_csv(p, d/"images"), "['filename', 'label']", "no image and no caption column")


def test_coco_duplicate_image_id(fx, tmp_path):
    p, img, j = _coco(fx, tmp_path)
    j["images"][1]["id"] = j["images"][0]["id"]
    p.write_text(json.dumps(j))
    a, b = j["images"][0]["file_name"], j["images"][1]["file_name"]
    _raises(lambda: D.read_coco(p, img), str(p), f"image id {j['images'][0]['id']} is given twice: {a} and {b}")


def test_coco_annotation_of_missing_image_reported(fx, tmp_path):
    p, img, j = _coco(fx, tmp_path)
    j["annotations"] += [{"id": 1, "image_id": 4242, "caption": "x"}, {"id": 2, "image_id": 4243, "caption": "y"}]
    p.write_text(json.dumps(j))
    rs = D.read_coco(p, img)
    assert len(rs) == 4
    assert rs.skipped == [(str(p), "2 annotations name image ids not in 'images' (e.g. image_id 4242); "
                                   "their captions are left out")]
    _raises(lambda: D.read_coco(p, img, strict=True), "2 annotations", "4242")


@pytest.mark.parametrize("bad", [["a", "b"], 7])
def test_coco_caption_not_a_string(fx, tmp_path, bad):
    p, img, j = _coco(fx, tmp_path)
    j["annotations"][2]["caption"] = bad
    p.write_text(json.dumps(j))
    where = img/next(i["file_name"] for i in j["images"] if i["id"] == j["annotations"][2]["image_id"])
    _raises(lambda: D.read_coco(p, img), f"{where}: caption #", f"is a {type(bad).__name__} ({bad!r})",
            "expected a string")


def test_karpathy_caption_not_a_string(fx, tmp_path):
    p, img, j = _flickr(fx, tmp_path)
    j["images"][0]["sentences"][1]["raw"] = ["a", "list"]
    p.write_text(json.dumps(j))
    _raises(lambda: D.read_karpathy(p, img), j["images"][0]["filename"], "caption #1 is a list")


def test_wds_json_caption_not_a_string(fx, tmp_path):
    d = _copy(fx, "cc3m", tmp_path)
    shard = d/"00000.tar"
    mem = _members(shard)
    key = sorted(mem)[0].split(".")[0]
    mem = {k: v for k, v in mem.items() if k != f"{key}.txt"}
    mem[f"{key}.json"] = json.dumps({"caption": ["a", "b"]}).encode()
    _write_tar(shard, mem)
    _raises(lambda: D.read_webdataset(shard), f"{shard}::{key}: caption #0 is a list")


def test_karpathy_unknown_split(fx, tmp_path):
    p, img, _ = _flickr(fx, tmp_path)
    _raises(lambda: D.read_karpathy(p, img, "tset"), str(p), "split 'tset' is not in the file",
            "its splits: test, train, val")


def test_wds_truncated_shard(fx, tmp_path):
    d = _copy(fx, "cc3m", tmp_path)
    shard = d/"00000.tar"
    raw = shard.read_bytes()
    with tarfile.open(shard) as tf:
        ms = [m for m in tf if m.isfile()]
    for cut in range(ms[1].offset, ms[-1].offset_data + ms[-1].size + 1, 256):   # every place of the cut
        shard.write_bytes(raw[:cut])
        rs = D.read_webdataset(shard)
        assert rs.skipped and rs.skipped[0][0] == str(shard), (cut, rs.skipped)
        keyed = [p for p, _ in rs.skipped if p.startswith(f"{shard}::")]
        assert keyed, (cut, rs.skipped)            # the sample the cut reached, by key
        for r in rs:                               # what is kept is whole and loads
            assert D.load_image(r).mode == "RGB"
            assert r.id.rsplit("/", 1)[1] not in {p.rsplit("::", 1)[1] for p in keyed}


def test_wds_pattern_matching_nothing(fx, tmp_path):
    pattern = str(fx["cc3m"]/"nope-*.tar")
    _raises(lambda: D.read_webdataset(pattern), f"shard pattern {pattern} matches no file")
    _raises(lambda: D.read_webdataset([]), "no shards given")
    _raises(lambda: D.resolve_data(f"wds:{pattern}"), "matches no file")


def test_duplicate_record_ids(fx, tmp_path):
    p, img, j = _flickr(fx, tmp_path)
    j["images"][1]["imgid"] = j["images"][0]["imgid"]
    p.write_text(json.dumps(j))
    _raises(lambda: D.read_karpathy(p, img), "record id 'flickr30k/0' is given twice",
            str(img/j["images"][0]["filename"]), str(img/j["images"][1]["filename"]))
    root = _copy(fx, "imagefolder", tmp_path)/"val"
    f = sorted(root.glob("*/*.png"))[0]
    Image.open(f).convert("RGB").save(f.with_suffix(".jpg"))
    _raises(lambda: D.read_imagefolder(root), "is given twice", str(f), str(f.with_suffix(".jpg")))
    w = _copy(fx, "cc3m", tmp_path)
    (w/"again").mkdir()
    shutil.copy(w/"00000.tar", w/"again"/"00000.tar")
    _raises(lambda: D.read_webdataset([w/"00000.tar", w/"again"/"00000.tar"]), "is given twice",
            f"{w/'00000.tar'}::", f"{w/'again'/'00000.tar'}::")


def test_malformed_json(fx, tmp_path):
    p, img, _ = _coco(fx, tmp_path)
    p.write_text(p.read_text()[:-20])
    _raises(lambda: D.read_coco(p, img), str(p), "not valid JSON (a COCO captions file was expected)", "line 1, column")
    k, kimg, _ = _flickr(fx, tmp_path)
    k.write_text(k.read_text().replace('"split"', '"split" "x"', 1))
    _raises(lambda: D.read_karpathy(k, kimg), str(k), "not valid JSON", "line 1, column")
    _raises(lambda: D.resolve_data(f"karpathy:{k}?images={kimg}&split=test"), "not valid JSON")


@pytest.mark.parametrize("drop, says", [("images", "no 'images' list"),
                                        ("image_id", "annotations[1] has no 'image_id'"),
                                        ("file_name", "images[1] has no 'file_name'"),
                                        ("id", "images[0] has no 'id'")])
def test_coco_missing_keys(fx, tmp_path, drop, says):
    p, img, j = _coco(fx, tmp_path)
    if drop == "images":
        del j["images"]
    elif drop == "image_id":
        del j["annotations"][1]["image_id"]
    elif drop == "file_name":
        del j["images"][1]["file_name"]
    else:
        del j["images"][0]["id"]
    p.write_text(json.dumps(j))
    _raises(lambda: D.read_coco(p, img), f"{p}: {says}", "a COCO captions file is {'images'")


def test_latin1_csv(fx, tmp_path):
    d = _copy(fx, "csv", tmp_path)
    p = d/"captions.tsv"
    text = p.read_text().replace("a red circle", "a red cercle caf\u00e9", 1)
    p.write_bytes(text.encode("latin-1"))
    line = text.splitlines().index(next(ln for ln in text.splitlines() if "caf\u00e9" in ln)) + 1
    _raises(lambda: D.read_csv(p, d/"images"), str(p), f"line {line}: byte 0xe9 is not utf-8 text", "encoding=latin-1")
    rs = D.read_csv(p, d/"images", encoding="latin-1")
    assert "a red cercle caf\u00e9" in rs.captions and not rs.skipped
    spec = D.resolve_data(f"csv:{p}?images={d/'images'}&encoding=latin-1")
    assert spec.ids == rs.ids and spec.captions == rs.captions


def test_16bit_png_scaled(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path/"g16.png")
    assert Image.open(tmp_path/"g16.png").mode == "I;16"
    grey = np.asarray(D.load_image(tmp_path/"g16.png")).astype(int)
    assert (grey == 255).mean() < 0.01
    assert np.abs(grey - np.rint(ramp / 257)[..., None]).max() == 0
    _write_tar(tmp_path/"s.tar", {"0.png": (tmp_path/"g16.png").read_bytes()})   # the same inside a shard
    assert np.array_equal(np.asarray(D.load_image(f"{tmp_path/'s.tar'}::0.png")).astype(int), grey)


def test_fully_transparent_png(fx, tmp_path):
    root = _copy(fx, "imagefolder", tmp_path)/"val"
    f = sorted(root.glob("*/*.png"))[0]
    Image.new("RGBA", (48, 48), (200, 10, 10, 0)).save(f)
    _raises(lambda: D.load_image(f), f"{f}: fully transparent image")
    rs = D.read_imagefolder(root).check_images(progress=False)
    assert len(rs) == 3 and rs.skipped == [(str(f), f"{f}: fully transparent image (alpha 0 everywhere): "
                                                     "nothing to show")]


def test_non_utf8_caption_not_fingerprint_crash(fx, tmp_path):
    p, img, j = _coco(fx, tmp_path)
    first = j["annotations"][0]["caption"]
    p.write_text(p.read_text().replace(json.dumps(first), json.dumps(first)[:-1] + '\\udce9"', 1))
    rs = D.read_coco(p, img)
    assert first not in rs.captions and len(rs) == 4
    assert any("caption #0 is not UTF-8 text" in why for _, why in rs.skipped), rs.skipped
    texts_fingerprint(rs.captions)
    json.dumps(rs.skipped, ensure_ascii=False).encode()       # the report itself is writable UTF-8
    root = _copy(fx, "imagefolder", tmp_path)/"val"
    f = sorted(root.glob("*/*.png"))[0]
    os.rename(f, os.fsencode(f.parent) + b"/caf\xe9.png")
    rs = D.read_imagefolder(root)
    assert len(rs) == 3 and "is not UTF-8 text: rename the file" in rs.skipped[0][1], rs.skipped
    texts_fingerprint(rs.captions)
    json.dumps(rs.skipped, ensure_ascii=False).encode()
    folder = sorted(p for p in root.iterdir() if p.is_dir())[0]
    os.rename(folder, os.fsencode(root) + b"/caf\xe9")
    _raises(lambda: D.read_imagefolder(root), "class folder 'caf\\udce9' has a name that is not UTF-8 text")


def test_wds_non_utf8_txt_reported(fx, tmp_path):
    d = _copy(fx, "cc3m", tmp_path)
    shard = d/"00000.tar"
    mem = _members(shard)
    key = sorted(mem)[0].split(".")[0]
    mem[f"{key}.txt"] = "caf\u00e9".encode("latin-1")
    _write_tar(shard, mem)
    rs = D.read_webdataset(shard)
    assert rs.skipped == [(f"{shard}::{key}", "unreadable caption (UnicodeDecodeError)")] and len(rs) == 1
    texts_fingerprint(rs.captions)
