"""Numerics and checkpoints never give a silent number: every case is a clear error naming what and where,
or a warning saying what differs (and nothing computed earlier is lost).

- Sinkhorn: `sinkhorn_fused` refuses marginals of different totals, negative or NaN entries, as `sinkhorn`.
- A contrastive loss on one pair is refused; a `drop_last=False` stream that ends every epoch on one row says so.
- Prompt templates that do not name the class are refused, in specs and in `zero_shot_classifier`.
- Fractional `steps` and `clip_grad=0` are refused before any step.
- A truncated or foreign `last.pt` is an error naming it and is left as it was; resuming with another seed or
  on other data warns; a NaN loss or keep-best metric is never a silent number.
- NaN image, caption or prompt embeddings stop an evaluation with an error naming the set.
"""
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from vla_lit.core import RunConfig
from vla_lit.data import BadInputError, Record, RecordSet, check_data_spec
from vla_lit.evaluate import (EvalSet, eval_set, evaluate_classification, evaluate_retrieval,
                              mean_per_class_recall, zero_shot_classifier)
from vla_lit.losses import clip_loss
from vla_lit.sinkhorn import sinkhorn, sinkhorn_fused
from vla_lit.train import NonFiniteLossError, TrainOptions, tensor_batches, train

F64 = dict(dtype=torch.float64)


def _caught(f):
    "Run `f` recording every warning; (result, messages)."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = f()
    return out, [str(x.message) for x in w]


# ---------------------------------------------------------------- Sinkhorn marginals
@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_fused])
def test_sinkhorn_mass_mismatch_refused(solve):
    S = torch.randn(4, 5, **F64)
    a, b = torch.full((4,), 0.25, **F64), torch.full((5,), 0.4, **F64)          # totals 1 and 2
    with pytest.raises(ValueError, match=r"same total mass, got 1 and 2"):
        solve(S, 0.5, 3, a=a, b=b)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_fused])
@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_sinkhorn_bad_marginal_entries_refused(solve, bad):
    b = torch.full((5,), 0.2, **F64)
    b[0] = bad
    with pytest.raises(ValueError, match="marginal b must be finite and > 0"):
        solve(torch.randn(4, 5, **F64), 0.5, 3, b=b)


def test_sinkhorn_fused_batched_mass_names_problem():
    b = torch.full((3, 5), 0.2, **F64)
    b[2] *= 1.5
    with pytest.raises(ValueError, match=r"\(problem 2 of 3\)"):
        sinkhorn_fused(torch.randn(3, 4, 5, **F64), 0.5, 3, b=b)


def test_sinkhorn_fused_valid_unchanged():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(6, 9, generator=g, **F64)
    a = torch.rand(6, generator=g, **F64) + 0.1
    b = torch.rand(9, generator=g, **F64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    P = sinkhorn_fused(S, 0.3, 5, a=a, b=b)
    torch.testing.assert_close(P, sinkhorn(S, 0.3, 5, a=a, b=b), rtol=0, atol=1e-14)
    torch.testing.assert_close(P.sum(-1), a, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- contrastive batch of one
def test_clip_loss_one_pair_refused():
    img, txt = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8)
    with pytest.raises(ValueError, match="at least 2 pairs.*a batch of 1"):
        clip_loss(img, txt, logit_scale=10.0)


def test_tensor_batches_one_row_tail_reported():
    s, msgs = _caught(lambda: tensor_batches(torch.randn(5, 3), batch_size=4, drop_last=False))
    assert any("the last batch of every epoch has 1 row" in m for m in msgs), msgs
    assert [len(next(s)[0]) for _ in range(3)] == [4, 1, 4]
    for kw in (dict(n=5, drop_last=True), dict(n=6, drop_last=False)):
        _, msgs = _caught(lambda: tensor_batches(torch.randn(kw["n"], 3), batch_size=4,
                                                 drop_last=kw["drop_last"]))
        assert not msgs, (kw, msgs)


# ---------------------------------------------------------------- prompt templates
class _Texts:
    "Prompts embedded as random rows (distinct prompts -> distinct rows)."
    def embed_texts(self, prompts):
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(prompts), 4, generator=g)


@pytest.mark.parametrize("template", ["a photo.", "a photo of a {{c}}.", "a {c} of {n}"])
def test_zero_shot_classifier_template_without_class_refused(template):
    with pytest.raises(ValueError, match="would give every class the same prompt"):
        zero_shot_classifier(_Texts(), ["cat", "dog"], ["a {c}.", template])


def test_spec_template_without_class_refused(tmp_path):
    for i, name in enumerate(("red", "blue")):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4), (255 * (1 - i), 0, 255 * i)).save(tmp_path / name / "0.png")
    with pytest.raises(BadInputError, match="needs {c}"):
        check_data_spec(f"imagefolder:{tmp_path}?templates=a {{c}}|a photo")
    with pytest.raises(BadInputError, match="same prompt"):           # passes the spec's '{c}' substring check
        eval_set(f"imagefolder:{tmp_path}?templates=a {{c}}|a {{{{c}}}}")


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("bad,msg", [(dict(steps=2.5), "whole number"),
                                     (dict(clip_grad=0), "clip_grad must be > 0")])
def test_train_options_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        TrainOptions(**bad).resolve(RunConfig(steps=10))


# ---------------------------------------------------------------- checkpoints
class _Reg(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def loss(self, batch):
        x, = batch
        return {"loss": ((x - self.w) ** 2).mean()}


X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))


def _fit(data, ckpt, steps=4, seed=0, resume=False, **kw):
    return train(_Reg(), data, RunConfig(seed=seed, steps=steps, lr=0.1, device="cpu"), ckpt_dir=ckpt,
                 resume=resume, progress=False, **kw)


def test_truncated_checkpoint_named_and_kept(tmp_path):
    _fit(tensor_batches(X, batch_size=8), tmp_path)
    last = tmp_path / "last.pt"
    cut = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(cut)
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {last}.*damaged or truncated"):
        _fit(tensor_batches(X, batch_size=8), tmp_path, steps=8, resume=True)
    assert last.read_bytes() == cut                               # nothing restarted over it
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_foreign_checkpoint_named(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "last.pt")
    with pytest.raises(RuntimeError, match="is not a checkpoint of train"):
        _fit(tensor_batches(X, batch_size=8), tmp_path, resume=True)


def test_resume_other_seed_warns(tmp_path):
    _fit(tensor_batches(X, batch_size=8), tmp_path)
    r, msgs = _caught(lambda: _fit(tensor_batches(X, batch_size=8), tmp_path, seed=5, resume=True))
    assert r.resumed_from == 4
    assert any("(seed 0) with seed 5" in m for m in msgs), msgs


@pytest.mark.parametrize("change,what", [
    (lambda: tensor_batches(X + 1, batch_size=8), "rows_sha256"),
    (lambda: tensor_batches(X[:48], batch_size=8), "arrays"),
    (lambda: tensor_batches(X, batch_size=16), "batch_size"),
])
def test_resume_other_data_warns(tmp_path, change, what):
    _fit(tensor_batches(X, batch_size=8), tmp_path)
    r, msgs = _caught(lambda: _fit(change(), tmp_path, resume=True))
    assert r.resumed_from == 4
    other = [m for m in msgs if "on other data" in m]
    assert len(other) == 1 and what in other[0], msgs


def test_resume_same_data_silent(tmp_path):
    _fit(tensor_batches(X, batch_size=8), tmp_path)
    _, msgs = _caught(lambda: _fit(tensor_batches(X.numpy(), batch_size=8), tmp_path, resume=True))
    assert not msgs, msgs                                          # a memmap/array of the same rows is the same data
    assert torch.load(tmp_path / "last.pt", weights_only=False)["data_fingerprint"]["batch_size"] == 8


def test_resume_own_fingerprint_warns(tmp_path):
    class Shards(list):
        data_fingerprint = "a"
    _fit(Shards([(X,)]), tmp_path)
    Shards.data_fingerprint = "b"
    _, msgs = _caught(lambda: _fit(Shards([(X,)]), tmp_path, resume=True))
    assert any("checkpoint: a, now: b" in m for m in msgs), msgs


# ---------------------------------------------------------------- NaNs
def test_nan_loss_stops_training():
    Xn = X.clone()
    Xn[5, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        train(_Reg(), tensor_batches(Xn, batch_size=64), RunConfig(steps=3, lr=0.1, device="cpu"),
              progress=False)


def test_nan_keep_best_metric_reported():
    r, msgs = _caught(lambda: train(_Reg(), [(X,)], RunConfig(steps=2, lr=0.1, device="cpu"), progress=False,
                                    eval_fn=lambda m: {"acc": float("nan")}, eval_every=1, keep_best="acc"))
    assert r.best_step is None
    assert any("keep_best metric 'acc' is nan" in m for m in msgs), msgs


class _Emb:
    "Random embeddings; a NaN in one image row (`bad_img`) or one text row (`bad_txt`)."
    def __init__(self, bad_img=None, bad_txt=None):
        self.bad_img, self.bad_txt = bad_img, bad_txt

    def embed_images(self, records):
        z = torch.randn(len(records), 4)
        if self.bad_img is not None:
            z[self.bad_img, 2] = float("nan")
        return z, [r.id for r in records]

    def embed_texts(self, texts):
        z = torch.randn(len(texts), 4)
        if self.bad_txt is not None:
            z[self.bad_txt, 0] = float("nan")
        return z


def _sets():
    recs = [Record(f"toy/{i}", f"/nowhere/{i}.png", [f"caption {i}"], i % 2, "cat" if i % 2 else "dog")
            for i in range(4)]
    rs, spec = RecordSet(recs, "toy", ["dog", "cat"], None), SimpleNamespace(name="toy")
    return EvalSet(spec, rs, "retrieval"), EvalSet(spec, rs, "classification", None, ["a {c}."])


def test_nan_embeddings_retrieval_named():
    ret, _ = _sets()
    with pytest.raises(ValueError, match=r"toy: image embeddings contain NaN/inf in 1 of 4 row\(s\), "
                                         r"first record 'toy/1'"):
        evaluate_retrieval(_Emb(bad_img=1), ret)
    with pytest.raises(ValueError, match=r"toy: caption embeddings .* first caption 'caption 2' of record "
                                         r"'toy/2'"):
        evaluate_retrieval(_Emb(bad_txt=2), ret)


def test_nan_embeddings_classification_named():
    _, cls = _sets()
    with pytest.raises(ValueError, match="toy: image embeddings contain NaN/inf"):
        evaluate_classification(_Emb(bad_img=3), cls)
    with pytest.raises(ValueError, match="toy: prompt embeddings contain NaN/inf .* first prompt 'a cat.'"):
        evaluate_classification(_Emb(bad_txt=1), cls)


def test_nan_scores_never_a_recall():
    S = torch.randn(6, 3)
    S[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mean_per_class_recall(S, torch.tensor([0, 1, 2, 0, 1, 2]))
