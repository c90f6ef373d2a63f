"""The method registry: methods by name, and the ``method.*`` config section built from their configs."""
from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Optional

from codir_ds.distill.methods.base import PretrainingConfig
from codir_ds.errors import CodirError

_METHODS: dict = {}


def register_method(cls):
    """Class decorator: make ``cls`` (a :class:`~codir_ds.distill.methods.base.Method`) available by ``cls.name``.

    ``cls`` must set its own one-line ``summary`` (an inherited one would describe its base class): the
    launchers' --help lists every method with it, and the config reference describes ``method.name`` by it.
    """
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    summary = cls.__dict__.get("summary")
    if not isinstance(summary, str) or not summary.strip() or "\n" in summary:
        raise ValueError(f"method {cls.name!r} ({cls.__qualname__}) sets no summary of its own: give the class a "
                         f"one-line summary = \"...\" (--help lists the method with it)")
    _METHODS[cls.name] = cls
    return cls


def method_names(stage: Optional[str] = None) -> tuple[str, ...]:
    """Registered names (in registration order), those that support ``stage`` when given."""
    return tuple(n for n, c in _METHODS.items() if stage is None or stage in c.stages)


def get_method(name: str):
    """The method class registered as ``name``."""
    if name not in _METHODS:
        raise CodirError(f"unknown method {name!r}: choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def build_method(method_cfg, stage: str):
    """The method named by ``method_cfg.name``, for ``stage`` (finetune / pretrain), refused where unsupported."""
    cls = get_method(method_cfg.name)
    if stage not in cls.stages:
        other = "launchers/pretrain.py for pre-training" if stage == "finetune" else \
            "launchers/finetune.py for finetuning"
        what = "finetuning" if stage == "finetune" else "pre-training"
        raise CodirError(f"method.name={method_cfg.name} is not a {what} objective: use one of "
                         f"{', '.join(method_names(stage))} here, or {other}")
    return cls(method_cfg, stage)


def read_by(name: str, overrides: list[str], stage: Optional[str] = None) -> list[str]:
    """``key=value`` overrides without the ``method.*`` keys that method ``name`` does not read (in ``stage``):
    one list of settings applied to several methods, each getting the keys it reads (config.load_config
    refuses the others)."""
    reads = get_method(name).reads(stage)
    return [kv for kv in overrides
            if not kv.startswith("method.") or kv.split("=", 1)[0].split(".", 1)[1] in reads]


def option_groups() -> list[type]:
    """Every option dataclass of the registered methods (bases first, each once), then the shared ones."""
    groups: list[type] = []
    for cls in _METHODS.values():
        if cls.config is None:
            continue
        for klass in reversed(cls.config.__mro__):
            if dataclasses.is_dataclass(klass) and klass not in groups:
                groups.append(klass)
    groups.append(PretrainingConfig)
    return groups


def _owners(group: type) -> tuple[str, ...]:
    if group is PretrainingConfig:
        return method_names("pretrain")
    return tuple(n for n, c in _METHODS.items() if c.config is not None and issubclass(c.config, group))


class _Unset:
    """The default of every option in the ``method`` section: replaced, when the section is built, by the chosen
    method's own default (:func:`method_config_class`)."""

    def __repr__(self) -> str:
        return "<the chosen method's default>"


UNSET = _Unset()


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def method_defaults(name: str) -> dict:
    """``{option: default}`` of method ``name``'s own option dataclass (its overrides of inherited defaults
    included); ``{}`` for an unknown name or a method without options."""
    cls = _METHODS.get(name)
    if cls is None or cls.config is None:
        return {}
    return {f.name: _field_default(f) for f in dataclasses.fields(cls.config)}


def method_config_class() -> type:
    """The ``method`` section's dataclass: ``name`` plus every registered method's options.

    A key belongs to the option dataclass that declares it; its metadata carries its help text, the methods
    that read it (``"methods"``), its default (``"default"``, the declaring dataclass's) and the methods whose
    own option dataclass re-declares it with another default (``"method_defaults"``). Keys keep their flat names
    (``method.alpha_kd``). An option not given takes the chosen method's own default when the section is built
    (``MethodConfig(name="x")`` has x's defaults); a subclass option dataclass may re-declare an inherited option
    to give it another default, and any other second declaration of a name is refused.
    """
    fields = [("name", str, dataclasses.field(default="codir", metadata={
        "help": "the method: " + ", ".join(f"{n} ({c.summary})" for n, c in _METHODS.items()),
        "methods": method_names()}))]
    declared: dict = {"name": None}
    overrides: dict = {}
    for group in option_groups():
        hints = typing.get_type_hints(group)
        own = [f for f in dataclasses.fields(group) if f.name in group.__dict__.get("__annotations__", {})]
        for f in own:
            if f.name in declared:
                first = declared[f.name]
                if first is None or not issubclass(group, first) or typing.get_type_hints(first)[f.name] != hints[f.name]:
                    raise ValueError(f"method option {f.name!r} is declared twice ({group.__name__}); a subclass of "
                                     f"its option dataclass may re-declare it, with the same type, to change its "
                                     f"default")
                overrides.setdefault(f.name, set()).update(
                    n for n, c in _METHODS.items() if c.config is not None and issubclass(c.config, group))
                continue
            declared[f.name] = group
            metadata = {**f.metadata, "methods": _owners(group), "default": _field_default(f)}
            fields.append((f.name, hints[f.name], dataclasses.field(default=UNSET, metadata=metadata)))
    fields = [(n, t, _with_method_defaults(n, fl, overrides.get(n, ()))) for n, t, fl in fields]
    cls = dataclasses.make_dataclass("MethodConfig", fields, namespace={"__post_init__": _fill_defaults})
    cls.__module__ = "codir_ds.config"  # where it is published (pickling, repr)
    cls.__doc__ = "The ``method`` section: the method's name and every method's options (see docs/methods/)."
    return cls


def _with_method_defaults(name: str, f: dataclasses.Field, methods) -> dataclasses.Field:
    """Option ``name``'s field ``f`` with ``metadata["method_defaults"]``: the methods among ``methods`` whose own
    default differs from the declaring dataclass's."""
    if not methods:
        return f
    base = f.metadata["default"]
    differ = {m: d[name] for m in sorted(methods) if (d := method_defaults(m)).get(name, base) != base}
    return dataclasses.field(default=f.default, metadata={**f.metadata, "method_defaults": differ})


def _fill_defaults(self) -> None:
    """Every option not given: the chosen method's own default, else the declaring dataclass's."""
    own = method_defaults(self.name)
    for f in dataclasses.fields(self):
        if getattr(self, f.name) is UNSET:
            setattr(self, f.name, own[f.name] if f.name in own else copy.deepcopy(f.metadata["default"]))


def validate_options(m) -> None:
    """Every option group's value checks (all keys, whatever the chosen method), then nothing else."""
    for group in option_groups():
        check = group.__dict__.get("check")
        if check is not None:
            check.__func__(m) if isinstance(check, staticmethod) else check(m)
