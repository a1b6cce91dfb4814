"""Configuration: small dataclasses, named presets, dotted overrides.

Every public knob has a dotted name (``model.d_model``, ``tree.depth``, ``train.lr`` …) used both by
``treeffn train --set key=value`` and ``treeffn.build_model(preset, overrides={...})``. Unknown names and impossible
values raise :class:`~treeffn.errors.ConfigError` naming them. The config is saved as JSON beside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, get_type_hints

from .errors import ConfigError


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0 = same as n_head (multi-head); fewer = grouped-query attention
    seq_len: int = 256
    vocab_size: int = 8192
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    bias: bool = False  # biases in attention projections and dense MLPs
    dropout: float = 0.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class FFNConfig:
    kind: str = "dense"  # a registered feed-forward variant (treeffn.layers.VARIANTS)
    hidden: int = 512  # dense / swiglu / topk width; width of each MoE expert
    activation: str = "gelu"  # dense MLP nonlinearity


@dataclass
class MoDConfig:
    every: int = 0  # 0 = off; 2 = every other block is routed
    capacity: float = 0.125  # fraction of the sequence a routed block processes
    causal: str = "aux"  # aux (BCE on router logits) | predictor (small MLP on stop-gradient input)
    aux_weight: float = 0.01


@dataclass
class TrainConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    eval_every: int = 200
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 0  # 0 = at evaluation points and at the end
    stats_every: int = 10  # routing statistics of tree layers, every n steps (0 = off)


# Sections by name: the core ones here; feed-forward variants add theirs (``tree``, ``moe``, ``topk`` …) through
# :func:`register_section` when ``treeffn.layers`` registers them.
SECTIONS: dict[str, type] = {"model": ModelConfig, "ffn": FFNConfig, "mod": MoDConfig, "train": TrainConfig}
# Keys renamed since checkpoints were first written: old config.json files still load.
LEGACY_KEYS = {"ffn.active": "topk.active"}
_VARIANT_HOOKS: dict[str, Callable[[Config], Any]] = {}


def register_section(cls: type) -> None:
    """Add a variant's settings dataclass as section ``cls.NAME`` (its ``check()`` validates its own values)."""
    name = cls.NAME
    if name in SECTIONS and SECTIONS[name] is not cls:
        raise ValueError(f"config section '{name}' is registered twice")
    SECTIONS[name] = cls


def register_variant_hooks(check: Callable[[Config], None], describe: Callable[[Config], str]) -> None:
    """The feed-forward registry's validation and description of the chosen ``ffn.kind``."""
    _VARIANT_HOOKS.update(check=check, describe=describe)


class Config:
    """Every setting, by section: ``cfg.model.d_model``, ``cfg.tree.depth`` …; ``cfg.preset`` names the origin."""

    def __init__(self, preset: str = "custom"):
        self.preset = preset
        self._sections = {name: cls() for name, cls in SECTIONS.items()}

    def __getattr__(self, name: str):
        sections = self.__dict__.get("_sections")
        if sections is None or name not in SECTIONS:
            raise AttributeError(name)
        if name not in sections:  # registered after this config was made
            sections[name] = SECTIONS[name]()
        return sections[name]

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({self.to_dict()})"

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    # ---- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {**{name: dataclasses.asdict(sec) for name, sec in self.sections().items()}, "preset": self.preset}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object")
        cfg = cls()
        for key, value in d.items():
            if key == "preset":
                cfg.preset = str(value)
                continue
            if key not in SECTIONS:
                raise ConfigError(f"unknown config section '{key}'")
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be an object")
            for name, v in value.items():
                cfg.set(f"{key}.{name}", v)
        cfg.validate()
        return cfg

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    # ---- dotted access --------------------------------------------------------------------------------------
    def set(self, dotted: str, value: Any) -> None:
        dotted = LEGACY_KEYS.get(dotted, dotted)
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"unknown config key '{dotted}' (sections: {', '.join(SECTIONS)})")
        obj = getattr(self, section)
        hints = get_type_hints(type(obj))
        if name not in hints:
            known = ", ".join(f"{section}.{f.name}" for f in dataclasses.fields(obj))
            raise ConfigError(f"unknown config key '{dotted}'; known keys: {known}")
        setattr(obj, name, _coerce(dotted, value, hints[name]))

    def get(self, dotted: str) -> Any:
        dotted = LEGACY_KEYS.get(dotted, dotted)
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or not hasattr(getattr(self, section), name):
            raise ConfigError(f"unknown config key '{dotted}'")
        return getattr(getattr(self, section), name)

    def apply(self, overrides: dict[str, Any] | None) -> "Config":
        for k, v in (overrides or {}).items():
            self.set(k, v)
        self.validate()
        return self

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        m, f, r, tr = self.model, self.ffn, self.mod, self.train
        positive("model.d_model", m.d_model)
        positive("model.n_layer", m.n_layer)
        positive("model.n_head", m.n_head)
        positive("model.seq_len", m.seq_len)
        positive("model.vocab_size", m.vocab_size)
        if m.vocab_size > 2**31 - 1:
            raise ConfigError(f"model.vocab_size {m.vocab_size} is too large")
        if m.d_model % m.n_head:
            raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
        if m.head_dim % 2:
            raise ConfigError(f"head size model.d_model/model.n_head = {m.head_dim} must be even for rotary embeddings")
        if m.n_kv_head < 0 or (m.n_kv_head and m.n_head % m.n_kv_head):
            raise ConfigError(f"model.n_head ({m.n_head}) must be divisible by model.n_kv_head ({m.n_kv_head})")
        if m.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"model.norm must be layernorm or rmsnorm (got '{m.norm}')")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1) (got {m.dropout})")
        positive("ffn.hidden", f.hidden)
        for name, sec in self.sections().items():
            if name not in ("model", "ffn", "mod", "train"):
                sec.check()
        if "check" in _VARIANT_HOOKS:
            _VARIANT_HOOKS["check"](self)
        if r.every < 0:
            raise ConfigError(f"mod.every must be ≥ 0 (got {r.every})")
        if not 0.0 < r.capacity <= 1.0:
            raise ConfigError(f"mod.capacity must be in (0, 1] (got {r.capacity})")
        if r.causal not in ("aux", "predictor"):
            raise ConfigError(f"mod.causal must be aux or predictor (got '{r.causal}')")
        if tr.lr <= 0 or not math.isfinite(tr.lr):
            raise ConfigError(f"train.lr must be a positive number (got {tr.lr})")
        positive("train.batch_size", tr.batch_size)
        positive("train.grad_accum", tr.grad_accum)
        positive("train.max_steps", tr.max_steps)
        if tr.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.dtype must be fp32 or bf16 (got '{tr.dtype}')")
        return self

    def describe(self) -> str:
        m = self.model
        ffn = _VARIANT_HOOKS["describe"](self) if "describe" in _VARIANT_HOOKS else self.ffn.kind
        mod = f", MoD every {self.mod.every} @ {self.mod.capacity}" if self.mod.every else ""
        return f"{m.n_layer}L d{m.d_model} h{m.n_head} ctx{m.seq_len}, {ffn}{mod}"


def positive(name: str, value: int) -> None:
    """Raise ConfigError unless ``value`` is a positive number."""
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name} must be positive (got {value})")


def _coerce(name: str, value: Any, typ: Any) -> Any:
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(str(value).replace("_", ""))
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"bad value for {name}: {value!r} is not a valid {typ.__name__}") from None
    return value


# ---- presets -------------------------------------------------------------------------------------------------
# Tree shapes are chosen so the dense twin of equal *training* width has ffn.hidden = trees * (2^(depth+1) - 1).

def _preset(model: dict, ffn: dict, tree: dict, train: dict, moe: dict | None = None) -> dict:
    return {"model": model, "ffn": ffn, "tree": tree, "train": train, "moe": moe or {}}


PRESETS: dict[str, dict] = {
    # trains in seconds on the committed text sample (vocab 512)
    "debug": _preset(
        dict(d_model=64, n_layer=2, n_head=4, seq_len=64, vocab_size=512),
        dict(hidden=252),
        dict(trees=4, depth=5),
        dict(lr=3e-3, batch_size=8, max_steps=40, warmup_steps=5, eval_every=20, eval_batches=4, log_every=5),
        dict(experts=4, top_k=2),
    ),
    # CPU studies on the default corpus (8k BPE)
    "tiny": _preset(
        dict(d_model=256, n_layer=4, n_head=4, seq_len=256, vocab_size=8192),
        dict(hidden=1020),
        dict(trees=4, depth=7),  # 1020 units, 32 active (3.1 %)
        dict(lr=2e-3, batch_size=16, max_steps=1200, warmup_steps=60, eval_every=200, eval_batches=16),
        dict(experts=8, top_k=2),
    ),
    "small": _preset(
        dict(d_model=512, n_layer=8, n_head=8, seq_len=512, vocab_size=8192),
        dict(hidden=2040),
        dict(trees=8, depth=7),  # 2040 units, 64 active (3.1 %)
        dict(lr=1e-3, batch_size=16, max_steps=4000, warmup_steps=200, eval_every=500, eval_batches=16),
        dict(experts=8, top_k=2),
    ),
    # paper-scale shapes: instantiate on the meta device to count parameters and FLOPs
    "gpt-125m": _preset(
        dict(d_model=768, n_layer=12, n_head=12, seq_len=2048, vocab_size=50304),
        dict(hidden=3060),
        dict(trees=12, depth=7),  # 3060 units, 96 active (3.1 %)
        dict(lr=6e-4, batch_size=32, max_steps=100000, warmup_steps=2000),
        dict(experts=8, top_k=2),
    ),
    "opt-1.3b": _preset(
        dict(d_model=2048, n_layer=24, n_head=32, seq_len=2048, vocab_size=50272),
        dict(hidden=8160),
        dict(trees=32, depth=7),  # 8160 units, 256 active (3.1 %)
        dict(lr=2e-4, batch_size=64, max_steps=100000, warmup_steps=2000),
        dict(experts=8, top_k=2),
    ),
}


def get_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for section, values in PRESETS[preset].items():
        for k, v in values.items():
            cfg.set(f"{section}.{k}", v)
    return cfg.apply(overrides)


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """['a.b=1', ...] -> {'a.b': '1'}; a pair without '=' is an error naming it."""
    out: dict[str, str] = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{p}' must look like key=value (e.g. tree.depth=7)")
        out[key.strip()] = value.strip()
    return out


def public_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# ---- the config of a run ---------------------------------------------------------------------------------------
def config_differences(a: Config, b: Config, may_change: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between ``a`` and ``b``, leaving out the preset name and the sections
    (``train``) and keys (``model.seq_len``) named in ``may_change``."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for section in dict.fromkeys([*da, *db]):
        if section == "preset" or section in may_change:
            continue
        sa, sb = da.get(section) or {}, db.get(section) or {}
        for key in dict.fromkeys([*sa, *sb]):
            dotted = f"{section}.{key}"
            if dotted not in may_change and (key not in sa or key not in sb or sa[key] != sb[key]):
                out.append(dotted)
    return out


def assemble_config(preset: str | None = None, overrides: dict[str, Any] | list[str] | None = None, *,
                    base: Config | str | None = None, defaults: dict[str, Any] | None = None,
                    saved: Config | None = None, saved_name: str = "the saved config",
                    may_change: tuple[str, ...] = ("train",)) -> Config:
    """The config of a run: the one place where the command line and the Python API build and check it.

    Starts from ``base`` (a Config, which is copied, or the path of a config.json file such as a checkpoint's) or
    else from ``preset`` (default ``tiny``; not both); sets ``defaults`` for the keys that ``overrides`` leave alone
    (the data's ``model.vocab_size``, say), then ``overrides`` (a dict, or ``--set`` strings ``key=value``), and
    validates the result.

    With ``saved`` (the config of the run being resumed, or of the checkpoint being fine-tuned) the result must equal
    it except in the sections and keys of ``may_change``; otherwise a ConfigError names the keys that differ.
    """
    if base is not None and preset is not None:
        raise ConfigError("a run's config starts from a preset or from a base config, not both")
    if base is None:
        cfg = get_config(preset or "tiny")
    elif isinstance(base, Config):
        cfg = base.copy()
    else:
        try:
            with open(base, encoding="utf-8") as fh:
                cfg = Config.from_dict(json.load(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {base} ({exc.strerror})") from None
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"config file {base} is not valid JSON") from None
    if overrides is not None and not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    for key, value in {**{k: v for k, v in (defaults or {}).items() if k not in overrides}, **overrides}.items():
        cfg.set(key, value)
    cfg.validate()
    if saved is not None:
        diff = config_differences(cfg, saved, may_change)
        if diff:
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            free = ", ".join(k if "." in k else f"{k}.*" for k in may_change)
            rule = f" (only {free} may change)" if free else ""
            raise ConfigError(f"the model config differs from {saved_name} in {', '.join(diff[:4])}{more}{rule}")
    return cfg
