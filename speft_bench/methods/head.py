"""Head-only fine-tuning: the pretrained body is frozen, the task head trains."""

from speft_bench.methods import METHODS, Method, MethodContext, Prepared, freeze_all_but
from speft_bench.models import head_parameters


@METHODS.register("head")
class Head(Method):
    def prepare(self, model, ctx: MethodContext) -> Prepared:
        freeze_all_but(model, head_parameters(model))
        return Prepared(model)
