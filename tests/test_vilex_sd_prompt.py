"""The caption prompts ViLex compares against are Stable Diffusion's own: on the tiny RANDOM Stable-Diffusion
folder of `vla_lit.fixtures` (random weights, tests only: plumbing, not quality), loaded by the library
(`T2IDecoder.from_pretrained`, as `vilex_gpu`'s run loads a hub id) and by
`diffusers.StableDiffusionPipeline`, the context of captions of different lengths (one longer than the
77-token window) and of the empty prompt equals the pipeline's `encode_prompt` at every position, padding
included; `vla_lit.decoder.caption_context` gives the same states, a ViLex prompt follows the same rule, and
the pooled text readout reads the prompt positions only."""
import pytest
import torch
from vla_lit.decoder import caption_context
from vla_lit.fixtures import tiny_models
from vla_lit.t2i import T2IDecoder
from vla_lit.vilex import ViLex, pool_states

CAPTIONS = ["a cat", "a small red bus parked on a wet street next to a tall building",
            " ".join(["a green frog on a leaf"] * 20), ""]


@pytest.fixture(scope="module")
def sd_pair():
    from diffusers import StableDiffusionPipeline      # slow import: only for this file
    folder = tiny_models(kinds=["sd"])["sd"]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    return T2IDecoder.from_pretrained(str(folder), device="cpu"), pipe


def _pipe_context(pipe, captions):
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=True)
    return pos, neg


def test_caption_context_is_the_pipelines(sd_pair):
    dec, pipe = sd_pair
    assert len(pipe.tokenizer(CAPTIONS[2])["input_ids"]) > pipe.tokenizer.model_max_length   # truncated
    pos, neg = _pipe_context(pipe, CAPTIONS)
    with torch.no_grad():
        solo = pipe.encode_prompt(CAPTIONS, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(solo, pos, rtol=0, atol=0)
    vl = ViLex(dec, feature_dim=8, n_tokens=2, width=8, heads=2).eval()
    ids = [dec.tokenizer(c, add_special_tokens=False)["input_ids"] for c in CAPTIONS]
    with torch.no_grad():
        h, m = vl.context(words=ids)                     # what `generate` / `sample(words=...)` use
        h0, _ = vl.context(batch_size=len(CAPTIONS))     # the empty prompt (the unconditional branch)
        hc, mc = caption_context(dec, CAPTIONS)
    assert h.shape == pos.shape == (len(CAPTIONS), 77, dec.embed_dim)
    torch.testing.assert_close(h, pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(h0, neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(hc, pos, rtol=0, atol=1e-6)
    assert torch.equal(mc, m)
    tok = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(m, tok["attention_mask"])         # the mask marks the tokenizer's own tokens
    z = vl.prompt_vectors(words=ids)
    torch.testing.assert_close(z, pool_states(pos, m), rtol=0, atol=1e-6)


def test_vilex_prompt_padding_is_unmasked(sd_pair):
    """A ViLex prompt is encoded by the pipeline's rule too (causal attention, no padding mask): soft tokens
    that are a caption's word embeddings give the pipeline's context of that caption, padding included."""
    dec, pipe = sd_pair
    vl = ViLex(dec, feature_dim=8, n_tokens=4, width=8, heads=2).eval()
    caps = ["a red bus on a street", "a cat on a mat"]
    ids = [dec.tokenizer(c, add_special_tokens=False)["input_ids"][:4] for c in caps]
    assert [len(i) for i in ids] == [4, 4]
    soft = dec.text_encoder.get_input_embeddings()(torch.tensor(ids))
    with torch.no_grad():
        h, m = vl.context(soft)
        pos, _ = _pipe_context(pipe, [dec.tokenizer.decode(i) for i in ids])
    assert m.sum(1).tolist() == [6, 6]
    torch.testing.assert_close(h, pos, rtol=0, atol=1e-6)
