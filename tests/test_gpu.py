"""On a CUDA device (``pytest -m gpu``; scripts/gpu_check.sh): bf16 training steps track fp32, the shared-prefix
evaluation equals the naive path, and a throughput line on a random-init ~1B Llama. Skipped without a GPU; CI never
needs one. Nothing here reads ../shared/data or the embedded model (a device machine has neither): the tasks are
the synthetic ones and the tokenizer is trained here on their text.

``MANYICL_GPU_TEST_DEVICE=cpu`` runs the first two on CPU, to check the tests themselves where no GPU is lent.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

DEVICE = os.environ.get("MANYICL_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device")]
TASKS = ("sym_sentiment", "sym_topic", "addition", "reverse_words")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE tokenizer trained on the synthetic tasks' text, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from manyicl.synthetic import make_task

    texts = [f"{e.input} {e.output}" for name in TASKS for e in make_task(name).train[:300]]
    texts += ["Input: Label: Answer: Output:"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    path = tmp_path_factory.mktemp("gpu-tokenizer")
    fast.save_pretrained(path)
    return path


def llama(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, max_position_embeddings=4096))


@pytest.fixture(scope="module")
def small_model_dir(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path_factory.mktemp("gpu-model")
    llama(len(tokenizer), hidden=256, layers=4, heads=8, kv_heads=2, intermediate=512).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_bf16_training_steps_track_fp32(small_model_dir, tmp_path):
    """The same 20 LoRA steps in bf16 autocast and in fp32 (the trainable weights fp32 in both): loss curves within
    3 % on average, as measured on CPU (docs/TRAINING.md)."""
    from manyicl.config import ExperimentConfig
    from manyicl.training import train

    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        config = ExperimentConfig.model_validate({
            "model": {"name": str(small_model_dir)},
            "tasks": {"meta_train": [{"name": n, "synthetic": True} for n in TASKS]},
            "training": {"max_tokens": 512, "max_steps": 20, "save_steps": 100, "precision": precision,
                         "learning_rate": 1e-3, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "output_dir": str(out),
        })
        result = train(config)
        assert result.precision == precision
        losses[precision] = [__import__("json").loads(line)["loss"]
                             for line in (out / "train_log.jsonl").read_text().splitlines()]
    relative = [abs(b - f) / f for f, b in zip(losses["fp32"], losses["bf16"])]
    print(f"bf16 vs fp32 on {DEVICE}: mean relative loss difference {sum(relative) / len(relative):.4f} over 20 steps")
    assert sum(relative) / len(relative) < 0.03 and losses["fp32"][-1] < losses["fp32"][0]


def test_shared_prefix_equals_naive(small_model_dir):
    """One cell per family kind through the shared-prefix backend and the naive one, on the device."""
    from manyicl.evaluation import NaiveBackend, Prompter, SharedPrefixBackend, evaluate_cell
    from manyicl.formatter import Formatter
    from manyicl.models import load_model, load_tokenizer
    from manyicl.synthetic import make_task

    torch.backends.cuda.matmul.allow_tf32 = False  # the comparison is of the paths, not of TF32 rounding
    model = load_model(str(small_model_dir), dtype=torch.float32).to(DEVICE).eval()
    tokenizer = load_tokenizer(str(small_model_dir))
    for name, shots in (("sym_sentiment", 16), ("sym_topic", "max"), ("addition", 8)):
        task = make_task(name)
        prompter = Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), 1024)
        queries = task.test[:8]
        demos = prompter.choose_demonstrations(shots, 0, True, queries)
        # a Prompter per backend: neither reuses the other's calibration
        cached, naive = (evaluate_cell(b, Prompter(task, tokenizer, Formatter.for_task(task, tokenizer), 1024), demos,
                                       queries)
                         for b in (SharedPrefixBackend(model, tokenizer, 256), NaiveBackend(model, tokenizer)))
        assert [p.prediction for p in cached.predictions] == [p.prediction for p in naive.predictions], name
        for a, b in zip(cached.predictions, naive.predictions):
            for scoring in a.scores or {}:
                for label, value in a.scores[scoring].items():
                    assert abs(value - b.scores[scoring][label]) < 1e-3, (name, scoring, label)


@pytest.mark.skipif(DEVICE != "cuda", reason="the ~1B throughput line is for a GPU")
def test_throughput_of_a_1b_llama(tokenizer_dir):
    """A random-init Llama of ~1.1B parameters (TinyLlama's shape) in bf16: LoRA training steps and evaluation
    forwards at 2,048 tokens. A line to read, not a timed assertion."""
    from peft import LoraConfig, get_peft_model

    model = llama(32000, hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632).to(DEVICE, torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (1, 2048), device=DEVICE)

    def timed(step, repeats=5):
        step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    def train_step():
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def forward():
        with torch.no_grad():
            peft(input_ids=ids)

    train_s, forward_s = timed(train_step), timed(forward)
    print(f"{torch.cuda.get_device_name()}: random-init Llama {parameters / 1e9:.2f}B bf16, 2,048 tokens: LoRA "
          f"training step {train_s:.3f} s ({2048 / train_s:,.0f} tokens/s), forward {forward_s:.3f} s "
          f"({2048 / forward_s:,.0f} tokens/s), peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert train_s > 0 and forward_s > 0
