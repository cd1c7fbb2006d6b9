"""A finished VLAP run is scored again on a new COCO-format caption file from its saved head, without
retraining: `vla_lit.evaluate.score_run` rebuilds the embedder (`vla_lit.vlap.embedder_from_head`) and gives the
numbers the run itself computed on that set (embedded models, a few training steps, no captioning loss).
A run with an encoder-decoder LM (a tiny random T5 folder) trains the captioning loss through T5 and captions."""
import json, subprocess, sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vla_lit.evaluate import score_run

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = Path(sys.executable).parent / "papermill"
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("black", "square")]


def _tiny_coco(d: Path) -> str:
    "Five drawn shapes, two captions each, as a COCO captions file; returns its data spec."
    (d / "img").mkdir(parents=True)
    images, anns = [], []
    for i, (colour, shape) in enumerate(SHAPES):
        im = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(im)
        box = (12, 12, 52, 52)
        if shape == "circle": draw.ellipse(box, fill=colour)
        elif shape == "square": draw.rectangle(box, fill=colour)
        else: draw.polygon([(32, 10), (54, 54), (10, 54)], fill=colour)
        im.save(d / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        anns += [{"image_id": i, "id": 2 * i, "caption": f"A {colour} {shape}."},
                 {"image_id": i, "id": 2 * i + 1, "caption": f"a {shape} drawn in {colour}"}]
    (d / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return f"coco:{d / 'captions.json'}?images={d / 'img'}&name=shapes"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vlap_score")
    spec = _tiny_coco(tmp / "coco")
    out = tmp / "run"
    params = ["-p", "vision", "dinov2-s14-embedded", "-p", "lm_name", "smollm2-135m-embedded",
              "-p", "train_data", "tuxpaint?split=train&limit=16", "-p", "steps", "3", "-p", "batch_size", "4",
              "-p", "caption_weight", "0.0", "-p", "assign_weight", "1.0", "-p", "vocab_top", "256",
              "-p", "n_caption_eval", "0", "-p", "show", "False", "-p", "seed", "0", "-p", "device", "cpu",
              "-y", json.dumps({"eval_data": ["tuxpaint?split=test&task=retrieval&limit=4", spec]})]
    subprocess.run([str(PAPERMILL), "-k", "python3", str(ROOT / "nbs/experiments/vlap_train.ipynb"),
                    str(tmp / "run.ipynb"), "-p", "out_dir", str(out), *params],
                   check=True, capture_output=True, cwd=tmp)
    return out, spec, json.loads((out / "metrics.json").read_text())


def test_head_scores_a_new_coco_file(trained_run):
    out, spec, metrics = trained_run
    assert (out / "head.pt").is_file()
    got = score_run(out, [spec], device="cpu")
    keys = [f"shapes_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert {k: got[k] for k in keys} == {k: metrics[k] for k in keys}       # the run's own numbers, bit for bit
    assert got["shapes_n_images"] == 5.0 and got["shapes_n_texts"] == 10.0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["shapes"]["spec"].startswith("coco:") and scores["shapes"]["i2t_r1"] == got["shapes_i2t_r1"]


def test_head_rebuilds_the_assignment_space(trained_run):
    from vla_lit.evaluate import eval_sets, evaluate, load_head
    from vla_lit.vlap import embedder_from_head
    out, spec, metrics = trained_run
    asg = embedder_from_head(load_head(out), device="cpu", space="assignment")
    got = evaluate(asg, eval_sets([spec]), verbose=False)
    keys = [f"shapes_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert {k: got[k] for k in keys} == {k: metrics[f"asg_{k}"] for k in keys}


def _tiny_t5_folder(d: Path) -> Path:
    """A tiny RANDOM T5 (tests only) saved as a hub folder, with the tiny LMs' tokenizer: what `load_lm` and
    `vla_lit.vlap.load_captioner` read for an encoder-decoder LM such as t5-base."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from vla_lit.models import _smollm2_tokenizer
    tok = _smollm2_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                   num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5ForConditionalGeneration(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_a_t5_run_trains_the_captioning_loss_and_captions(tmp_path):
    """The official code's default LM is T5: a run whose `lm_name` is an encoder-decoder folder trains the
    captioning term through the full model (the encoder reading [visual prefix; prompt], the caption as decoder
    labels), captions the evaluation images, and its head scores again from the folder's name."""
    t5 = _tiny_t5_folder(tmp_path / "tiny-random-t5")
    out = tmp_path / "run"
    params = ["-p", "vision", "tiny-random-dinov2", "-p", "lm_name", str(t5),
              "-p", "train_data", "tuxpaint?split=train&limit=16", "-p", "steps", "3", "-p", "batch_size", "4",
              "-p", "n_caption_eval", "2", "-p", "max_new_tokens", "3", "-p", "show", "False", "-p", "seed", "0",
              "-p", "device", "cpu", "-y", json.dumps({"eval_data": ["tuxpaint?split=test&task=retrieval&limit=4"]})]
    subprocess.run([str(PAPERMILL), "-k", "python3", str(ROOT / "nbs/experiments/vlap_train.ipynb"),
                    str(tmp_path / "run.ipynb"), "-p", "out_dir", str(out), *params],
                   check=True, capture_output=True, cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_caption"] > 0 and metrics["tuxpaint_test_n_captioned"] == 2.0
    caps = json.loads((out / "captions.json").read_text())["tuxpaint_test"]
    assert len(caps) == 2 and all(isinstance(v["pred"], str) for v in caps.values())
    got = score_run(out, ["tuxpaint?split=test&task=retrieval&limit=4"], device="cpu")
    keys = [f"tuxpaint_test_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert {k: got[k] for k in keys} == {k: metrics[k] for k in keys}
