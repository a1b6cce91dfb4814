"""Benchmarks (treeffn.bench): the shared timer, environment record and JSON line schema, and that the baselines are
the shipped layers. Tiny sizes; no assertion on any measured time (the machine may be busy)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math

import pytest
import torch
from torch import nn

from treeffn.bench import balance, common, generate, layer, train_ffn
from treeffn.cli import BENCHES
from treeffn.layers import DenseMLP, MoE, TreeFFN

# the smallest run of each benchmark (every implementation and baseline still timed)
TINY = {
    "layer": ["--configs", "1x2", "--batches", "3", "--repeats", "3", "--budget-s", "0.05", "--d-model", "16",
              "--skip-fff", "--llc-mb", "1"],
    "train-ffn": ["--d-model", "16", "--configs", "2x2", "--tokens", "16", "--dtypes", "fp32", "--repeats", "1",
                  "--warmup", "0"],
    "generate": ["--preset", "debug", "--batches", "1", "--prompt", "4", "--new", "3", "--repeats", "1",
                 "--warmup", "0"],
    "mod": ["--preset", "debug", "--prompt", "4", "--new", "3", "--decode-batch", "1", "--batch", "1",
            "--seq-len", "8", "--warmup", "0", "--repeats", "1", "--router-steps", "1"],
    "balance": ["--d-model", "16", "--configs", "1x2", "--tokens", "16", "--repeats", "1"],
    "sparse-mlp": ["--d-model", "16", "--hidden", "32", "--active", "0.5", "--repeats", "3", "--budget-s", "0.05",
                   "--llc-mb", "1", "--paths", "kernel,masked"],
}


def json_line(out: str) -> dict:
    """The one JSON object a benchmark prints: exactly one stdout line is JSON, and it is the last one."""
    lines = out.strip().splitlines()
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append((i, json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the JSON line"))))
        except json.JSONDecodeError:
            continue
    assert [i for i, _ in parsed] == [len(lines) - 1], "expected one JSON line, the last line of stdout"
    return parsed[0][1]


# ---- every benchmark prints one line of the common schema --------------------------------------------------------
def test_every_benchmark_has_a_smoke_run():
    assert set(TINY) == set(BENCHES), "a benchmark was added to the CLI: give it a tiny run here"


@pytest.mark.parametrize("name", sorted(TINY))
def test_benchmark_prints_one_schema_line(name, capsys):
    from treeffn.cli import main

    threads = torch.get_num_threads()
    assert main(["bench", name, *TINY[name]]) == 0
    rec = json_line(capsys.readouterr().out)
    common.check_record(rec, name)  # raises, naming the departure
    # and independently of check_record: the documented layout
    assert list(rec) == ["bench", "schema", "env", "settings", "results", "summary", "notes"]
    env = rec["env"]
    for key in ("torch", "python", "machine", "cpu_count", "threads", "cpu_model", "cpu_flags", "cpu_capability",
                "cuda", "llc_bytes", "loadavg_start", "loadavg_end"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["threads"] >= 1
    for r in rec["results"]:
        assert list(r) == ["case", "impl", "time_s", "metrics"]
        assert list(r["time_s"]) == ["median", "min", "max", "n", "warmup_as_sample"]
        assert r["time_s"]["n"] >= 1 and 0 < r["time_s"]["min"] <= r["time_s"]["median"] <= r["time_s"]["max"]
    cases = [json.dumps(r["case"], sort_keys=True) + r["impl"] for r in rec["results"]]
    assert len(set(cases)) == len(cases), "two rows with the same case and impl"
    assert torch.get_num_threads() == threads  # no benchmark leaves the caller's thread count changed


# ---- the baselines are the shipped layers ------------------------------------------------------------------------
def _module_name(m) -> str:  # BENCHES names each benchmark's module, or holds the module itself
    return m if isinstance(m, str) else m.__name__


@pytest.mark.parametrize("module", ["treeffn.bench.common", *sorted({_module_name(m) for m, _ in BENCHES.values()})])
def test_benchmarks_define_no_layers(module):
    mod = importlib.import_module(module)
    own = [name for name, cls in inspect.getmembers(mod, inspect.isclass)
           if cls.__module__ == mod.__name__ and issubclass(cls, nn.Module)]
    assert not own, f"{mod.__name__} defines its own layers {own}: benchmark the shipped ones (treeffn.layers)"


def test_layer_baselines_are_the_shipped_layers():
    K, depth, D = 2, 2, 16
    L, N = depth + 1, 2 ** (depth + 1) - 1
    m = layer.build_layers(D, K, depth, ["dense-train", "dense-infer", "moe-top1"])
    assert type(m["tree"]) is TreeFFN and (m["tree"].trees, m["tree"].depth, m["tree"].balance) == (K, depth, "none")
    assert type(m["dense-train"]) is DenseMLP and m["dense-train"].hidden == K * (N + 1)  # power-of-two width
    assert type(m["dense-infer"]) is DenseMLP and m["dense-infer"].hidden == K * L
    moe = m["moe-top1"]
    # the shape the layer benchmark has always measured: 16 experts, top-1, experts of the tree's K·L active units
    assert type(moe) is MoE and (moe.n_experts, moe.top_k, moe.hidden) == (16, 1, K * L)
    assert all(type(e) is DenseMLP and e.activation == "gelu" for e in moe.experts)
    assert not any(x.training for x in m.values())


def test_train_ffn_and_balance_baselines_are_the_shipped_layers():
    m = train_ffn.build_layers(16, 2, 3, "output", with_dense=True)
    assert type(m["tree"]) is TreeFFN and m["tree"].placement == "output" and m["tree"].balance == "none"
    assert type(m["dense"]) is DenseMLP and m["dense"].hidden == 2 * 2 ** 4
    assert "dense" not in train_ffn.build_layers(16, 2, 3, "node", with_dense=False)
    b = balance.build_layers(16, 2, 3)
    assert type(b["dense"]) is DenseMLP and b["dense"].hidden == b["tree-none"].total_units()
    assert (type(b["tree-none"]), b["tree-none"].balance, b["tree-threshold"].balance) == (TreeFFN, "none",
                                                                                             "threshold")
    torch.testing.assert_close(b["tree-none"].w_in, b["tree-threshold"].w_in)  # same weights, only routing differs


def test_sparse_mlp_layers_are_the_shipped_ones():
    from treeffn.bench import sparse_mlp
    from treeffn.layers.dense import SwiGLU
    from treeffn.layers.sparse_mlp import SparseSwiGLU

    dense = sparse_mlp.dense_layer("swiglu", 16, 32)
    assert type(dense) is SwiGLU
    s = sparse_mlp.sparse_layer(dense, "swiglu", "teal", 0.5, torch.randn(256, 16))
    assert type(s) is SparseSwiGLU and torch.equal(s.w2.weight, dense.w2.weight) and float(s.threshold_mid) > 0


def test_generate_twins_are_shipped_models():
    dense, tree = generate.make_twins("debug", {})
    assert all(type(f) is DenseMLP for f in dense.ffn_modules())
    assert all(type(f) is TreeFFN for f in tree.ffn_modules())
    t = tree.cfg.tree
    assert dense.cfg.ffn.hidden == t.trees * (2 ** (t.depth + 1) - 1)  # the tree's training width


def test_odd_width_is_a_user_error():
    from treeffn.errors import ConfigError

    with pytest.raises(ConfigError, match="d-model"):
        common.dense_mlp(15, 8)


# ---- the timer ---------------------------------------------------------------------------------------------------
def test_measure_counts_warmup_and_repeats():
    calls = []
    t = common.measure(lambda: calls.append(1), warmup=2, repeats=4)
    assert len(calls) == 6 and t.n == 4 and not t.warmup_as_sample
    assert t.min <= t.median <= t.max


def test_measure_cycles_the_input_pool_and_keeps_returned_parts():
    seen = []

    def fn(x):
        seen.append(x)
        return 0.5  # the seconds of a part the function timed itself

    t = common.measure(fn, inputs=["a", "b", "c"], warmup=1, repeats=4)
    assert seen == ["a", "a", "b", "c", "a"]  # warm-up from the start of the pool, timed calls from the start again
    assert t.parts == [0.5] * 4 and t.part_median == 0.5


def test_measure_interleaves_a_dict():
    order = []
    t = common.measure({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, repeats=2)
    assert order == ["a", "b"] * 3 and set(t) == {"a", "b"} and t["a"].n == t["b"].n == 2


def test_measure_budget_and_minimum_repeats():
    # a zero budget stops after the minimum number of timed calls
    assert common.measure(lambda: None, warmup=0, repeats=50, min_repeats=3, budget_s=0.0).n == 3
    # repeats below the minimum are raised to it
    assert common.measure(lambda: None, warmup=0, repeats=1, min_repeats=3).n == 3
    # a minimum time keeps timing past the repeats, at most 100x
    assert common.measure(lambda: None, warmup=0, repeats=2, min_time_s=1e9).n == 200


def test_measure_slow_warmup_is_the_sample():
    calls = []
    t = common.measure(lambda: calls.append(1) or 0.25, warmup=1, repeats=5, budget_s=0.0, slow_sample=True)
    assert len(calls) == 1 and t.n == 1 and t.warmup_as_sample and t.parts == [0.25]
    assert t.to_dict()["warmup_as_sample"] is True


def test_measure_before_hook_runs_untimed_before_every_call():
    log = []
    t = common.measure(lambda x: log.append(("call", x)), inputs=["a", "b"], warmup=1, repeats=3,
                       before=lambda x: log.append(("before", x)))
    assert log == [("before", "a"), ("call", "a"), ("before", "a"), ("call", "a"), ("before", "b"), ("call", "b"),
                   ("before", "a"), ("call", "a")]
    assert t.n == 3


def test_measure_does_not_time_the_before_hook(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def advance(dt):
        clock[0] += dt

    t = common.measure(lambda: advance(0.25), warmup=0, repeats=3, before=lambda: advance(1.0))
    assert t.samples == [0.25] * 3


def test_measure_warmup_cutoff():
    calls = []
    common.measure(lambda: calls.append(1), warmup=3, warmup_cutoff_s=0.0, repeats=1)
    assert len(calls) == 2  # one warm-up call (slower than the cutoff), one timed call


# ---- environment and schema --------------------------------------------------------------------------------------
def test_cpu_info_parses_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx avx2 avx512f\n\n"
                   "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu\n")
    assert common.cpu_info(str(x86)) == {"cpu_model": "Some CPU", "cpu_flags": ["sse4_2", "avx", "avx2", "avx512f"]}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16\n\n")
    assert common.cpu_info(str(arm)) == {"cpu_model": None, "cpu_flags": ["asimd", "sve", "bf16"]}
    assert common.cpu_info(str(tmp_path / "missing")) == {"cpu_model": None, "cpu_flags": None}


def _fake_cache(root, cpu, index, level, kind, size, shared):
    d = root / f"cpu{cpu}" / "cache" / f"index{index}"
    d.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
        (d / name).write_text(f"{value}\n")


def test_last_level_cache_from_sysfs_and_lscpu(tmp_path, monkeypatch):
    # two CPUs per L3 of 16 MiB, two L3s: 32 MiB of last-level cache; L1 instruction caches do not count
    for cpu in range(4):
        _fake_cache(tmp_path, cpu, 0, 1, "Data", "48K", str(cpu))
        _fake_cache(tmp_path, cpu, 1, 1, "Instruction", "32K", str(cpu))
        _fake_cache(tmp_path, cpu, 3, 3, "Unified", "16384K", "0-1" if cpu < 2 else "2-3")
    (tmp_path / "cpufreq").mkdir()
    assert common.last_level_cache(str(tmp_path)) == 32 << 20
    # no sysfs: lscpu -B, whose sizes are totals over the instances
    lscpu = ("L1d cache:   98304 (2 instances)\nL1i cache:   65536 (2 instances)\nL2 cache:    2097152 (2 instances)\n"
             "L3 cache:    33554432 (1 instance)\n")
    monkeypatch.setattr(common.subprocess, "run", lambda *a, **k: argparse.Namespace(stdout=lscpu))
    assert common.last_level_cache(str(tmp_path / "missing")) == 32 << 20

    def no_lscpu(*a, **k):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(common.subprocess, "run", no_lscpu)
    assert common.last_level_cache(str(tmp_path / "missing")) is None


def test_parse_choices():
    parse = common.parse_choices(("warm", "cold"))
    assert parse("cold, warm,cold") == ["cold", "warm"]
    for bad in ("hot", "", "warm,hot"):
        with pytest.raises(argparse.ArgumentTypeError, match="subset of warm, cold"):
            parse(bad)


def test_layer_cold_copies_fill_twice_the_last_level_cache():
    mib = 1 << 20
    assert layer.cold_copies(25 * mib, 32 * mib) == 3  # a 4,096-unit dense layer at d_model 768
    assert layer.cold_copies(1000, 32 * mib) == layer.MAX_COPIES  # a tiny layer: as many as allowed
    assert layer.cold_copies(200 * mib, 32 * mib) == 2  # never fewer than two: one is timed, the next warms the code
    assert layer.cold_copies(25 * mib, 32 * mib, override=5) == 5


def test_layer_cold_protocol():
    """Cold call i runs on copy i mod C; before it, untimed: the eviction read, then the same call on the next copy
    with the same input (the code and the input come back into cache, this copy's weights do not). Warm calls all run
    on the first copy."""
    log = []
    calls = [lambda x, c=c: log.append((c, x)) for c in range(3)]
    inputs = ["a", "b"]
    args = argparse.Namespace(repeats=4, budget_s=math.inf)
    read = []
    evict = layer.Evict(4096)
    evict.buf = argparse.Namespace(sum=lambda: read.append(1))
    t = layer.time_calls(calls, inputs, "cold", evict, args)
    # warm-up calls 0, 1, 2, then timed calls 0 .. 3; each preceded by the next copy's call on its input
    expected = []
    for i in (0, 1, 2, 0, 1, 2, 3):
        expected += [((i + 1) % 3, inputs[i % 2]), (i % 3, inputs[i % 2])]
    assert log == expected and len(read) == 7 and t.n == 4
    log.clear()
    layer.time_calls(calls, inputs, "warm", None, args)
    assert {c for c, _ in log} == {0} and [x for _, x in log] == ["a", "b", "a", "a", "b", "a", "b"]


def test_layer_rejects_bad_cache_options(capsys):
    for bad in (["--cache", "hot"], ["--paths", "graph"], ["--cold-copies", "1"], ["--llc-mb", "-1"]):
        with pytest.raises(SystemExit):
            layer.build_parser().parse_args(bad)
    assert "subset of warm, cold" in capsys.readouterr().err


def test_environment_record():
    env = common.environment()
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu_count"] >= 1 and env["machine"] and env["python"]
    assert env["cuda"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    json.dumps(env, allow_nan=False)


def test_print_json_writes_strict_json_and_check_record_rejects_departures(capsys):
    t = common.Timing([0.002, 0.001, 0.003])
    rec = common.print_json("x", common.environment(), {"shape": (1, 2)},
                            [common.row({"batch": 1}, "dense", t, ratio=float("nan"))])
    line = json_line(capsys.readouterr().out)
    assert line == rec and line["results"][0]["metrics"]["ratio"] is None and line["settings"]["shape"] == [1, 2]
    assert line["results"][0]["time_s"] == {"median": 0.002, "min": 0.001, "max": 0.003, "n": 3,
                                            "warmup_as_sample": False}
    common.check_record(line, "x")
    with pytest.raises(ValueError, match="expected 'layer'"):
        common.check_record(line, "layer")
    bad = json.loads(json.dumps(line))
    del bad["settings"]
    with pytest.raises(ValueError, match="top-level keys"):
        common.check_record(bad)
    bad = json.loads(json.dumps(line))
    bad["results"][0]["us"] = 1.0
    with pytest.raises(ValueError, match=r"results\[0\] keys"):
        common.check_record(bad)
    bad = json.loads(json.dumps(line))
    bad["results"][0]["metrics"]["ratio"] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        common.check_record(bad)


def test_tree_weight_bytes_read_counts_the_visited_nodes():
    t = common.tree_ffn(16, 3, 4)
    K, L, N, W, D = 3, 5, 31, 1, 16
    assert t.weight_bytes_read(1) == pytest.approx(K * L * 2 * W * D * 4)  # one token: its path's rows
    assert t.weight_bytes_read(10 ** 6) == pytest.approx(K * N * 2 * W * D * 4)  # every node, once
    assert t.weight_bytes_read(1) < t.weight_bytes_read(4) < t.weight_bytes_read(64)


def test_generate_decode_bytes_and_shares():
    dense, tree = generate.make_twins("debug", {})
    for b in (1, 8):
        assert generate.decode_bytes(tree, b, 8, 8) < generate.decode_bytes(dense, b, 8, 8)
    # the KV cache grows with the batch and the context, alike in both models
    kv = generate.decode_bytes(dense, 2, 8, 8) - generate.decode_bytes(dense, 1, 8, 8)
    assert kv == pytest.approx(generate.decode_bytes(tree, 2, 8, 8) - generate.decode_bytes(tree, 1, 8, 8)
                               - (tree.ffn_modules()[0].weight_bytes_read(2)
                                  - tree.ffn_modules()[0].weight_bytes_read(1)) * len(tree.blocks))
    shares = generate.decode_shares(tree, 2, 4, 6)
    assert sum(shares[c] for c in generate.COMPONENTS) == pytest.approx(1.0, abs=1e-6)
    assert all(shares[c] >= 0 for c in generate.COMPONENTS) and shares["ms_per_step"] > 0


@pytest.mark.parametrize("name,extra,says", [("generate", ["--no-shares"], "decoding GEMM small"),
                                             ("layer", [], "baselines' GEMM small")])
def test_small_gemm_is_recorded_and_switched_back(name, extra, says, capsys):
    """``--gemm small`` runs the dense layers through the small-batch GEMM (the setting is in the JSON line and the
    header) and leaves the process's setting as it found it."""
    from treeffn.cli import main
    from treeffn.kernels.small_linear import small_gemm_on

    assert not small_gemm_on()
    assert main(["bench", name, *TINY[name], *extra, "--gemm", "small"]) == 0
    out = capsys.readouterr().out
    assert json_line(out)["settings"]["gemm"] == "small" and says in out
    assert not small_gemm_on()


def test_generate_paired_ratio_follows_each_round():
    """Each round's dense/tree decoding time ratio, median over rounds: a machine that slows down between rounds
    (every call of round i f_i times slower) leaves it exact; a round without decoding time gives None."""
    slow = [1.0, 1.5, 3.0, 1.2, 2.2]
    def timing(seconds):
        return common.Timing([seconds * f for f in slow])

    t = {"dense/prefill": timing(0.5), "dense/generate": timing(2.5), "tree/prefill": timing(0.4),
         "tree/generate": timing(1.4)}
    assert generate.paired_ratio(t) == pytest.approx(2.0)
    t["tree/generate"] = timing(0.4)  # no decoding time left
    assert generate.paired_ratio(t) is None
