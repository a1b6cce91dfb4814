"""Hugging Face round trip for every feed-forward kind: export, AutoModelForCausalLM/AutoTokenizer reload, logits
equal treeffn's, generate() equals GPT.generate (cached, uncached, left-padded batches), tokenizer round trip."""

import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")

import treeffn.hf as thf  # noqa: E402
from treeffn import hf_cli  # noqa: E402
from treeffn.checkpoint import load_model, save_checkpoint_dir  # noqa: E402
from treeffn.model import build_model  # noqa: E402


def make_tokenizer(path):
    """A byte-level BPE of 512 tokens with <|endoftext|> (as treeffn trains them), on a few KB of English."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sample = Path(thf.__file__).parent / "assets" / "sample.txt"
    text = sample.read_text(encoding="utf-8")[:40_000] if sample.is_file() else (
        "The sun rises in the east. Plants need water and light to grow. A cat sat on the mat. " * 60)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    tok.save(str(path))
    return path

KINDS = ["dense", "swiglu", "moe", "tree"]
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    torch.manual_seed(0)
    model = build_model("debug", {"ffn.kind": request.param})
    ckpt = save_checkpoint_dir(root / "ckpt", model, extra_files={"tokenizer.json": tokenizer_json})
    out = thf.export_hf(ckpt, root / "hf")
    return request.param, ckpt, out


def test_registered_with_auto_classes():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_cls, model_cls = thf.register()
    assert thf.TreeffnForCausalLM is model_cls
    cfg = AutoConfig.for_model("treeffn")
    assert isinstance(cfg, cfg_cls)
    assert AutoModelForCausalLM.from_config(cfg).__class__ is model_cls


def test_import_registers_with_auto_classes():
    """`import treeffn.hf` alone registers the architecture (no register() call), idempotently: importing it again
    (a reload) and calling register() afterwards keep one working registration."""
    import subprocess
    import sys

    code = (
        "import importlib, sys\n"
        "import treeffn.hf as h\n"
        "assert 'transformers' in sys.modules\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "cfg = AutoConfig.for_model('treeffn')\n"
        "assert type(cfg).__name__ == 'TreeffnConfig', type(cfg)\n"
        "assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == 'TreeffnForCausalLM'\n"
        "importlib.reload(h)\n"
        "c1, m1 = h.register(); c2, m2 = h.register()\n"
        "assert (c1, m1) == (c2, m2)\n"
        "assert type(AutoModelForCausalLM.from_config(AutoConfig.for_model('treeffn'))) is m1\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_round_trip(exported):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, ckpt, out = exported
    assert json.loads((out / "config.json").read_text())["model_type"] == "treeffn"
    assert (out / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(out).treeffn["ffn"]["kind"] == kind

    gpt = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert hf.model.cfg.ffn.kind == kind

    enc = tok(PROMPT, return_tensors="pt")
    ids = enc["input_ids"]
    with torch.no_grad():
        want = gpt(ids).logits
        assert torch.equal(hf(ids, use_cache=False).logits, want)  # treeffn's own forward: bit-identical
        torch.testing.assert_close(hf(**enc).logits, want)  # with mask and cache
        # the labels loss is HF's shifted cross-entropy
        loss = hf(ids, labels=ids, use_cache=False).loss
        ref = torch.nn.functional.cross_entropy(want[0, :-1], ids[0, 1:])
        torch.testing.assert_close(loss, ref)
        # logits_to_keep (what generate passes): the output layer on the last positions only, the same values
        torch.testing.assert_close(hf(ids, use_cache=False, logits_to_keep=2).logits, want[:, -2:])
        torch.testing.assert_close(hf(**enc, logits_to_keep=1).logits, want[:, -1:])
        keep = torch.tensor([0, ids.shape[1] - 1])
        torch.testing.assert_close(hf(ids, use_cache=False, logits_to_keep=keep).logits, want[:, keep])

    greedy = gpt.generate(ids, 8)
    assert torch.equal(hf.generate(**enc, max_new_tokens=8, do_sample=False), greedy)
    assert torch.equal(hf.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=False), greedy)
    assert hf.generate(**enc, max_new_tokens=4, do_sample=True, top_k=10).shape == (1, ids.shape[1] + 4)
    assert hf.generate(**enc, max_new_tokens=4, num_beams=2).shape[1] == ids.shape[1] + 4


def test_left_padded_batch_generation(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, ckpt, out = exported
    if kind not in ("dense", "tree"):
        pytest.skip("padding handling does not depend on the feed-forward kind; two kinds suffice")
    gpt = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = "left"
    texts = ["Once", "The rain fell and the cat sat on the"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].all())
    got = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, text in zip(got, texts):
        single = gpt.generate(torch.tensor([tok(text)["input_ids"]]), 6)
        assert row[-6:].tolist() == single[0, -6:].tolist()


def test_tokenizer_round_trip(exported, tokenizer_json):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, _, out = exported
    tok = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(tokenizer_json))
    text = "Hello, world! Ünïcode and\nnew lines <|endoftext|> after the end."
    ids = tok(text)["input_ids"]
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == raw.token_to_id("<|endoftext|>")
    assert tok.model_max_length == 64


def test_cli_export_checks_logits(exported, tmp_path, capsys):
    kind, ckpt, _ = exported
    if kind != "dense":
        pytest.skip("the CLI wrapper is the same for every kind")
    p = argparse.ArgumentParser()
    hf_cli.add_arguments(p)
    assert hf_cli.run(p.parse_args([str(ckpt), str(tmp_path / "out")])) == 0
    assert "max |logit difference| = 0.00e+00" in capsys.readouterr().out


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    from treeffn.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        thf.export_hf(tmp_path / "missing", tmp_path / "out")


def test_export_of_a_model_on_huge_pages(tmp_path, tokenizer_json, monkeypatch):
    """export-hf loads the checkpoint with load_model, which puts its weights on huge pages: save_pretrained writes
    them (no shared storage refused) and the export's logits equal the checkpoint's."""
    from treeffn import memory

    monkeypatch.setattr(memory, "MIN_BYTES", 0)  # every tensor of the debug model, not only those of 2 MiB or more
    torch.manual_seed(0)
    ckpt = save_checkpoint_dir(tmp_path / "ckpt", build_model("debug", {"ffn.kind": "tree"}),
                               extra_files={"tokenizer.json": tokenizer_json})
    assert memory.on_huge_pages(load_model(ckpt).tok_emb.weight) == memory.huge_pages_available()
    out = thf.export_hf(ckpt, tmp_path / "hf")
    assert thf.check_export(ckpt, out) < 1e-4
