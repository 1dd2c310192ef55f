"""Dense fine-tuning: every parameter trains."""

from speft_bench.methods import METHODS, Method, MethodContext, Prepared


@METHODS.register("full")
class Full(Method):
    def prepare(self, model, ctx: MethodContext) -> Prepared:
        model.requires_grad_(True)
        return Prepared(model)
