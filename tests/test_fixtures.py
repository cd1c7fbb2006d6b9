"""Fixtures for rehearsals (vla_lit.fixtures): tiny RANDOM models saved as Hugging Face folders (tests and
rehearsals only, never pretrained) and generated datasets in each real dataset's layout. Checks that every
folder loads through the hub / local-folder path of vla_lit.models and every dataset through vla_lit.data."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from vla_lit import fixtures as fx
from vla_lit.data import read_coco, read_csv, read_imagefolder, read_karpathy, read_webdataset, resolve_data
from vla_lit.models import load_lm, load_vision

N = 12   # images per split: >= 9 so every split holds every class


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return fx.tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def data(data_root) -> dict:
    return fx.data_fixtures(data_root, N)


def test_build_once_atomic(tmp_path):
    calls = []

    def build(out):
        calls.append(1)
        (out/"w.txt").write_text("x")

    d = fx.build_once(tmp_path/"f", {"kind": "t"}, build)
    assert fx.build_once(tmp_path/"f", {"kind": "t"}, build) == d and len(calls) == 1
    assert oct(d.stat().st_mode & 0o777) == oct(0o755)

    def killed(out):
        (out/"half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fx.build_once(tmp_path/"g", {"kind": "t"}, killed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]      # no half-written folder, no temp folder
    fx.build_once(tmp_path/"f", {"kind": "t", "n": 3}, build)         # another record: rebuilt in place
    assert len(calls) == 2 and fx._read_meta(d)["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_stale_temp_folders_cleared(tmp_path):
    stale = tmp_path/".f-abc"
    stale.mkdir()
    os.utime(stale, (0, 0))
    fx.build_once(tmp_path/"f", {"kind": "t"}, lambda out: None)
    assert not stale.exists()


def test_models_reused_and_marked_random(models, monkeypatch):
    assert sorted(models) == sorted(fx.MODEL_KINDS)
    root = models["vision"].parent
    monkeypatch.setattr(fx, "MODEL_KINDS", {k: _no_rebuild for k in fx.MODEL_KINDS})
    assert fx.tiny_models(root) == models
    assert fx.rehearsal_models(root) == {k: str(p) for k, p in models.items()}
    for p in models.values():
        meta = json.loads((p/"fixture.json").read_text())
        assert meta["random"] is True and "RANDOM" in meta["note"]
    for f in (fx.tiny_models, fx.rehearsal_models, fx._vision_folder, fx._decoder_folder, fx._encoder_folder,
              fx._sd_folder):
        assert "RANDOM" in f.__doc__
    with pytest.raises(ValueError, match="unknown model kinds"):
        fx.tiny_models(root, kinds=["clip"])


def _no_rebuild(out):
    raise AssertionError("a finished fixture folder was rebuilt")


@pytest.mark.parametrize("kind,patch,n_patches", [("vision", 14, 256), ("vision_p16", 16, 196)])
def test_vision_loads_from_folder(models, kind, patch, n_patches):
    v = load_vision(str(models[kind]))
    assert (v.patch_size, v.image_size, v.dim) == (patch, 224, 32)
    assert v.processor is not None                    # the hub branch: AutoImageProcessor read the folder
    out = v.encode([Image.new("RGB", (40, 48), (220, 40, 40))])
    assert out.patches.shape == (1, n_patches, 32) and out.cls.shape == (1, 32)


def test_lms_load_from_folder(models):
    dec = load_lm(str(models["decoder_lm"]))
    assert dec.is_decoder and dec.default_pooling == "last" and dec.dim == 32
    assert type(dec.model).__name__ == "LlamaForCausalLM" and not dec.model.config.tie_word_embeddings
    assert not torch.equal(dec.lm_head.weight, dec.token_embeddings)
    assert dec.hidden(["a red circle", "a green square"]).shape == (2, 32)
    enc = load_lm(str(models["encoder_lm"]))
    assert not enc.is_decoder and type(enc.model).__name__ == "BertModel"
    assert enc.hidden(["a blue triangle"]).shape == (1, 32)


def test_sd_folder_loads(models):
    from diffusers import StableDiffusionPipeline
    from vla_lit.t2i import T2IDecoder
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"])
    img = pipe("a red circle", num_inference_steps=1, height=16, width=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3)
    d = T2IDecoder.from_pretrained(str(models["sd"]))
    assert (d.pad_to, d.image_size, d.embed_dim, d.latent) == (77, 16, 32, True)


def test_shape_items():
    for i, want in [(0, "red circle"), (4, "green square"), (8, "blue triangle"), (9, "red circle")]:
        im, k, caps = fx.shape_item(i)
        assert im.size == (48, 48) and fx.CLASSES[k] == want
        assert caps[0] == f"a {want}" and caps[1].endswith(f"{want} on a white background")


def test_data_readers(data):
    assert sorted(data) == sorted(fx.DATA_KINDS)
    c = data["coco"]
    for split in ("train2017", "val2017"):
        rs = read_coco(c/"annotations"/f"captions_{split}.json", c/split)
        assert len(rs) == N and not rs.skipped and {len(r.captions) for r in rs} == {2}
    k = data["karpathy_coco"]
    for split, want in [("train", 2 * N), ("val", N), ("test", N), (None, 4 * N)]:
        rs = read_karpathy(k/"dataset_coco.json", k, split)
        assert len(rs) == want and not rs.skipped
    f = data["flickr30k"]
    assert len(read_karpathy(f/"dataset_flickr30k.json", f/"flickr30k-images", "test")) == N
    root = data["imagefolder"]
    va = read_imagefolder(root/"val", root/"classnames.txt")
    tr = read_imagefolder(root/"train", root/"classnames.txt")
    assert len(va) == len(tr) == N and va.classnames == tr.classnames == fx.CLASSES
    assert {r.label for r in va} == set(range(9)) and all(r.caption == fx.CLASSES[r.label] for r in va)
    rs = read_csv(data["csv"]/"captions.tsv", data["csv"]/"images")
    assert len(rs) == N and not rs.skipped and {len(r.captions) for r in rs} == {2}
    rs = read_webdataset(str(data["cc3m"]/"*.tar"))
    assert len(rs) == N and not rs.skipped and rs[0].captions == ["a red circle"]
    assert sorted(p.name for p in data["cc3m"].glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_rehearsal_paths_resolve(data, data_root):
    paths = fx.rehearsal_paths(data_root, N)
    assert {"coco", "coco_karpathy", "flickr30k", "imagenet", "cc3m", "cc12m"} <= set(paths)
    assert paths["cc12m"] == paths["cc3m"] and paths["imagenet"] == str(data["imagefolder"])
    specs = ["coco:{coco}/annotations/captions_val2017.json?images={coco}/val2017",
             "karpathy:{coco_karpathy}/dataset_coco.json?images={coco_karpathy}&split=test",
             "karpathy:{flickr30k}/dataset_flickr30k.json?images={flickr30k}/flickr30k-images&split=test",
             "imagefolder:{imagenet}/val?classnames={imagenet}/classnames.txt",
             "wds:{cc12m}/*.tar", "csv:{captions_csv}/captions.tsv?images={captions_csv}/images"]
    for spec in specs:
        assert len(resolve_data(spec.format(**paths))) == N, spec


def test_data_n_changes_rebuild(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        fx.data_fixtures(tmp_path, 1)
    a = fx.data_fixtures(tmp_path, 2)
    assert len(read_csv(a["csv"]/"captions.tsv", a["csv"]/"images")) == 2
    b = fx.data_fixtures(tmp_path, 3)
    assert a == b and len(read_csv(b["csv"]/"captions.tsv", b["csv"]/"images")) == 3
