"""A finished ViLex run can be scored again from its saved head: `evaluate.save_head` -> `evaluate.score_run`
rebuilds the embedder through `vla_lit.vilex.embedder_from_head` and gives exactly the scores the run's own
embedder gives, for the tiny random Stable-Diffusion-shaped decoder (`decoder_hub_id="tiny-random-sd"`) and for a
pixel decoder saved to a folder (`decoder_dir`, with its training steps checked). Tiny random models only (NOT
pretrained: they test plumbing, not quality); a few seconds on a CPU."""
import json
import pytest
import torch
from vla_lit.core import seed_everything
from vla_lit.decoder import pixel_decoder, pixel_unet, save_decoder
from vla_lit.evaluate import eval_sets, evaluate, load_head, save_head, score_run
from vla_lit.models import load_lm, load_vision
from vla_lit.t2i import tiny_random_sd
from vla_lit.vilex import ViLex, ViLexEmbedder, embedder_from_head

SPECS = ["tuxpaint?split=test&limit=8&task=retrieval&name=tiny_ret", "tuxpaint?split=test&limit=12&name=tiny_cls"]


def _head_params(vl, **decoder):
    return {**vl.head_params(), "variant": "taildrop", "vision": "tiny-random-dinov2", "vision_size": 28,
            "eval_keep": None, "eval_pool": "mean", **decoder}


def _check_round_trip(run_dir, vl, params):
    "The run's own scores == score_run's from head.pt; scores.json holds them by set name."
    vision = load_vision("tiny-random-dinov2")
    own = evaluate(ViLexEmbedder(vl, vision, vision_size=28), eval_sets(SPECS), verbose=False)
    save_head(run_dir, "vilex", {"taildrop": vl.trainable_state_dict()}, params)
    assert load_head(run_dir)["mechanism"] == "vilex"
    scored = score_run(run_dir, SPECS, device="cpu", verbose=False)
    assert scored == own
    saved = json.loads((run_dir / "scores.json").read_text())
    assert set(saved) == {"tiny_ret", "tiny_cls"}
    assert saved["tiny_ret"]["i2t_r1"] == own["tiny_ret_i2t_r1"]
    assert own["tiny_ret_n_images"] == 8 and own["tiny_cls_n"] == 12


def test_score_run_tiny_sd(tmp_path):
    seed_everything(0)
    vl = ViLex(tiny_random_sd(), feature_dim=32, n_tokens=3, width=32, heads=2)
    params = _head_params(vl, decoder_hub_id="tiny-random-sd")
    _check_round_trip(tmp_path, vl, params)
    # the first tokens only (TailDrop prefix) and the EOS readout are head parameters too
    emb = embedder_from_head(load_head(tmp_path) | {"params": {**params, "eval_keep": 1, "eval_pool": "eos"}})
    assert (emb.n_keep, emb.pool) == (1, "eos")


def test_score_run_pixel_decoder(tmp_path):
    lm = load_lm("tiny-random-bert")
    seed_everything(0)
    dec = pixel_decoder(lm, pixel_unet(8, lm.dim, (32, 32), attention_levels=1), name="tiny-pixel")
    save_decoder(dec, tmp_path / "decoder", lm, {"steps": 5, "complete": True})
    vl = ViLex(dec, feature_dim=32, n_tokens=2, width=32, heads=2)
    params = _head_params(vl, decoder_hub_id="", decoder_dir=str(tmp_path / "decoder"), decoder_steps=5)
    _check_round_trip(tmp_path / "run", vl, params)
    head = load_head(tmp_path / "run")
    with pytest.raises(ValueError, match="5 training steps"):
        embedder_from_head(head | {"params": {**params, "decoder_steps": 300}})
    head["state"]["taildrop"] = {k: torch.zeros_like(v) for k, v in head["state"]["taildrop"].items()}
    assert not torch.equal(embedder_from_head(head).vilex.pool.queries, vl.pool.queries)
