"""LexVLA with hub-style models, on tiny RANDOM local fixtures (tests only, not models): the vision codebook comes
from the matrix the text side is scored with (the LM head), which an untied LM (Llama 2; the `decoder_lm` fixture)
keeps apart from its input embeddings; PatchDis scenes follow the encoder's geometry (DINOv2's hub processor:
resize 256, crop 224; patch 14 or 16), so each patch's label is that of the pixels the patch sees. The embedded
defaults (tied SmolLM2, DINOv2-S/14 without a processor) keep their numbers."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling
from vla_lit.data import tuxpaint
from vla_lit.features import extract_features
from vla_lit.fixtures import tiny_models
from vla_lit.lexical import init_codebook, lexical_codebook, text_lexical_logits, lexical_prompt, word_vocabulary
from vla_lit.lexvla import LexVLA, LexVLAEmbedder, lexvla_from_state, head_state
from vla_lit.models import load_lm, load_vision
from vla_lit.patchdis import (SceneGeometry, patch_labels, patchdis_set, scene_geometry, scene_patchdis,
                              scene_records)


@pytest.fixture(scope="module")
def fx():
    return tiny_models(kinds=["vision", "vision_p16", "decoder_lm"])


@pytest.fixture(scope="module")
def untied(fx):
    return load_lm(str(fx["decoder_lm"]))


def test_codebook_rows_are_the_lm_head_rows_on_an_untied_lm(fx, untied):
    W_out, W_in = untied.model.get_output_embeddings().weight.detach().float(), untied.token_embeddings.float()
    assert not torch.equal(W_out, W_in)                                        # the fixture is untied
    caps = ["A frog.", "A red fire truck."]
    H = untied.hidden([lexical_prompt(c) for c in caps], pooling="last").float()
    torch.testing.assert_close(text_lexical_logits(untied, caps), H @ lexical_codebook(untied).float().T,
                               atol=1e-3, rtol=1e-3)                           # the text side's matrix
    venc = load_vision(str(fx["vision"]))
    vocab = word_vocabulary(untied.tokenizer, vocab_size=untied.vocab_size)[:50]
    m = LexVLA(venc.dim, lexical_codebook(untied), vocab)
    assert torch.equal(m.vision.codebook.detach(), W_out[vocab])
    assert not torch.allclose(m.vision.codebook.detach(), W_in[vocab])
    emb = LexVLAEmbedder(m, venc, untied, log_p0=-9.0)                         # words added for a set: same matrix
    emb.set_extension(["mammal", "insect"], "classnames")
    added = torch.tensor(emb.added)
    assert len(added) and torch.equal(emb.current_model().vision.codebook[len(vocab):].detach(), W_out[added])
    sd = head_state(m, -9.0)["model"]                                          # a saved head rebuilds alike
    assert torch.equal(lexvla_from_state(sd, venc.dim, lexical_codebook(untied)).vision.codebook, m.vision.codebook)


def test_tied_embedded_lm_uses_one_tensor():
    "SmolLM2 (the embedded default) ties its embeddings: the LM head is the input embedding tensor itself."
    smol = load_lm("smollm2-135m-embedded")
    assert lexical_codebook(smol) is smol.token_embeddings
    ids = torch.tensor([100, 2000, 30000])
    assert torch.equal(init_codebook(lexical_codebook(smol), ids), init_codebook(smol.token_embeddings, ids))


def _seen_patch_labels(proc, labels: np.ndarray, patch: int) -> np.ndarray:
    "Patch labels of the pixels the model receives: `labels` through the processor's own resize + crop, nearest."
    ids, inv = np.unique(labels, return_inverse=True)
    rgb = np.repeat(inv.reshape(labels.shape).astype(np.uint8)[..., None], 3, -1)
    x = proc(images=Image.fromarray(rgb), do_rescale=False, do_normalize=False,
             resample=PILImageResampling.NEAREST, return_tensors="np")["pixel_values"][0, 0]
    return patch_labels(ids[x.astype(np.int64)], patch)


def test_scene_labels_line_up_with_what_the_model_sees(fx, tmp_path):
    venc = load_vision(str(fx["vision"]))                                       # p14, resize 256 -> crop 224
    scenes, names = patchdis_set(tuxpaint(), n_scenes=8, seed=0, vision=venc)
    seen = [_seen_patch_labels(venc.processor, s.padded_labels(), venc.patch_size) for s in scenes]
    assert np.mean([(a == s.patch_labels).mean() for a, s in zip(seen, scenes)]) == 1.0
    recs = scene_records(scenes[:2], names, tmp_path)                          # the files the encoder reads ...
    for r, s in zip(recs, scenes):
        got = venc.preprocess([Image.open(r.image)])
        ref = venc.processor(images=s.image, do_resize=False, do_center_crop=False, return_tensors="pt")
        torch.testing.assert_close(got, ref["pixel_values"].float())         # ... reach the model as the scene
    old, _ = patchdis_set(tuxpaint(), n_scenes=8, seed=0)                      # fixed 224 px / 14 px scenes
    frac = np.mean([(_seen_patch_labels(venc.processor, s.padded_labels(), 14) == s.patch_labels).mean()
                    for s in old])
    assert frac < 0.95                                                         # what the geometry fixes


def test_patch16_scene_patchdis_runs(fx, tmp_path):
    venc = load_vision(str(fx["vision_p16"]))
    assert scene_geometry(venc) == SceneGeometry(224, 16, 256, 16)
    scenes, names = patchdis_set(tuxpaint(), n_scenes=3, seed=0, vision=venc)
    assert {s.patch_labels.shape for s in scenes} == {(14, 14)}
    sf = extract_features(venc, scene_records(scenes, names, tmp_path / "scenes"), pooling=("patches",),
                          progress=False, root=tmp_path / "cache")
    SP = sf.get("patches").float()
    assert SP.shape[1] == 14 * 14
    got = scene_patchdis(list(SP), torch.randn(len(names), venc.dim), scenes)
    assert 0.0 <= got["patchdis_miou"] <= 1.0 and got["n_classes"] >= 2


def test_embedded_dinov2_geometry_is_unchanged():
    "DINOv2-S/14 (embedded, no image processor) reads a 224 px scene as it is: scenes and files as before."
    venc = load_vision("dinov2-s14-embedded")
    assert scene_geometry(venc) == SceneGeometry(224, 14, 224, 0)
    scenes, _ = patchdis_set(tuxpaint(), n_scenes=2, seed=0, vision=venc)
    old, _ = patchdis_set(tuxpaint(), n_scenes=2, seed=0)
    for s, o in zip(scenes, old):
        assert s.padded() is s.image and np.array_equal(np.asarray(s.image), np.asarray(o.image))
        assert np.array_equal(s.patch_labels, o.patch_labels) and s.patch_labels.shape == (16, 16)
