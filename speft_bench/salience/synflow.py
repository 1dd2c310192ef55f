"""SynFlow |θ| ⊙ ∂R/∂|θ| with R = 1ᵀ(Π_l |θ⁽ˡ⁾|)1 (Tanaka et al. 2020): data-free synaptic flow.

R is the output of a *linearised* copy of the model: every parameter replaced by its absolute value,
normalisations and activation functions bypassed (identity), an all-ones input, summed outputs.  On
a chain of linears this is exactly the path-product formula.  Attention stays as it is: under |θ|
its logits are huge, the softmax saturates, and Q/K get (near-)zero scores — an honest property of
SynFlow on transformers, and one reason it ranks poorly in the SPEFT paper.

Overflow guard: the copy runs in float64 (the product over L layers grows like ‖θ‖^L: ~1e50 on
MiniLM-L6), and the scores are divided by their global maximum before they are cast back to the
weights' dtype — one scale for all layers, so global and local rankings are unchanged.  A model deep
enough to overflow float64 stops the run as non-finite.  The model itself is never modified.
"""

import copy

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from speft_bench.models import is_norm
from speft_bench.salience import SALIENCE_METRICS, Scores
from speft_bench.schemas import ConfigError

SEQ_LEN = 16  # all-ones input tokens for sequence models: > 1 so positions (and so Q, K) matter

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus)
OTHER_NORMS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)  # beyond LayerNorm/RMSNorm (models.is_norm)


def _bypassed(module: nn.Module) -> bool:
    """Activation functions and normalisations, including transformers' own classes."""
    return (isinstance(module, ACTIVATIONS + OTHER_NORMS) or is_norm(module)
            or type(module).__module__ == "transformers.activations")


def linearise(model: nn.Module) -> nn.Module:
    """A float64 copy with |θ| everywhere and identities for activations and normalisations."""
    copied = copy.deepcopy(model).double().eval()
    for name, module in list(copied.named_modules()):
        if name and _bypassed(module):
            copied.set_submodule(name, nn.Identity())
    with torch.no_grad():
        for p in copied.parameters():
            p.abs_()
    return copied


def ones_input(model: nn.Module) -> tuple[tuple, dict]:
    """(args, kwargs) of an all-ones input: input embeddings for transformers, features otherwise."""
    if hasattr(model, "get_input_embeddings"):
        hidden = model.get_input_embeddings().embedding_dim
        return (), {"inputs_embeds": torch.ones(1, SEQ_LEN, hidden, dtype=torch.float64)}
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ConfigError("metric=synflow needs a model with an input embedding or an nn.Linear first layer")
    return (torch.ones(1, first.in_features, dtype=torch.float64),), {}


def _output(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


@SALIENCE_METRICS.register("synflow")
def synflow(model, weights, batches) -> Scores:
    lin = linearise(model)
    path = {id(p): n for n, p in model.named_parameters()}  # the copy keeps the target weights' paths
    params = {name: lin.get_parameter(path[id(w)]) for name, w in weights.items()}
    lin.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    args, kwargs = ones_input(lin)
    # SDPA's math kernel: the fused CPU kernel returns NaN gradients for the huge logits of |θ| chains
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        flow = _output(lin(*args, **kwargs)).sum()
        grads = torch.autograd.grad(flow, [params[n] for n in weights])
    scores = {n: (g * params[n]).detach() for n, g in zip(weights, grads)}
    top = max(float(s.max()) for s in scores.values())
    scale = top if top > 0 and torch.isfinite(torch.tensor(top)) else 1.0  # non-finite: reported by the caller
    return {n: (s / scale).to(weights[n].dtype) for n, s in scores.items()}
