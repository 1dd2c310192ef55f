"""LoRA, PiSSA and DoRA (one class, three names) and their peft adapter folder."""

import copy

from peft import LoraConfig, PeftModel, TaskType, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from speft_bench.adapters import numel_of
from speft_bench.methods import METHODS
from speft_bench.methods.base import Method, MethodContext, Prepared, freeze_all_but
from speft_bench.methods.lora.config import LoraInit
from speft_bench.models import head_parameters, targets_for

SAVED = "adapter"  # peft's adapter folder in the run folder
PEFT_PREFIX = "base_model.model."  # peft's file keys are relative to a PeftModel


def save_peft_adapter(model, config: LoraConfig, folder) -> dict[str, int]:
    """Write ``model``'s injected adapter and its head (``modules_to_save``) in peft's format; the numel of each."""
    head = head_parameters(model)
    adapter = get_peft_model_state_dict(model, save_embedding_layers=False)  # adapter name stripped, as peft saves
    saved = copy.deepcopy(config)
    saved.base_model_name_or_path = model.config.name_or_path
    saved.task_type = TaskType.SEQ_CLS if head else TaskType.CAUSAL_LM
    saved.modules_to_save = sorted({name.split(".")[0] for name in head}) or None
    folder.mkdir(parents=True, exist_ok=True)
    saved.save_pretrained(folder)
    tensors = {PEFT_PREFIX + name: t.detach().contiguous() for name, t in (adapter | head).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"adapter": numel_of(adapter), "dense": numel_of(head)}


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

        def save(run_dir):
            return {"path": SAVED, "format": "peft", "numel": save_peft_adapter(model, config, run_dir / SAVED)}

        return Prepared(model, info={"target_modules": len(targets)}, save=save)

    @classmethod
    def load(cls, model, run_dir, typed):
        return PeftModel.from_pretrained(model, run_dir / SAVED).base_model.model  # the model, adapters injected
