"""Head-only fine-tuning: the pretrained body is frozen, the task head trains.

Its adapter is the head alone: a file of dense tensors (``speft_bench.adapters``).
"""

from speft_bench.adapters import FILE, apply_dense, checked_dense, dense_tensors, numel_of, read_adapter, write_adapter
from speft_bench.methods import METHODS
from speft_bench.methods.base import Method, MethodContext, Prepared, freeze_all_but
from speft_bench.models import head_parameters

ADAPTER_FORMAT = "speft-bench-head/1"


@METHODS.register("head")
class Head(Method):
    def prepare(self, model, ctx: MethodContext) -> Prepared:
        freeze_all_but(model, head_parameters(model))

        def save(run_dir):
            dense = dense_tensors(model, None)
            write_adapter(run_dir / FILE, {}, {"model": ctx.typed["model"].name}, ADAPTER_FORMAT, dense)
            return {"path": FILE, "format": ADAPTER_FORMAT, "numel": {"dense": numel_of(dense)}}

        return Prepared(model, save=save)

    @classmethod
    def load(cls, model, run_dir, typed):
        path = run_dir / FILE
        _, _, dense = read_adapter(path, ADAPTER_FORMAT, "head-only")
        apply_dense(checked_dense(path, model, dense))
        return model
