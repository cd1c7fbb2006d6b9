"""The released ShareLock checkpoints load into this library's `ShareLock` (`vla_lit.sharelock.load_official_sharelock`).

A checkpoint is built here in the official layout: the modules of github.com/JonaRuthardt/ShareLock
`sharelock/models/projection.py` and `model.py` (random values, tiny sizes), saved as `train.py`'s Lightning
`ModelCheckpoint` saves it: a `torch.save` dict with `state_dict`, the OmegaConf training config under
`hyper_parameters` (and its class under `hparams_type`) and the optimiser state. omegaconf is not a dependency of
this library, so stand-ins with OmegaConf 2.3's module and class names and pickled state (`_content`, `_val`,
`_metadata`, `_parent`; `typing.Any` and a `defaultdict` in the metadata) are pickled, then removed from
`sys.modules` before loading, as for a user without omegaconf. The reference forward is written from
`Projection.forward` directly on the official-layout tensors."""
import math, sys, types
from collections import defaultdict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vla_lit.sharelock as sl
from vla_lit.sharelock import OFFICIAL_LOG_SCALE, load_official_sharelock

D_VIS, D_TXT, HIDDEN, LAYERS = 12, 20, 16, 4
CONFIG = {"seed": 42, "experiment_name": "base",
          "data": {"dataset": ["cc3m"], "val_split_num": 50000},
          "model": {"embedding_space_dim": 768, "vision_encoder": "dinov2_vitl14",
                    "language_encoder": "meta-llama/Meta-Llama-3-8B",
                    "vision_projector": {"hidden_size": HIDDEN, "num_layers": 0, "normalize": True},
                    "language_projector": {"hidden_size": HIDDEN, "num_layers": LAYERS, "normalize": True}},
          "training": {"max_steps": 5000, "learning_rate": 0.001}}


def official_state(side="language_projector", layers=LAYERS, d_in=D_TXT, d_out=D_VIS, seed=0):
    """The state dict of the official `ShareLock` (`model.py`): `<side>.projection` = projection.py's
    nn.Sequential of (Linear, BatchNorm1d, ReLU, Dropout) x (layers-1), Linear; the other side nn.Identity."""
    g = torch.Generator().manual_seed(seed)
    sd, d = {}, d_in
    for i in range(layers - 1):
        sd[f"{side}.projection.{4 * i}.weight"] = torch.randn(HIDDEN, d, generator=g) / math.sqrt(d)
        sd[f"{side}.projection.{4 * i}.bias"] = torch.randn(HIDDEN, generator=g)
        bn = f"{side}.projection.{4 * i + 1}"
        sd[f"{bn}.weight"], sd[f"{bn}.bias"] = torch.randn(HIDDEN, generator=g), torch.randn(HIDDEN, generator=g)
        sd[f"{bn}.running_mean"] = torch.randn(HIDDEN, generator=g)
        sd[f"{bn}.running_var"] = torch.rand(HIDDEN, generator=g) + 0.5
        sd[f"{bn}.num_batches_tracked"] = torch.tensor(5000)
        d = HIDDEN
    sd[f"{side}.projection.{4 * (layers - 1)}.weight"] = torch.randn(d_out, d, generator=g) / math.sqrt(d)
    sd[f"{side}.projection.{4 * (layers - 1)}.bias"] = torch.randn(d_out, generator=g)
    return sd


def official_forward(sd, side, x, layers=LAYERS):
    "projection.py's `Projection.forward` in eval mode, on the raw official-layout tensors."
    p = f"{side}.projection"
    for i in range(layers - 1):
        x = x @ sd[f"{p}.{4 * i}.weight"].T + sd[f"{p}.{4 * i}.bias"]
        bn = f"{p}.{4 * i + 1}"
        x = (x - sd[f"{bn}.running_mean"]) / torch.sqrt(sd[f"{bn}.running_var"] + 1e-5)
        x = torch.relu(x * sd[f"{bn}.weight"] + sd[f"{bn}.bias"])                   # Dropout(0.2): eval, identity
    x = x @ sd[f"{p}.{4 * (layers - 1)}.weight"].T + sd[f"{p}.{4 * (layers - 1)}.bias"]
    return x / x.norm(dim=1, keepdim=True)


def _fake_omegaconf():
    "Stand-ins for omegaconf.dictconfig.DictConfig, omegaconf.nodes.AnyNode and omegaconf.base.ContainerMetadata."
    mods = {n: types.ModuleType(n) for n in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes", "omegaconf.base")}

    class _State:                              # OmegaConf pickles containers and nodes by their __dict__
        def __init__(self, **kw): self.__dict__.update(kw)
        def __getstate__(self): return dict(self.__dict__)
        def __setstate__(self, s): self.__dict__.update(s)
    classes = {}
    for mod, name in (("omegaconf.dictconfig", "DictConfig"), ("omegaconf.nodes", "AnyNode"),
                      ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata")):
        cls = type(name, (_State,), {"__module__": mod, "__qualname__": name})
        setattr(mods[mod], name, cls)
        classes[name] = cls
    return mods, classes


def _to_dictconfig(obj, C, parent=None):
    "A plain config as OmegaConf's object graph (containers with `_content`, leaves as nodes with `_val`)."
    if isinstance(obj, dict):
        meta = C["ContainerMetadata"](ref_type=Any, object_type=dict, optional=True, key=None, flags={},
                                      resolver_cache=defaultdict(dict), key_type=Any, element_type=Any)
        node = C["DictConfig"](_metadata=meta, _parent=parent)
        node._content = {k: _to_dictconfig(v, C, node) for k, v in obj.items()}
        return node
    if isinstance(obj, list):                  # (ListConfig in OmegaConf; the loader reads `_content` alike)
        node = C["DictConfig"](_metadata=None, _parent=parent)
        node._content = [_to_dictconfig(v, C, node) for v in obj]
        return node
    return C["AnyNode"](_val=obj, _metadata=C["Metadata"](ref_type=Any, object_type=None, optional=True,
                                                          key=None), _parent=parent)


def save_lightning_ckpt(path, state, config=CONFIG):
    "Write `state` and `config` as Lightning's ModelCheckpoint does, with the config an OmegaConf DictConfig."
    mods, C = _fake_omegaconf()
    sys.modules.update(mods)
    try:
        torch.save({"epoch": 2, "global_step": 5000, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                    "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {"ModelCheckpoint": {"best_model_score":
                    torch.tensor(1.5)}}, "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0)}},
                    "param_groups": [{"lr": 1e-3, "params": [0]}]}], "lr_schedulers": [{"last_epoch": 5000}],
                    "hparams_name": "config", "hyper_parameters": _to_dictconfig(config, C),
                    "hparams_type": C["DictConfig"]}, path)
    finally:
        for n in mods: sys.modules.pop(n, None)
    return path


def test_lightning_checkpoint_matches_the_official_forward(tmp_path):
    sd = official_state()
    f = save_lightning_ckpt(tmp_path / "ShareLock-CC3M.ckpt", sd)
    assert "omegaconf" not in sys.modules
    m = load_official_sharelock(f, device="cpu")
    assert (m.direction, m.vision_dim, m.text_dim, m.text_proj.num_layers, m.vision_proj.num_layers) == \
        ("text_to_vision", D_VIS, D_TXT, LAYERS, 0)
    assert not m.training and m.official_config == CONFIG
    g = torch.Generator().manual_seed(1)
    xt, xv = torch.randn(7, D_TXT, generator=g), torch.randn(7, D_VIS, generator=g)
    with torch.no_grad():
        zt, zv = m.encode_text(xt), m.encode_image(xv)
        torch.testing.assert_close(zt, official_forward(sd, "language_projector", xt), rtol=1e-6, atol=1e-6)
        assert torch.equal(zv, xv / xv.norm(dim=1, keepdim=True))            # vision: nn.Identity, normalised
        sims = math.exp(OFFICIAL_LOG_SCALE) * zv @ zt.T                      # misc.py: the fixed logit scale
        y = torch.arange(7)
        want = (F.cross_entropy(sims, y) + F.cross_entropy(sims.T, y)) / 2
        torch.testing.assert_close(m.loss({"vision": xv, "text": xt})["loss"], want, rtol=1e-6, atol=1e-6)
    # every library tensor came from the file, bit for bit (the logit scale: the official constant)
    lib = m.state_dict()
    for k, v in sd.items():
        assert torch.equal(lib[k.replace("language_projector.projection", "text_proj.net")], v), k
    assert lib["logit_scale.log_scale"] == torch.tensor(OFFICIAL_LOG_SCALE)
    assert set(lib) == {k.replace("language_projector.projection", "text_proj.net") for k in sd} | \
        {"logit_scale.log_scale"}


def test_state_dict_safetensors_folder_and_hub(tmp_path, monkeypatch):
    sd = official_state(seed=3)
    x = torch.randn(4, D_TXT)
    want = official_forward(sd, "language_projector", x)
    torch.save(sd, tmp_path / "plain.pt")
    save_file(sd, str(tmp_path / "weights.safetensors"))
    run = tmp_path / "logs" / "base" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    save_lightning_ckpt(run / "best_model.ckpt", sd)
    for src in (tmp_path / "plain.pt", tmp_path / "weights.safetensors", tmp_path / "logs"):
        m = load_official_sharelock(src, device="cpu")
        torch.testing.assert_close(m.encode_text(x).detach(), want, rtol=1e-6, atol=1e-6)
        assert m.official_config == ({} if src.suffix in (".pt", ".safetensors") else CONFIG)
    with pytest.raises(FileNotFoundError, match="expected one checkpoint file"):
        load_official_sharelock(tmp_path, device="cpu")                      # three candidates: name one
    asked = []
    def fake_download(repo, filename):
        asked.append((repo, filename))
        return str(run / "best_model.ckpt")
    monkeypatch.setattr(sl, "hf_hub_download", fake_download)
    m = load_official_sharelock("sharelock-cc12m", device="cpu")
    assert asked == [("FunAILab/ShareLock", "ShareLock-CC12M.ckpt")]
    m = load_official_sharelock("FunAILab/ShareLock", filename="ShareLock-CC3M.ckpt", device="cpu")
    assert asked[-1] == ("FunAILab/ShareLock", "ShareLock-CC3M.ckpt")
    torch.testing.assert_close(m.encode_text(x).detach(), want, rtol=1e-6, atol=1e-6)
    def offline(repo, filename):
        raise OSError("Name or service not known")
    monkeypatch.setattr(sl, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="offline, download it elsewhere"):
        load_official_sharelock("sharelock-cc3m")


def test_reverse_direction_and_one_layer(tmp_path):
    sd = official_state(side="vision_projector", layers=2, d_in=D_VIS, d_out=D_TXT)
    cfg = {"model": {"vision_projector": {"hidden_size": HIDDEN, "num_layers": 2, "normalize": True},
                     "language_projector": {"hidden_size": HIDDEN, "num_layers": 0, "normalize": True}}}
    m = load_official_sharelock(save_lightning_ckpt(tmp_path / "v2t.ckpt", sd, cfg), device="cpu")
    assert (m.direction, m.vision_dim, m.text_dim, m.embed_dim) == ("vision_to_text", D_VIS, D_TXT, D_TXT)
    xv = torch.randn(5, D_VIS)
    torch.testing.assert_close(m.encode_image(xv).detach(), official_forward(sd, "vision_projector", xv, 2),
                               rtol=1e-6, atol=1e-6)
    one = official_state(layers=1)
    torch.save(one, tmp_path / "linear.pt")
    m1 = load_official_sharelock(tmp_path / "linear.pt", device="cpu")
    x = torch.randn(3, D_TXT)
    torch.testing.assert_close(m1.encode_text(x).detach(), official_forward(one, "language_projector", x, 1))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("language_projector.projection.9.running_mean"),
     "library tensors not filled ['text_proj.net.9.running_mean']"),
    (lambda sd: sd.update({"language_projector.projection.2.weight": torch.ones(3)}),
     "official keys with no library tensor ['language_projector.projection.2.weight']"),
    (lambda sd: sd.update({"vision_encoder.encoder.cls_token": torch.ones(1, 1, D_VIS)}), "backbone weights"),
    (lambda sd: sd.update({"language_projector.projection.5.bias": torch.ones(HIDDEN + 1)}),
     f"language_projector.projection.5.bias ({HIDDEN + 1},) -> text_proj.net.5.bias ({HIDDEN},)"),
    (lambda sd: sd.update({"vision_projector.projection.0.weight": torch.ones(D_VIS, D_VIS)}),
     "both projectors are trained"),
])
def test_mismatches_are_named(tmp_path, edit, message):
    sd = official_state()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_official_sharelock(tmp_path / "bad.pt", device="cpu")
    assert message in str(err.value), str(err.value)


def test_config_is_checked_against_the_tensors(tmp_path):
    sd = official_state()
    wrong = {"model": {**CONFIG["model"], "language_projector": {"hidden_size": 64, "num_layers": LAYERS}}}
    with pytest.raises(ValueError, match="hidden_size is 64 in the config, 16 in the tensors"):
        load_official_sharelock(save_lightning_ckpt(tmp_path / "a.ckpt", sd, wrong))
    raw = {"model": {**CONFIG["model"], "language_projector": {**CONFIG["model"]["language_projector"],
                                                               "normalize": False}}}
    with pytest.raises(ValueError, match="normalize is False"):
        load_official_sharelock(save_lightning_ckpt(tmp_path / "b.ckpt", sd, raw))


def test_unknown_code_in_a_checkpoint_is_never_run(tmp_path):
    "A pickled call the tensors-only loader would not make is replaced by an inert stand-in, never executed."
    ran = []
    mod = types.ModuleType("_evil_lib")
    def boom(*a):
        ran.append(a)
        return "ran"
    boom.__module__, boom.__qualname__ = "_evil_lib", "boom"
    mod.boom = boom

    class Payload:
        def __reduce__(self): return (boom, ("payload",))
    sys.modules["_evil_lib"] = mod
    try:
        torch.save({"state_dict": official_state(), "hyper_parameters": {"x": Payload()}}, tmp_path / "x.ckpt")
        m = load_official_sharelock(tmp_path / "x.ckpt", device="cpu")
    finally:
        sys.modules.pop("_evil_lib", None)
    assert ran == [] and m.official_config == {"x": None}
