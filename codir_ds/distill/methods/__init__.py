"""Distillation methods, one module each, registered by name.

``build_method(cfg.method, stage)`` gives the run's method; its specs say what the recipe
builds (teacher, layer pairs, contrast heads, bank, mixup inputs, a second model) and its ``loss`` turns typed
student / teacher outputs into the loss terms. Every module of this package is imported here, so a
new method is one new file (see docs/adding_a_method.md).
"""
import importlib
import pkgutil

from codir_ds.distill.methods.base import (BankSpec, Consistency, ContrastSpec, LayerFeatures,  # noqa: F401
                                           LayerSpec, LossInputs, Method, MixSpec, PretrainingConfig,
                                           SecondModelSpec, StudentOutput, TeacherOutput, TeacherSpec,
                                           option)
from codir_ds.distill.methods.registry import (build_method, get_method, method_config_class, read_by,  # noqa: F401
                                               method_names, option_groups, register_method, validate_options)

# The paper's methods first, in this order (the order of names in messages, docs and comparison tables),
# then any other module of the package, alphabetically.
_ORDER = ("ce", "mlm", "kd", "codir", "pkd", "tinybert", "distilbert", "cr_ild", "ctcd")
_SUPPORT = {"base", "registry", "layers"}
for _name in _ORDER + tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                                   if m.name not in _ORDER and m.name not in _SUPPORT)):
    importlib.import_module(f"{__name__}.{_name}")
