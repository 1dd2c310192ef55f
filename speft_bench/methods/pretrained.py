"""No fine-tuning: the loaded model is evaluated as is (the "pretrained" row beside the tuned ones)."""

from speft_bench.methods import METHODS, Method, MethodContext, Prepared
from speft_bench.schemas import ConfigError, TaskKind


@METHODS.register("pretrained")
class Pretrained(Method):
    @classmethod
    def check(cls, cfg, typed) -> None:
        super().check(cfg, typed)
        kind = typed["task"].kind
        if kind is not TaskKind.instruct:  # a GLUE head would be freshly initialised: its score measures nothing
            raise ConfigError(f"method=pretrained needs a task whose model is used as loaded (task.kind=instruct), "
                              f"got task.kind={kind.name!r}; use method=head for a linear probe on GLUE")

    def prepare(self, model, ctx: MethodContext) -> Prepared:
        model.requires_grad_(False)
        return Prepared(model, info={"note": "no parameter trains; the loaded model is evaluated"})
