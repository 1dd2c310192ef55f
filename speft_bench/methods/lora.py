"""LoRA, PiSSA and DoRA through peft, injected in place on the model's target linears.

PiSSA is LoRA with a principal-singular-vector init, DoRA is LoRA with a learned magnitude:
one module, three registered names, told apart by ``method.init`` and ``method.use_dora``.
"""

from peft import LoraConfig, inject_adapter_in_model

from speft_bench.methods import METHODS, Method, MethodContext, Prepared, freeze_all_but
from speft_bench.models import head_parameters, targets_for
from speft_bench.schemas import LoraInit


@METHODS.register("lora", "pissa", "dora")
class LoRA(Method):
    def prepare(self, model, ctx: MethodContext) -> Prepared:
        spec = ctx.typed["method"]
        targets = list(targets_for(model, ctx.typed["model"], spec.targets))
        config = LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=targets,  # full names: peft matches them exactly
            init_lora_weights="pissa" if spec.init is LoraInit.pissa else True,
            use_dora=spec.use_dora,
        )
        model = inject_adapter_in_model(config, model)
        trainable = {n: p for n, p in model.named_parameters() if "lora_" in n}
        if spec.train_head:
            trainable |= head_parameters(model)
        freeze_all_but(model, trainable)
        return Prepared(model, info={"target_modules": len(targets)})
