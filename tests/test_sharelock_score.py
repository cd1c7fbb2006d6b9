"""A finished ShareLock run is scored on a new ImageFolder in one call: `sharelock_train.ipynb` saves its projector
(head.pt, the floor's in floor/head.pt), and `vla_lit.evaluate.score_run` rebuilds the embedder from it
(`vla_lit.sharelock.embedder_from_head`) and gives exactly the scores the run itself computed (embedded models, a
few training steps on a few Tux Paint stamps, a generated ImageFolder of three classes)."""
import json, subprocess, sys
from pathlib import Path
import numpy as np
import yaml
from PIL import Image
from vla_lit.evaluate import score_run, SCORES_FILE

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = Path(sys.executable).parent / "papermill"


def _image_folder(root: Path) -> Path:
    "Three class folders of four small images each: a red disc, a green bar, a blue square on white."
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    shapes = {"apple": ((xx - 24) ** 2 + (yy - 24) ** 2 < 200, (200, 30, 30)),
              "cucumber": ((abs(xx - 24) < 6) & (abs(yy - 24) < 20), (40, 160, 40)),
              "box": ((abs(xx - 24) < 14) & (abs(yy - 24) < 14), (40, 40, 200))}
    for name, (mask, colour) in shapes.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            img = np.full((48, 48, 3), 255, np.uint8)
            img[mask] = np.clip(np.array(colour) + rng.integers(-20, 20, 3), 0, 255)
            Image.fromarray(np.roll(img, (i - 2) * 3, axis=1)).save(root / name / f"{i}.png")
    return root


def test_score_run_on_a_new_imagefolder(tmp_path):
    folder = _image_folder(tmp_path / "shapes")
    spec = f"imagefolder:{folder}?name=shapes"
    params = dict(vision_model="dinov2-s14-embedded", lm_name="smollm2-135m-embedded", steps=5, batch_size=16,
                  hidden_dim=32, num_layers=2, val_frac=0.0, caption_templates=[], num_threads=1,
                  train_data="tuxpaint?split=train&kind=concept&limit=48",
                  eval_data=[spec, "tuxpaint?split=test&kind=concept&limit=16&task=retrieval&name=heldout_captions"],
                  with_floor=True, out_dir=str(tmp_path / "run"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([str(PAPERMILL), "-k", "python3", str(ROOT / "nbs/experiments/sharelock_train.ipynb"),
                        str(tmp_path / "out.ipynb"), "-f", str(tmp_path / "params.yaml"), "--cwd", str(ROOT)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "head.pt").is_file() and (run / "floor" / "head.pt").is_file()
    # one call scores the finished run on the folder: the same numbers the run computed for it
    scores = score_run(run, [spec], device="cpu", verbose=False)
    assert {"shapes_top1", "shapes_mean_recall", "shapes_n", "shapes_chance_top1"} <= set(scores)
    assert scores["shapes_n"] == 12 and scores["shapes_n_classes"] == 3
    for k in ("top1", "mean_recall"):
        assert scores[f"shapes_{k}"] == metrics[f"shapes_{k}"], (k, scores, metrics)
    saved = json.loads((run / SCORES_FILE).read_text())
    assert saved["shapes"]["spec"] == spec and saved["shapes"]["top1"] == metrics["shapes_top1"]
    # the floor's head rebuilds the random-weight LM from its seed: its numbers too
    floor = score_run(run / "floor", [spec], device="cpu", verbose=False)
    assert floor["shapes_top1"] == metrics["shapes_top1_floor"]
    # a retrieval set scores the same way
    ret = score_run(run, ["tuxpaint?split=test&kind=concept&limit=16&task=retrieval&name=heldout_captions"],
                    device="cpu", verbose=False)
    assert all(ret[f"heldout_captions_{k}"] == metrics[f"heldout_captions_{k}"] for k in ("i2t_r1", "t2i_r5"))
    assert set(json.loads((run / SCORES_FILE).read_text())) == {"shapes", "heldout_captions"}   # merged by set
