"""Shared fixtures: the real SmolLM2 tokenizer, a Llama-style tokenizer trained offline, tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_task(directory: Path, train: list[dict], test: list[dict] | None = None, meta: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    if test is not None:
        (directory / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test), encoding="utf-8")
    if meta is not None:
        (directory / "task.yaml").write_text(meta, encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip("../shared/data is not present")
    return DATA


@pytest.fixture(scope="session")
def smol_tokenizer():
    from manyicl.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def build_llama_style_tokenizer():
    """A SentencePiece-style BPE (Metaspace + byte fallback + BOS), the Llama-2/Mistral family, trained here.

    Newlines are kept out of the training text so they are never merged, as in Llama-2 (they become <0x0A>).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for task in ("sst2", "rte", "agnews", "gsm8k"):
        lines = (DATA / task / "train.jsonl").read_text(encoding="utf-8").split("\n")[:400]
        for line in filter(None, lines):
            r = json.loads(line)
            texts.append((r["input"] + " " + r["output"]).replace("\n", " "))
    texts += ["Input: Label: Answer: Output: Summary: Labels:"] * 50
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(texts, trainer)
    state = json.loads(trained.to_str())["model"]
    # Byte-fallback tokens are ordinary vocabulary entries in Llama (<0x0A> for "\n"), not special tokens.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in state["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(scope="session")
def llama_tokenizer(data_dir):
    return build_llama_style_tokenizer()


def tiny_model(vocab_size: int, arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
               kv_heads: int = 2, attention: str = "sdpa", **extra):
    """A random-init causal LM of a real architecture, small enough for CPU tests (grouped-query by default)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096, **extra,
    )
    if arch == "gemma":
        kwargs["head_dim"] = hidden // 4
    config = AutoConfig.for_model(arch, **kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, llama_tokenizer):
    """A saved random-init Llama with the Llama-style tokenizer: a local model path like any user's."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(len(llama_tokenizer)).save_pretrained(path)
    llama_tokenizer.save_pretrained(path)
    return path


def tiny_config(model_dir, data_dir, out, **training):
    """A config dict for a few fast steps over three real tasks."""
    return {
        "model": {"name": str(model_dir)},
        "tasks": {"data_dir": str(data_dir), "meta_train": ["sst2", "rte", "gsm8k"], "held_out": ["agnews"],
                  "max_train_examples": 200},
        "training": {"max_tokens": 256, "max_steps": 8, "save_steps": 2, "lora": {"r": 4, "alpha": 8}, **training},
        "output_dir": str(out),
    }
