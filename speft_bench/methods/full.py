"""Dense fine-tuning: every parameter trains; the run saves the whole model (``save_pretrained``)."""

from speft_bench.methods import METHODS
from speft_bench.methods.base import Method, MethodContext, Prepared

SAVED = "model"  # a transformers checkpoint folder in the run folder


@METHODS.register("full")
class Full(Method):
    def prepare(self, model, ctx: MethodContext) -> Prepared:
        model.requires_grad_(True)

        def save(run_dir):
            model.save_pretrained(run_dir / SAVED)
            return {"path": SAVED, "format": "transformers",
                    "numel": {"dense": sum(p.numel() for p in model.parameters())}}

        return Prepared(model, save=save)

    @classmethod
    def load(cls, model, run_dir, typed):
        device = next(model.parameters()).device
        return type(model).from_pretrained(run_dir / SAVED, dtype="auto").to(device)  # the trained dtypes
