"""Loading models into TransformerLens.

TransformerLens 4 removed ``HookedTransformer``; its maintained equivalent is
``transformer_lens.model_bridge.TransformerBridge``, which wraps the Hugging Face model
and exposes the same hook names, ``run_with_cache``, ``run_with_hooks`` and
``ActivationCache``. With ``compat=True`` we call ``enable_compatibility_mode()``
so numerics match HookedTransformer's (folded layer norms, centred weights).
GGUF files (the embedded models, any local ``.gguf``) are handled in :mod:`eclens.gguf_models`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import EclensError
from .gguf_models import (
    EMBEDDED_MODELS,
    EmbeddedModel,
    cache_root,
    embedded_config,
    embedded_dir,
    embedded_tokenizer_dir,
    ensure_embedded,
    gguf_folder,
)

EMBEDDED = "smollm2-135m"
EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RANDOM_PREFIX = "random:"
_NAMES_HINT = ("use smollm2-135m, gemma3-270m, random:NAME, a Hugging Face name such as "
               "meta-llama/Meta-Llama-3-8B, a local model folder or a .gguf file")

__all__ = ["cache_root", "load_model", "load_tokenizer", "model_info", "manifest_model_entry", "parse_random"]


def embedded_gguf_path() -> Path:
    return EMBEDDED_MODELS[EMBEDDED].gguf()


def _embedded_hf_dir() -> Path:
    return embedded_dir(EMBEDDED_MODELS[EMBEDDED])


def _load_embedded_hf(dtype: torch.dtype, spec: EmbeddedModel | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_embedded(spec or EMBEDDED_MODELS[EMBEDDED])
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def parse_random(name: str) -> tuple[str, int] | None:
    """``random:NAME`` or ``random:NAME@SEED`` → ``(NAME, SEED)`` (seed 0 by default); else ``None``."""
    if not isinstance(name, str) or not name.startswith(RANDOM_PREFIX):
        return None
    base, seed = name[len(RANDOM_PREFIX):], "0"
    if "@" in base:
        base, seed = base.rsplit("@", 1)
    if not base or not seed.isdigit() or base.startswith(RANDOM_PREFIX):
        raise EclensError(f"{name!r}: write random:NAME or random:NAME@SEED (NAME a real model, SEED a whole "
                          "number), e.g. random:smollm2-135m@1")
    return base, int(seed)


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


def _embedded_spec(name: str) -> EmbeddedModel | None:
    """The embedded model ``name`` means: its short name, or its hub name when neither the hub nor
    its local cache has that model."""
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name]
    for spec in EMBEDDED_MODELS.values():
        if name == spec.hf_name and not _hub_config_available(name):
            return spec
    return None


def _config_of(name: str):
    """The transformers config of model ``name`` (for ``random:NAME``), without its weights."""
    from transformers import AutoConfig

    spec = _embedded_spec(name)
    path = Path(name).expanduser()
    if spec is not None:
        cfg = embedded_config(spec)
    elif path.suffix == ".gguf":
        cfg = AutoConfig.from_pretrained(gguf_folder(path))
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise EclensError(f"{path}: not a Hugging Face model folder (no config.json)")
        cfg = AutoConfig.from_pretrained(path)
    elif _is_hub_name(name) and _hub_config_available(name):
        cfg = AutoConfig.from_pretrained(name)
    else:
        raise EclensError(f"random:{name}: unknown model {name!r}; {_NAMES_HINT}")
    cfg.__dict__.pop("quantization_config", None)
    return cfg


def random_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, model_id)``: the architecture of ``name`` with freshly initialised weights
    (the architecture's own ``_init_weights``, after ``torch.manual_seed(seed)``) and ``name``'s
    tokenizer: the chance baseline for anything measured on ``name``."""
    from transformers import AutoModelForCausalLM

    cfg = _config_of(name)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    finally:
        torch.random.set_rng_state(gen_state)  # leave the caller's random stream as it was
    hf.config.architectures = [type(hf).__name__]
    spec = _embedded_spec(name)
    return hf, load_tokenizer(name), spec.hf_name if spec else name


@dataclass
class Resolved:
    hf: Any                      # a transformers model, or None: the bridge loads it from the hub name
    tok: Any
    model_id: str                # the name the bridge boots as
    meta: dict = field(default_factory=dict)   # provenance for the manifest (source, variant, random_init)


def resolve_source(name: str, torch_dtype, qconf=None, device_map=None, max_memory=None) -> Resolved:
    """The transformers model (or None: the bridge loads a hub name itself), tokenizer, boot name and
    provenance of ``name``, as :func:`load_model` resolves it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rnd = parse_random(name)
    if rnd is not None:
        if qconf is not None:
            raise EclensError("random weights are not quantized: drop --load-in-8bit/4bit")
        hf, tok, mid = random_hf_model(rnd[0], rnd[1], torch_dtype)
        spec = _embedded_spec(rnd[0])
        return Resolved(hf, tok, mid, {"source": "random", "random_init": {"of": rnd[0], "seed": rnd[1]},
                                        "variant": spec.variant if spec else None})
    spec = _embedded_spec(name)
    path = Path(name).expanduser()
    if spec is not None:
        if qconf is not None:
            raise EclensError(f"{spec.name} is small: load it without --load-in-8bit/4bit")
        hf, tok = _load_embedded_hf(torch_dtype, spec)
        return Resolved(hf, tok, spec.hf_name, {"source": "embedded", "variant": spec.variant,
                                                 "license": spec.license})
    if path.suffix == ".gguf":
        folder = gguf_folder(path)
        tok = AutoTokenizer.from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        return Resolved(hf, tok, str(path), {"source": "gguf", "cache": folder.name})
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EclensError(f"{path}: not a Hugging Face model folder (no config.json)")
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, quantization_config=qconf, device_map=device_map, max_memory=max_memory
        )
        return Resolved(hf, tok, str(path), {"source": "folder"})
    if _is_hub_name(name):
        if not _hub_config_available(name):
            raise EclensError(f"model {name!r} is not available offline; use smollm2-135m or a local path")
        tok = AutoTokenizer.from_pretrained(name)
        hf = None
        if qconf is not None:
            hf = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, quantization_config=qconf, device_map=device_map or "auto",
                max_memory=max_memory,
            )
        return Resolved(hf, tok, name, {"source": "hub"})
    raise EclensError(f"unknown model {name!r}: {_NAMES_HINT}")


def torch_dtype_of(dtype) -> torch.dtype:
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise EclensError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return torch_dtype


def load_model(
    name: Any = EMBEDDED,
    *,
    tokenizer=None,
    copy_model: bool = True,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    quantize: str | None = None,
    compat: bool = True,
    verify: str = "auto",
):
    """Load ``name`` as a TransformerLens ``TransformerBridge``.

    ``name`` is ``smollm2-135m`` (the embedded model, default), ``gemma3-270m`` (the second embedded
    model, opt-in: ``scripts/setup.sh --gemma``), ``random:NAME[@SEED]`` (``NAME``'s architecture
    and tokenizer with freshly initialised weights), a model name TransformerLens supports (e.g.
    ``meta-llama/Meta-Llama-3-8B``; needs the hub or its local cache), a local Hugging Face folder,
    or a local ``.gguf`` file (dequantized once, cached by content hash).

    ``name`` may also be a model you already built: a ``TransformerBridge``, or a Hugging Face
    causal LM with its ``tokenizer``. Compatibility mode edits weights in place, so by default
    (``copy_model=True``) eclens works on a deep copy and your model is left exactly as it was;
    ``copy_model=False`` processes it in place (no second copy in memory; your object becomes the
    returned bridge's weights). A bridge already in compatibility mode is used as it is.

    ``verify``: ``"auto"`` checks, the first time a model is loaded, the bridge's activations and
    log-probs against the plain transformers model on a few sentences (:mod:`eclens.verify`; small
    local models only; the figures go into the run manifest); ``"never"`` skips it.
    """
    t0 = time.perf_counter()
    torch_dtype = torch_dtype_of(dtype)
    if device_map is None:
        _check_device(device)
    if not isinstance(name, (str, os.PathLike)):
        return _from_user_model(name, tokenizer, copy_model=copy_model, device=device, dtype=torch_dtype,
                                compat=compat, verify=verify, t0=t0)
    name = str(name)
    qconf = _quant_config(quantize, device if device_map is None else "cuda")
    res = resolve_source(name, torch_dtype, qconf, device_map, max_memory)
    bridge = _bridge_from_hf(res, device=device, dtype=torch_dtype, device_map=device_map,
                             max_memory=max_memory, compat=compat, move=device_map is None and qconf is None)
    bridge.eclens_name = name
    bridge.eclens_load_seconds = time.perf_counter() - t0
    if verify == "auto" and qconf is None and device_map is None:
        from .verify import verify_on_first_load

        verify_on_first_load(bridge, lambda: resolve_source(name, torch_dtype, None, None, None).hf)
    release_memory()
    return bridge


def _bridge_from_hf(res: Resolved, *, device, dtype, device_map=None, max_memory=None, compat=True,
                    move=True):
    prepend_bos = tokenizer_prepends_bos(res.tok)
    n_params = None
    if res.hf is not None:
        res.hf.eval()
        # transformers ties shared weights to one Parameter, so this counts a tied unembedding once.
        n_params = sum(p.numel() for p in res.hf.parameters())
        if move:
            res.hf.to(device)
    bridge = _boot(res.model_id, hf_model=res.hf, tokenizer=res.tok, device=device, dtype=dtype,
                   device_map=device_map if res.hf is None else None, max_memory=max_memory)
    bridge.eval()
    if n_params is None and getattr(bridge, "original_model", None) is not None:
        n_params = sum(p.numel() for p in bridge.original_model.parameters())
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True)
    _fix_cfg(bridge, prepend_bos)
    bridge.eclens_meta = dict(res.meta, prepend_bos=prepend_bos)
    bridge.eclens_n_params = n_params
    return bridge


def _from_user_model(m, tokenizer, *, copy_model: bool, device, dtype, compat, verify, t0):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel

    if isinstance(m, TransformerBridge):
        if compat and not getattr(m, "compatibility_mode", False):
            m = copy.deepcopy(m) if copy_model else m
            m.enable_compatibility_mode(disable_warnings=True)
        if not hasattr(m, "eclens_meta"):
            m.eclens_meta = {"source": "user", "prepend_bos": bool(m.cfg.default_prepend_bos)}
        m.eclens_name = getattr(m, "eclens_name", None) or str(getattr(m.cfg, "model_name", "user-model"))
        if getattr(m.tokenizer, "pad_token", None) is None:
            m.tokenizer.pad_token = m.tokenizer.eos_token
        m.eclens_load_seconds = time.perf_counter() - t0
        return m
    if not isinstance(m, PreTrainedModel):
        raise EclensError(f"load_model: expected a model name, a TransformerBridge or a transformers model, "
                          f"not {type(m).__name__}")
    if tokenizer is None:
        raise EclensError("load_model(hf_model): pass its tokenizer too (tokenizer=...)")
    original = m
    hf = copy.deepcopy(m) if copy_model else m
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    hf_name = getattr(hf.config, "_name_or_path", "") or ""
    model_id = next((s.hf_name for s in EMBEDDED_MODELS.values() if s.hf_name == hf_name), hf_name) \
        or type(hf).__name__
    res = Resolved(hf.to(dtype), tokenizer, model_id, {"source": "user"})
    bridge = _bridge_from_hf(res, device=device, dtype=dtype, compat=compat)
    bridge.eclens_name = f"user:{type(original).__name__}"
    bridge.eclens_load_seconds = time.perf_counter() - t0
    if verify == "auto" and copy_model:
        from .verify import verify_on_first_load

        # the user's untouched model is the reference; never move it to another device for the check
        same = next(original.parameters()).device == model_device(bridge)
        verify_on_first_load(bridge, lambda: original if same else None)
    release_memory()
    return bridge


def release_memory() -> None:
    """Hand the heap memory freed while loading back to the operating system.

    Compatibility mode rebuilds every weight (folded, centred, upcast copies of the state dict); the
    copies are freed, but glibc keeps the freed blocks in its heap (a freed large block raises its mmap
    threshold, so the next ones come from the heap), and the process stays ~1.7x the weights' bytes
    resident after loading (smollm2-135m: +420 MB over 621 MB of weights). ``malloc_trim`` returns the
    free pages. A no-op where the C library is not glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_tokenizer(name: str = EMBEDDED):
    """Only the tokenizer of ``name`` (same resolution as :func:`load_model`, no weights loaded).

    For steps that only need to tokenize (generating or importing pairs); pair with
    :func:`tokenizer_prepends_bos` for the BOS setting :func:`load_model` would use.
    """
    from transformers import AutoTokenizer

    name = str(name)
    rnd = parse_random(name)
    if rnd is not None:
        return load_tokenizer(rnd[0])
    spec = _embedded_spec(name)
    path = Path(name).expanduser()
    if spec is not None:
        return AutoTokenizer.from_pretrained(embedded_tokenizer_dir(spec))
    if path.suffix == ".gguf":
        if not path.exists():
            raise EclensError(f"{path}: no such GGUF file")
        cached = gguf_folder(path, create=False)  # converting a large vocabulary from GGUF takes minutes
        if cached is not None:
            return AutoTokenizer.from_pretrained(cached)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "tokenizer.json").exists():
            raise EclensError(f"{path}: not a Hugging Face model folder (no config.json or tokenizer.json)")
        return AutoTokenizer.from_pretrained(path)
    if _is_hub_name(name):
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception:  # noqa: BLE001 - offline and not cached, or no such repo
            raise EclensError(f"tokenizer of {name!r} is not available offline; use smollm2-135m or a local path") \
                from None
    raise EclensError(f"unknown model {name!r}: {_NAMES_HINT}")


def context_length(name: str = EMBEDDED) -> int | None:
    """The context length (``cfg.n_ctx`` of the loaded model) read from the model's config alone, no
    weights; ``None`` where no config can be read. For tokenizer-only steps that reject pairs
    longer than the model's context (``too_long``), as :func:`eclens.pairs.check_with_model` does."""
    from transformers import AutoConfig

    name = str(name)
    rnd = parse_random(name)
    if rnd is not None:
        name = rnd[0]
    spec = _embedded_spec(name)
    path = Path(name).expanduser()
    try:
        if spec is not None:
            cfg = embedded_config(spec)
        elif path.suffix == ".gguf":
            cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        elif path.is_dir():
            cfg = AutoConfig.from_pretrained(path)
        else:
            cfg = AutoConfig.from_pretrained(name)
    except EclensError:
        raise  # e.g. gemma3-270m not installed: say how to install it
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
    # Cached on the model until a weight changes in place (its version counter moves) or is replaced (its
    # storage moves): the load, the command and the step each ask for it, and the strided reads of every tensor
    # cost a tenth of a second for SmolLM2-135M. Not the tensors' ids: state_dict() makes new ones every call.
    state = model.state_dict()
    key = tuple((name, p.data_ptr(), p._version, tuple(p.shape), p.dtype) for name, p in state.items()
                if torch.is_tensor(p))
    cached = getattr(model, "_eclens_weights_hash", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        if not torch.is_tensor(p):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    out = h.hexdigest()[:16]
    try:
        object.__setattr__(model, "_eclens_weights_hash", (key, out))
    except (AttributeError, TypeError):  # a model that takes no attributes: no cache
        pass
    return out


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
        n_params=count_params(model),
    )


def count_params(model) -> int:
    """Parameters as the architecture defines them, a tied unembedding counted once. Compatibility
    mode folds the final norm into the unembedding, which unties it in memory, so the count comes
    from the transformers model before processing (recorded at load) where there is one."""
    n = getattr(model, "eclens_n_params", None)
    if n:
        return int(n)
    seen: set[int] = set()
    total = 0
    for x in model.parameters():
        if x.data_ptr() not in seen:
            seen.add(x.data_ptr())
            total += x.numel()
    return total


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
        "n_params": info.n_params,
        **_provenance(model),
    }


def _provenance(model) -> dict:
    """BOS policy, where the weights came from (embedded, random, ...), base or instruct, and the
    load-time check against transformers (:mod:`eclens.verify`) where one ran or was on record."""
    meta = dict(getattr(model, "eclens_meta", None) or {})
    meta.setdefault("prepend_bos", bool(model.cfg.default_prepend_bos))
    meta = {k: v for k, v in meta.items() if v is not None}
    ver = getattr(model, "eclens_verify", None)
    if ver:
        meta["verify"] = ver
    return meta


def is_random(entry: dict | None) -> bool:
    """Whether a manifest's model entry (:func:`manifest_model_entry`) is a random-weight baseline."""
    return bool((entry or {}).get("random_init"))


def tiny_hf_model(n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 128,
                  vocab_from=None, seed: int = 0, max_positions: int = 512):
    """``(LlamaForCausalLM, tokenizer)``: random weights from a config (no download), with the embedded
    model's tokenizer (``vocab_from``: another tokenizer) so that pairs align the same way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = vocab_from
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir(EMBEDDED_MODELS[EMBEDDED]))
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
    n_params = sum(p.numel() for p in hf.parameters())
    bridge = _boot(EMBEDDED_HF_NAME, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
    bridge.eval()
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True)
    _fix_cfg(bridge, tokenizer_prepends_bos(tok))
    bridge.eclens_name = f"tiny-llama-{n_layers}x{d_model}-seed{seed}"
    bridge.eclens_meta = {"source": "tiny"}
    bridge.eclens_n_params = n_params
    return bridge
