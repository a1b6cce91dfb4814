"""The feed-forward registry: a variant is one file in treeffn/layers plus one registry line.

A toy variant with its own settings section, validation and description is registered here at run time, as its
file would at import, and goes through everything a shipped variant does: configuration by dotted keys, a model, a
training step, a checkpoint round trip, and the description. Nothing else in the package has to name it.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import treeffn
import treeffn.config as config_mod
from treeffn.checkpoint import load_model, save_checkpoint_dir
from treeffn.config import Config, get_config
from treeffn.errors import ConfigError
from treeffn.layers import VARIANTS, build_ffn, dense_twin, units
from treeffn.layers import registry
from treeffn.layers.registry import FFNVariant, residual_std

PKG = Path(treeffn.__file__).resolve().parent


@dataclass
class ScaledConfig:
    NAME = "scaled"
    scale: float = 0.5

    def check(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"scaled.scale must be positive (got {self.scale})")


class ScaledMLP(nn.Module):
    """A toy variant: a GELU MLP whose output is multiplied by a constant."""

    def __init__(self, d_model: int, hidden: int, scale: float, out_std: float):
        super().__init__()
        self.fc_in, self.fc_out, self.scale = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model), scale
        nn.init.normal_(self.fc_out.weight, 0.0, out_std)
        self.hidden, self.d_model = hidden, d_model

    def total_units(self) -> int:
        return self.hidden

    def active_units(self) -> float:
        return float(self.hidden)

    def flops_per_token(self) -> float:
        return 4.0 * self.hidden * self.d_model

    def forward(self, x):
        return self.scale * self.fc_out(torch.nn.functional.gelu(self.fc_in(x))), {}


def _check(cfg: Config) -> None:
    if cfg.ffn.hidden > 10_000:
        raise ConfigError("scaled MLPs stay below 10,000 units")


SCALED = FFNVariant("scaled", build=lambda cfg: ScaledMLP(cfg.model.d_model, cfg.ffn.hidden, cfg.scaled.scale,
                                                          residual_std(cfg)),
                    describe=lambda cfg: f"scaled {cfg.ffn.hidden} x{cfg.scaled.scale:g}", section=ScaledConfig,
                    check=_check)


@pytest.fixture
def scaled(monkeypatch):
    """Register the toy variant for one test only (the registries are restored afterwards)."""
    monkeypatch.setattr(registry, "VARIANTS", dict(registry.VARIANTS))
    monkeypatch.setattr(config_mod, "SECTIONS", dict(config_mod.SECTIONS))
    registry.register(SCALED)
    return SCALED


def test_a_variant_is_one_definition_and_one_registration(scaled, tmp_path):
    cfg = get_config("debug", {"ffn.kind": "scaled", "scaled.scale": "0.25", "ffn.hidden": 48})
    assert cfg.scaled.scale == 0.25 and cfg.describe().endswith("scaled 48 x0.25")
    with pytest.raises(ConfigError, match="scaled.scale must be positive"):
        cfg.copy().apply({"scaled.scale": 0})
    with pytest.raises(ConfigError, match="below 10,000"):
        cfg.copy().apply({"ffn.hidden": 20_000})
    with pytest.raises(ConfigError, match="unknown config key 'scaled.width'"):
        cfg.copy().apply({"scaled.width": 3})
    model = treeffn.build_model(cfg)
    assert all(isinstance(f, ScaledMLP) and f.scale == 0.25 for f in model.ffn_modules())
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = model(idx, targets=idx)
    out.loss.backward()
    assert all(p.grad is not None for p in model.ffn_modules()[0].parameters())
    save_checkpoint_dir(tmp_path / "ckpt", model)
    back = load_model(tmp_path / "ckpt")
    assert back.cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, model(idx).logits)
    assert units(cfg) == (48, 48.0) and dense_twin(cfg).ffn.kind == "dense"


def test_every_shipped_variant_builds_describes_and_initialises_itself():
    for name in VARIANTS:
        cfg = get_config("debug", {"ffn.kind": name})
        f = build_ffn(cfg)
        assert f.total_units() >= f.active_units() > 0 and f.flops_per_token() > 0
        assert name.split("_")[0] in cfg.describe()
        torch.manual_seed(0)
        a = [p.clone() for p in treeffn.build_model(cfg).ffn_modules()[0].parameters()]
        torch.manual_seed(0)
        b = list(treeffn.build_model(cfg).ffn_modules()[0].parameters())
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # initialised by the seed alone
        assert all(float(p.detach().abs().max()) < 1.0 for p in b)  # not PyTorch's default fan-in init of a 1-unit layer


def test_dense_twin_widths():
    cfg = get_config("tiny", {"ffn.kind": "tree"})
    assert dense_twin(cfg, "training").ffn.hidden == 1020
    assert dense_twin(cfg, "inference").ffn.hidden == 32
    moe = get_config("tiny", {"ffn.kind": "moe", "moe.experts": 32, "ffn.hidden": 32, "moe.top_k": 1})
    assert dense_twin(moe, "inference").ffn.hidden == 32


def test_old_topk_key_still_loads():
    cfg = Config.from_dict({"ffn": {"kind": "topk", "hidden": 64, "active": 8}, "model": {"vocab_size": 512}})
    assert cfg.topk.active == 8


def _kind_comparisons(path: Path) -> list[str]:
    """`x.kind == "name"` / `!=` / `in (...)` with string literals in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "kind":
            consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            if consts:
                out.append(f"{path.relative_to(PKG)}:{node.lineno}")
    return out


def test_no_module_outside_the_layers_branches_on_a_variant_name():
    found = [hit for f in sorted(PKG.rglob("*.py")) if "layers" not in f.relative_to(PKG).parts
             for hit in _kind_comparisons(f)]
    assert not found, f"branching on ffn.kind outside treeffn/layers: {found}"


def test_config_sections_are_dataclasses_with_a_check():
    for name, cls in config_mod.SECTIONS.items():
        assert dataclasses.is_dataclass(cls)
        if name not in ("model", "ffn", "mod", "train"):
            assert cls.NAME == name and callable(cls.check)


def test_projections_into_the_residual_stream_start_at_the_residual_scale():
    """GPT-2 initialisation: 0.02 for input-side weights, 0.02/√(2·n_layer) for every projection that writes into the
    residual stream (attention output and the feed-forward output), whoever initialises it."""
    torch.manual_seed(0)
    for kind in ("dense", "swiglu", "topk", "moe"):
        model = treeffn.build_model("tiny", {"ffn.kind": kind}).requires_grad_(False)
        small = residual_std(model.cfg)
        for blk in model.blocks:
            assert float(blk.attn.o.weight.std()) == pytest.approx(small, rel=0.05)
            assert float(blk.attn.q.weight.std()) == pytest.approx(0.02, rel=0.05)
            outs = [m for name, m in blk.ffn.named_modules() if name.rsplit(".", 1)[-1] in ("fc_out", "w2")]
            assert outs and all(float(o.weight.std()) == pytest.approx(small, rel=0.05) for o in outs)
