"""No fine-tuning: the loaded model is evaluated as is (the "pretrained" row beside the tuned ones).

Its schema, with the rule that the task uses the model as loaded, is ``config.PretrainedSchema``.
"""

from speft_bench.methods import METHODS
from speft_bench.methods.base import Method, MethodContext, Prepared


@METHODS.register("pretrained")
class Pretrained(Method):
    def prepare(self, model, ctx: MethodContext) -> Prepared:
        model.requires_grad_(False)
        return Prepared(model, info={"note": "no parameter trains; the loaded model is evaluated"})
