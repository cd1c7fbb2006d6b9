"""A finished LexVLA run is scored again, zero-shot, on a new ImageFolder whose class names are partly outside the
training vocabulary: `evaluate.score_run` rebuilds the embedder from the saved head, adds the missing words for
that set and reports how many (tiny RANDOM local fixtures in the hub models' layout, tests only: a Dinov2 with
DINOv2's hub processor, resize 256 -> crop 224, and a Llama with untied embeddings; a few Tux Paint stamps). The
run's vision codebook starts from the LM head, the matrix the text side is scored with."""
import json, subprocess, sys
from pathlib import Path
import pytest
from PIL import Image
from vla_lit.evaluate import load_head, score_run, evaluate
from vla_lit.lexvla import embedder_from_head, word_index, vocabulary_extension
from vla_lit.fixtures import tiny_models
from vla_lit.models import load_lm

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = Path(sys.executable).parent / "papermill"
FX = tiny_models(kinds=["vision", "decoder_lm"])
TINY = {"vision": str(FX["vision"]), "lm": str(FX["decoder_lm"]), "steps": 3, "dense_steps": 3, "batch_size": 8,
        "n_scenes": 3, "init_active": 256, "show": False, "train_data": "tuxpaint?split=train&limit=50",
        "eval_data": ["tuxpaint?split=test&task=retrieval&name=tuxpaint&limit=10"]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    "A finished tiny LexVLA run (the experiment notebook through papermill)."
    tmp = tmp_path_factory.mktemp("lexvla")
    params = tmp / "params.json"
    params.write_text(json.dumps({**TINY, "out_dir": str(tmp / "run")}))
    r = subprocess.run([str(PAPERMILL), "-k", "python3", str(ROOT / "nbs/experiments/lexvla_train.ipynb"),
                        str(tmp / "out.ipynb"), "-f", str(params)], capture_output=True, text=True,
                       cwd=ROOT / "nbs/experiments")
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp / "run"


def _folder(root: Path, classes) -> Path:
    "An ImageFolder with two small images per class."
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (40, 40), (60 * i, 255 - 90 * j, 40 * j)).save(root / c / f"{j}.png")
    return root


def test_score_run_extends_the_vocabulary(run_dir, tmp_path):
    head = load_head(run_dir)
    assert head["mechanism"] == "lexvla" and (run_dir / "metrics.json").is_file()
    vocab = head["state"]["model"]["vocab_ids"]
    emb = embedder_from_head(head)
    index = word_index(emb.lm.tokenizer, emb.lm.vocab_size)
    known = next(w for w, ids in index.items() if set(ids) <= set(vocab.tolist()))   # a training-vocabulary word
    classes = [known, "mammal", "insect"]
    new, missing = vocabulary_extension(classes, index, vocab)
    assert new and not missing and not set(index[known]) & set(new)                  # partly outside the vocabulary
    spec = f"imagefolder:{_folder(tmp_path / 'zoo', classes)}?name=zoo"
    got = score_run(run_dir, [spec], verbose=False)
    assert got["zoo_vocab_added"] == len(new) and got["zoo_vocab_missing"] == 0
    assert {"zoo_top1", "zoo_mean_recall", "zoo_active_image", "zoo_active_text"} <= set(got)
    assert got["zoo_n"] == 6 and got["zoo_n_classes"] == 3 and got["zoo_active_text"] > 0
    saved = json.loads((run_dir / "scores.json").read_text())
    assert saved["zoo"]["spec"] == spec and saved["zoo"]["vocab_added"] == len(new)
    assert evaluate(emb, [spec], verbose=False) == got                    # the same embedder, the same scores


def test_no_extension_keeps_the_training_vocabulary(run_dir, tmp_path):
    head = load_head(run_dir)
    head["params"]["extend_vocab"] = "none"
    emb = embedder_from_head(head)
    spec = f"imagefolder:{_folder(tmp_path / 'zoo', ['mammal', 'insect'])}?name=zoo"
    got = evaluate(emb, [spec], verbose=False)
    assert got["zoo_vocab_added"] == 0 and emb.vocab_ids.tolist() == head["state"]["model"]["vocab_ids"].tolist()


def test_vision_codebook_starts_from_the_lm_head(run_dir):
    "On an untied LM the trained codebook is still next to the LM head's rows, far from the input embeddings'."
    head = load_head(run_dir)
    sd, lm = head["state"]["model"], load_lm(head["params"]["lm"])
    vocab, cb = sd["vocab_ids"], sd["vision.codebook"]
    W_out, W_in = lm.lm_head.weight.detach().float()[vocab], lm.token_embeddings.detach().float()[vocab]
    ratio = (cb - W_out).norm(dim=1) / (cb - W_in).norm(dim=1)
    assert (ratio < 0.5).all(), (f"the codebook is nearer the input embeddings than the LM head (distance ratio "
                                 f"up to {float(ratio.max()):.2f}): initialise it from lexical_codebook(lm)")
