import pytest

from treeffn.config import Config, get_config, parse_overrides, public_keys
from treeffn.errors import ConfigError
from treeffn.model import build_model

ISSUE_KEYS = ("model.d_model model.n_layer model.n_head model.n_kv_head model.seq_len model.vocab_size ffn.kind "
              "ffn.hidden tree.trees tree.depth tree.node_width tree.activation tree.placement moe.experts moe.top_k "
              "train.lr train.batch_size train.max_steps train.seed mod.every mod.capacity mod.causal mod.aux_weight").split()


def test_public_dotted_names_exist():
    keys = set(public_keys())
    missing = [k for k in ISSUE_KEYS if k not in keys]
    assert not missing, f"documented config keys missing: {missing}"


def test_overrides_are_typed():
    cfg = get_config("debug", {"tree.depth": "3", "train.lr": "1e-3", "model.tie_embeddings": "false",
                               "ffn.kind": "tree"})
    assert cfg.tree.depth == 3 and cfg.train.lr == 1e-3 and cfg.model.tie_embeddings is False


@pytest.mark.parametrize("key", ["tree.bogus", "nosection.x", "model", "train.lr.x"])
def test_unknown_key_is_named(key):
    with pytest.raises(ConfigError, match="unknown config key"):
        get_config("debug", {key: 1})


@pytest.mark.parametrize("overrides, words", [
    ({"model.d_model": 65}, "divisible"),
    ({"model.n_kv_head": 3}, "n_kv_head"),
    ({"tree.depth": -1}, "tree.depth"),
    ({"ffn.kind": "tree", "tree.depth": 40}, "tree"),
    ({"moe.top_k": 9}, "moe.top_k"),
    ({"ffn.kind": "nope"}, "ffn.kind"),
    ({"tree.depth": "seven"}, "tree.depth"),
    ({"mod.capacity": 0}, "mod.capacity"),
])
def test_impossible_values_rejected(overrides, words):
    with pytest.raises(ConfigError, match=words):
        get_config("debug", overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_config("huge")


def test_override_syntax():
    assert parse_overrides(["a.b=1", "c.d = x"]) == {"a.b": "1", "c.d": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["tree.depth"])


def test_json_round_trip():
    cfg = get_config("tiny", {"ffn.kind": "moe"})
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("preset, lo, hi", [("gpt-125m", 100e6, 170e6), ("opt-1.3b", 1.1e9, 1.6e9)])
def test_paper_scale_presets_on_meta(preset, lo, hi):
    for kind in ("dense", "tree"):
        m = build_model(preset, {"ffn.kind": kind}, device="meta")
        n = m.num_params()
        assert lo < n < hi, f"{preset}/{kind}: {n / 1e6:.0f}M parameters"
        f = m.flops_per_token()
        assert f["ffn"] > 0 and f["total"] > f["ffn"]
    tree = build_model(preset, {"ffn.kind": "tree"}, device="meta")
    assert tree.ffn_units()["fraction"] < 0.05, "the paper-scale tree presets must activate < 5 % of units"
