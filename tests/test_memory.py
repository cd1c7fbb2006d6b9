"""Memory of a run: hub / folder models are loaded in the run's dtype directly (never materialised in fp32 first),
and every run's metrics.json carries its peak host and device memory (`vla_lit.core.write_metrics`). The models
are the tiny RANDOM fixture folders of `vla_lit.fixtures` (tests only, never pretrained)."""
import json
import math

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from vla_lit.core import peak_memory, write_metrics
from vla_lit.fixtures import tiny_models
from vla_lit.models import load_lm, load_vision


def test_write_metrics_checks_and_adds_peak_memory(tmp_path):
    path = write_metrics(tmp_path/"run", {"top1": 0.5, "n": 3})
    got = json.loads(path.read_text())
    assert path == tmp_path/"run"/"metrics.json" and [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    assert {k: got[k] for k in ("top1", "n")} == {"top1": 0.5, "n": 3}
    assert got["peak_host_mb"] > 0 and math.isfinite(got["peak_host_mb"])
    assert ("peak_device_mb" in got) == torch.cuda.is_available()
    assert set(peak_memory()) <= {"peak_host_mb", "peak_device_mb"}
    bad = {"ok": 1.0, "loss": float("nan"), "r1": float("inf"), "name": "x", "flag": True}
    with pytest.raises(ValueError) as e:
        write_metrics(tmp_path/"bad", bad)
    assert all(k in str(e.value) for k in ("loss", "r1", "name", "flag")) and "'ok'" not in str(e.value)
    assert not (tmp_path/"bad"/"metrics.json").exists()
    with pytest.raises(ValueError, match="peak_host_mb"):
        write_metrics(tmp_path/"clash", {"peak_host_mb": 1.0})


@pytest.fixture
def loads(monkeypatch):
    """What every `from_pretrained` call returned (class, dtype asked for, parameter dtypes) and every
    `Module.to` that cast fp32 parameters: a model materialised in fp32 and cast afterwards shows in both."""
    seen = {"loaded": [], "cast_from_fp32": []}
    orig_fp, orig_to = PreTrainedModel.from_pretrained.__func__, nn.Module.to

    def from_pretrained(cls, *args, **kw):
        m = orig_fp(cls, *args, **kw)
        seen["loaded"].append((cls.__name__, kw.get("dtype"), {p.dtype for p in m.parameters()}))
        return m

    def to(self, *args, **kw):
        dt = kw.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dt not in (None, torch.float32) and any(p.dtype == torch.float32 for p in self.parameters()):
            seen["cast_from_fp32"].append(type(self).__name__)
        return orig_to(self, *args, **kw)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(nn.Module, "to", to)
    return seen


@pytest.mark.parametrize("kind", ["decoder_lm", "vision"])
def test_folder_model_loads_in_run_dtype(kind, loads):
    folder = str(tiny_models(kinds=[kind])[kind])      # RANDOM weights, stored in fp32
    m = (load_lm if kind == "decoder_lm" else load_vision)(folder, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert loads["loaded"] and all(dt == torch.bfloat16 and dts == {torch.bfloat16}
                                   for _, dt, dts in loads["loaded"]), loads["loaded"]
    assert loads["cast_from_fp32"] == [], loads["cast_from_fp32"]
