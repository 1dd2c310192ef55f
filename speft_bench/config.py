"""The config before anything loads: the schemas registered for Hydra, and a composed config validated.

Above the schemas, the methods and the tasks.  :func:`register_schemas` runs before Hydra composes
(the YAML options pull their schemas from the ConfigStore); :func:`validate` runs on the composed
config, first without torch (every group typed, ranges, the schemas' cross-group rules), then the
rules that need code registries (``Method.check``, ``Kind.check``), which import torch.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from speft_bench import PROJECT_ROOT
from speft_bench.errors import ConfigError, check
from speft_bench.schemas import MASKING_DEFAULTS, SCHEMAS

PACKAGE = Path(__file__).resolve().parent


def schema_modules() -> list[str]:
    """The modules that register a method's or a metric's schema: every ``config.py`` in a subpackage
    (``speft_bench.methods.speft.config``, ``speft_bench.salience.config``, ...), found on disk so that no
    torch-importing module is walked."""
    return sorted("speft_bench." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
                  for path in PACKAGE.glob("*/**/config.py"))


def register_schemas() -> None:
    """Store every schema under ``schema/<group>/<name>`` and the ``speft_root`` resolver."""
    for module in schema_modules():
        importlib.import_module(module)  # its @register_schema calls fill speft_bench.schemas.SCHEMAS
    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)
    if not OmegaConf.has_resolver("speft_root"):
        OmegaConf.register_new_resolver("speft_root", lambda: str(PROJECT_ROOT))


class Compositions:
    """The configs of many commands, one Hydra composition per set of group choices.

    Hydra composes the defaults tree from a command's group choices, then applies its value overrides to
    the result (``ConfigLoaderImpl._load_configuration_impl``).  A composition costs ~0.2 s; commands that
    differ only in values (a seed, a learning rate) share one here.  ``compose_groups`` composes the group
    choices: by default a plain run's config, as ``hydra.compose`` returns it (a sweep's jobs pass the
    config loader's ``load_sweep_config`` on their master).  Use inside ``initialize_config_dir``."""

    def __init__(self, compose_groups: Callable[[list[str]], DictConfig] | None = None):
        self.parser = OverridesParser.create()
        self.compose_groups = compose_groups or run_config
        self.composed: dict[tuple[str, ...], DictConfig] = {}

    def compose(self, overrides: list[str]) -> DictConfig:
        """What composing ``overrides`` at once returns."""
        parsed = self.parser.parse_overrides(overrides)
        values = [o for o in parsed if is_value(o)]
        groups = tuple(o.input_line for o in parsed if o not in values)
        if groups not in self.composed:
            self.composed[groups] = self.compose_groups(list(groups))
        cfg = copy.deepcopy(self.composed[groups])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        return cfg


def run_config(overrides: list[str]) -> DictConfig:
    """``hydra.compose("config", overrides)``: a plain run's config, without the ``hydra`` node."""
    cfg = GlobalHydra.instance().hydra.compose_config("config", overrides, run_mode=RunMode.RUN, from_shell=False,
                                                      with_log_configuration=False)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def is_value(override: Override) -> bool:
    """A config value, not a group choice, as ``defaults_list.Overrides`` tells them apart (Hydra initialized)."""
    repository = GlobalHydra.instance().hydra.config_loader.repository
    return isinstance(override.value(), dict) or not repository.group_exists(override.key_or_group)


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check ranges (dataclass ``__post_init__``) and cross-group rules; return the typed groups.

    Runs before any model or data loads.  Raises :class:`ConfigError` naming the knob.  Up to the code
    registries' rules, torch is not imported: a bad value fails in python + Hydra start-up time.
    """
    check(isinstance(cfg.get("resume"), bool), f"resume must be true or false, got {cfg.get('resume')!r}")
    typed = {}
    for group in SCHEMAS:
        try:
            typed[group] = OmegaConf.to_object(cfg[group])
        except ConfigError:
            raise
        except Exception as err:  # OmegaConf's own message names the key
            raise ConfigError(f"{group}: {err}") from None
    typed["method"].check_groups(typed)
    typed["metric"].check_groups(typed)
    _check_masking_is_used(typed)

    from speft_bench.methods import METHODS  # the code registries import torch-heavy code: after the rules above
    from speft_bench.tasks import TASK_KINDS

    method_name = typed["method"].name
    check(method_name in METHODS,
          f"method.name={method_name!r} is not known; allowed values: {', '.join(METHODS.names())}")
    METHODS[method_name].check(typed)
    TASK_KINDS[typed["task"].kind.name].check(typed)  # cross-group rules of the task kind (model family, ...)
    return typed


def _check_masking_is_used(typed: dict[str, Any]) -> None:
    """A method that does not read masking (``MethodSchema.uses_masking``) takes only its default.

    Otherwise the knob would be silently ignored yet enter the record and the config hash.
    """
    method, masking = typed["method"], typed["masking"]
    if method.uses_masking:
        return
    changed = [f"masking.{knob}={getattr(masking, knob)!r}" for knob, default in MASKING_DEFAULTS.items()
               if getattr(masking, knob) != default]  # the name agrees with scope and dynamic (MaskingSchema)
    users = sorted(name for name, schema in SCHEMAS["method"].items() if schema.uses_masking)
    check(not changed, f"method={method.name} does not use masking, so {', '.join(changed)} would be ignored; "
                       f"only method={'|'.join(users)} reads it: leave masking at its default "
                       f"(masking=static_{MASKING_DEFAULTS['scope']}: "
                       f"{', '.join(f'masking.{k}={v!r}' for k, v in MASKING_DEFAULTS.items())})")
