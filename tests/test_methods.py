"""The method registry: names and stages, stage refusals, the ``method`` config section built from the
methods' option dataclasses, each method's specs, CR-ILD's stages, and a method added by a test."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from codir_ds import checks
from codir_ds.config import ExperimentConfig, MethodConfig, ModelConfig, validate
from codir_ds.distill.ild import consistency_weight
from codir_ds.distill.losses import kd_loss
from codir_ds.distill.methods import (BankSpec, ContrastSpec, LayerSpec, LossInputs, Method, MixSpec,
                                      PretrainingConfig, SecondModelSpec, StudentOutput, TeacherOutput, TeacherSpec,
                                      build_method, get_method, method_config_class, method_names, option,
                                      register_method, validate_options)
from codir_ds.distill.methods import registry
from codir_ds.distill.methods.kd import KDConfig, KDMethod
from codir_ds.errors import CodirError

# The shipped methods, in registration order, and their stages: none may go missing or change stage. A method
# added under codir_ds/distill/methods/ joins the registry after them; the generic checks below iterate over
# the registry (REGISTERED), so a new method is checked too and needs no edit here.
ALL = ("ce", "mlm", "kd", "codir", "pkd", "tinybert", "distilbert", "cr_ild", "ctcd")
FINETUNE = ("ce", "kd", "codir", "pkd", "tinybert", "distilbert", "cr_ild", "ctcd")
PRETRAIN = ("mlm", "kd", "codir", "tinybert", "distilbert", "ctcd")
REGISTERED = method_names()


def _shipped(names) -> tuple:
    """``names`` without methods added after the shipped ones (order kept)."""
    return tuple(n for n in names if n in ALL)


def _build(name: str, stage: str, **options):
    return build_method(MethodConfig(name=name, **options), stage)


# ----------------------------------------------------------------------------- names and stages

def test_every_method_registered_once_under_its_name():
    assert method_names()[:len(ALL)] == ALL  # the shipped ones first, in their order
    assert len(set(method_names())) == len(method_names())
    for name in method_names():
        cls = get_method(name)
        assert issubclass(cls, Method) and cls.name == name and cls.summary
        assert set(cls.stages) <= {"finetune", "pretrain"} and cls.stages
    with pytest.raises(ValueError, match="registered twice"):
        register_method(get_method("kd"))
    assert method_names() == REGISTERED   # the refused registration changed nothing


def test_stage_sets():
    assert _shipped(method_names("finetune")) == FINETUNE
    assert _shipped(method_names("pretrain")) == PRETRAIN
    assert set(FINETUNE) | set(PRETRAIN) == set(ALL)
    for name in ALL:
        for stage in ("finetune", "pretrain"):
            assert (stage in get_method(name).stages) == (name in (FINETUNE if stage == "finetune" else PRETRAIN))


@pytest.mark.parametrize("name", REGISTERED)
def test_build_method_accepts_its_stages_and_refuses_the_other(name):
    for stage in ("finetune", "pretrain"):
        allowed = method_names(stage)
        if name in allowed:
            method = _build(name, stage)
            assert method.name == name and method.stage == stage and method.pretraining == (stage == "pretrain")
            continue
        with pytest.raises(CodirError) as err:
            _build(name, stage)
        msg = str(err.value)
        assert "\n" not in msg and f"method.name={name}" in msg
        assert f"use one of {', '.join(allowed)} here" in msg
        other = "launchers/finetune.py" if stage == "pretrain" else "launchers/pretrain.py"
        assert other in msg


def test_unknown_method_is_refused_with_the_registered_names():
    with pytest.raises(CodirError) as err:
        get_method("distill_everything")
    msg = str(err.value)
    assert "\n" not in msg and "distill_everything" in msg and ", ".join(ALL) in msg
    with pytest.raises(ValueError, match="stage"):
        get_method("kd")(MethodConfig(name="kd"), "inference")


# ----------------------------------------------------------------------------- the method config section

def _option_fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls.config)} if cls.config is not None else {}


def test_method_config_is_the_union_of_the_method_configs():
    fields = {f.name: f for f in dataclasses.fields(MethodConfig)}
    union = {"name"} | {f.name for f in dataclasses.fields(PretrainingConfig)}
    for name in REGISTERED:
        union |= set(_option_fields(get_method(name)))
    assert set(fields) == union
    assert fields["name"].default == "codir" and fields["name"].metadata["methods"] == REGISTERED
    for key, f in fields.items():
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), key
    for key, f in fields.items():
        if key == "name":
            continue
        if key in {p.name for p in dataclasses.fields(PretrainingConfig)}:
            owners = method_names("pretrain")
        else:
            owners = tuple(n for n in REGISTERED if key in _option_fields(get_method(n)))
        assert f.metadata["methods"] == owners, key
    # defaults are the declaring dataclass's
    for name in REGISTERED:
        for key, f in _option_fields(get_method(name)).items():
            assert getattr(MethodConfig(), key) == getattr(get_method(name).config(), key), (name, key)
    assert MethodConfig().mlm_probability == PretrainingConfig().mlm_probability


def test_owners_of_the_shared_options():
    fields = {f.name: f for f in dataclasses.fields(MethodConfig)}
    def owners(key):  # the shipped methods that read it (a new method may read a shared option too)
        return _shipped(fields[key].metadata["methods"])
    assert owners("alpha_kd") == ("kd", "codir", "pkd", "tinybert", "distilbert", "cr_ild", "ctcd")
    assert owners("alpha_crd") == ("codir",)
    assert owners("layer_map") == ("pkd", "tinybert", "distilbert", "cr_ild")
    assert owners("ild_fraction") == ("cr_ild",)
    assert owners("ctcd_one_way") == ("ctcd",)
    assert owners("mlm_probability") == PRETRAIN


def test_compare_keys_are_the_methods_own_options():
    for name in REGISTERED:
        cls = get_method(name)
        assert set(cls.compare_keys) <= set(cls.option_names()), name


def test_option_checks_run_for_every_key():
    validate_options(MethodConfig())
    for key, value, where in (("kd_temperature", 0.0, "method.kd_temperature"),
                              ("bank_momentum", 1.0, "method.bank_momentum"),
                              ("layer_map", "sideways", "method.layer_map"),
                              ("ild_fraction", 1.5, "method.ild_fraction"),
                              ("alpha_small_to_large", -1.0, "method.alpha_small_to_large"),
                              ("mlm_probability", 1.0, "method.mlm_probability")):
        # whatever the chosen method, every option's value is checked
        with pytest.raises(CodirError, match=where):
            validate_options(MethodConfig(name="ce", **{key: value}))


# ----------------------------------------------------------------------------- what each method needs

T, CACHED = TeacherSpec(), TeacherSpec(cacheable=True)  # the teacher cache is per finetuning example

# (teacher, layers, mixing, second model) of every shipped method with its default options
DEFAULT_SPECS = {
    ("ce", "finetune"): (None, None, None, False),
    ("mlm", "pretrain"): (None, None, None, False),
    ("kd", "finetune"): (CACHED, None, None, False),
    ("kd", "pretrain"): (T, None, None, False),
    ("codir", "finetune"): (CACHED, None, None, False),
    ("codir", "pretrain"): (T, None, None, False),
    ("pkd", "finetune"): (T, LayerSpec("cls"), None, False),
    ("tinybert", "finetune"): (T, LayerSpec("hidden", attention=True), None, False),
    ("tinybert", "pretrain"): (T, LayerSpec("hidden", attention=True), None, False),
    ("distilbert", "finetune"): (T, LayerSpec("hidden"), None, False),
    ("distilbert", "pretrain"): (T, LayerSpec("hidden"), None, False),
    ("cr_ild", "finetune"): (T, LayerSpec("hidden", attention=True, consistency=True), MixSpec(1.0), False),
    ("ctcd", "finetune"): (None, None, None, True),
    ("ctcd", "pretrain"): (None, None, None, True),
}


def _specs(method) -> tuple:
    return method.teacher, method.layers, method.mixing, method.second_model is not None


def test_default_specs_cover_every_shipped_method_and_stage():
    assert set(DEFAULT_SPECS) == {(n, s) for s in ("finetune", "pretrain") for n in _shipped(method_names(s))}


@pytest.mark.parametrize("name,stage", sorted(DEFAULT_SPECS))
def test_specs_with_the_default_config(name, stage):
    assert _specs(_build(name, stage)) == DEFAULT_SPECS[(name, stage)]


def test_specs_follow_the_options():
    # codir: bank, pooled layers and the teacher; its options reach the recipes only through its specs
    codir = _build("codir", "finetune", teacher_layers=[2, 4], pooling="cls", projection_dim=64, bank_momentum=0.3,
                   num_negatives=7, finetune_negatives="anchor", crd_encoder_delay=5)
    assert codir.teacher == CACHED and codir.encoder_delay == 5
    assert codir.contrast == ContrastSpec([2, 4], "all", "cls", 64)
    assert codir.bank == BankSpec(0.3, True, "random", 7, "anchor", "batch", 5)
    for name in ALL:
        method = _build(name, get_method(name).stages[0])
        if method.bank is not None:   # a bank holds the contrast spec's projected features
            assert method.contrast is not None, name
        if name not in ("codir",):
            assert method.contrast is None and method.bank is None and method.encoder_delay == 0, name
    # pre-training with alpha_kd = 0: the teacher's hidden states, not its logits (no MLM head)
    for name in ("kd", "codir", "tinybert", "distilbert"):
        assert _build(name, "pretrain", alpha_kd=0.0).teacher == TeacherSpec(logits=False), name
        assert _build(name, "finetune", alpha_kd=0.0).teacher.logits, name   # finetuning always reads them
    # attention maps only with a weight on them
    assert not _build("tinybert", "finetune", alpha_attention=0.0).layers.attention
    assert not _build("cr_ild", "finetune", alpha_attention=0.0).layers.attention
    # CR-ILD's consistency term (and its EMA copy) only with a weight on it
    cr = _build("cr_ild", "finetune", alpha_consistency=0.0, consistency_ema=0.9)
    assert not cr.layers.consistency and cr.ema_decay == 0.0
    assert _build("cr_ild", "finetune", mixup_alpha=0.4).mixing == MixSpec(0.4, supplementary=True)
    assert _build("cr_ild", "finetune", consistency_ema=0.9).ema_decay == 0.9
    # ctcd: a second model always; the teacher in the one-way variant, its logits when alpha_kd > 0
    assert _build("ctcd", "finetune").second_model is not None and _build("ctcd", "finetune").teacher is None
    one_way = _build("ctcd", "finetune", ctcd_one_way=True)
    assert one_way.teacher == T and one_way.second_model.one_way
    assert _build("ctcd", "pretrain", ctcd_one_way=True, alpha_kd=0.0).teacher == TeacherSpec(logits=False)
    large = _build("ctcd", "finetune", ctcd_large_init=None, ctcd_large_layers=3, ctcd_large_hidden=96,
                   ctcd_large_heads=4).second_model
    assert large == SecondModelSpec(None, {"student_layers": 3, "student_hidden": 96, "student_heads": 4})


def test_cr_ild_stages_switch_at_the_rounded_ild_fraction():
    for fraction in (0.0, 0.3, 0.5, 0.75, 1.0):
        method = _build("cr_ild", "finetune", ild_fraction=fraction, consistency_ramp=0.5, alpha_consistency=2.0)
        for total in (1, 5, 7, 10, 13):
            switch = round(fraction * total)
            stages = [method.stage_at(step, total) for step in range(total)]
            assert stages == ["ild"] * switch + ["kd"] * (total - switch), (fraction, total)
            for step in range(total):
                assert method.consistency_weight(step, total) == consistency_weight(step, switch, 0.5, 2.0)
    method = _build("cr_ild", "finetune")
    assert method.uses_layers("ild") and method.mixes_inputs("ild")
    assert not method.uses_layers("kd") and not method.mixes_inputs("kd")


@pytest.mark.parametrize("name", [n for n in ALL if n != "cr_ild"])
def test_other_methods_have_one_stage(name):
    method = _build(name, get_method(name).stages[0])
    assert {method.stage_at(step, 10) for step in range(10)} == {"train"}
    assert method.consistency_weight(3, 10) == 0.0 and method.ema_decay == 0.0
    assert not method.mixes_inputs("train")
    assert method.uses_layers("train") == (method.layers is not None)


# ----------------------------------------------------------------------------- adding a method

@dataclass
class ScaledKDConfig(KDConfig):
    kd_scale_for_test: float = option(2.0, "test-only: factor applied to the whole KD loss")

    @staticmethod
    def check(m) -> None:
        checks.positive("method.kd_scale_for_test", m.kd_scale_for_test)


NEW = "scaled_kd_for_test"


@pytest.fixture
def new_method():
    """A tiny KD variant registered for the test only, unregistered afterwards."""
    class ScaledKD(KDMethod):
        name = NEW
        config = ScaledKDConfig
        summary = "test-only KD whose loss is scaled"

        def loss(self, student, teacher, batch):
            total, terms = super().loss(student, teacher, batch)
            return self.cfg.kd_scale_for_test * total, terms

    register_method(ScaledKD)
    try:
        yield ScaledKD
    finally:
        registry._METHODS.pop(NEW, None)
    assert NEW not in method_names()


def test_a_registered_method_joins_names_config_and_validation(new_method):
    assert method_names()[-1] == NEW and NEW in method_names("finetune") and NEW in method_names("pretrain")
    assert get_method(NEW) is new_method
    cfg_cls = method_config_class()
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    assert fields["kd_scale_for_test"].metadata["methods"] == (NEW,)
    assert fields["kd_scale_for_test"].metadata["help"].startswith("test-only")
    assert fields["kd_scale_for_test"].metadata["default"] == 2.0 and cfg_cls(name=NEW).kd_scale_for_test == 2.0
    assert NEW in fields["alpha_kd"].metadata["methods"]          # it inherits KDConfig's options
    assert NEW in fields["name"].metadata["methods"] and new_method.summary in fields["name"].metadata["help"]
    assert set(fields) == {f.name for f in dataclasses.fields(MethodConfig)} | {"kd_scale_for_test"}

    # its value check runs with every other method's
    validate_options(cfg_cls(name=NEW))
    with pytest.raises(CodirError, match="method.kd_scale_for_test"):
        validate_options(cfg_cls(name=NEW, kd_scale_for_test=-1.0))
    # the whole-config validation accepts its name and reads its specs (a teacher)
    validate(ExperimentConfig(model=ModelConfig(teacher="x"), method=cfg_cls(name=NEW)))
    with pytest.raises(CodirError, match=f"method.name={NEW} needs a teacher"):
        validate(ExperimentConfig(model=ModelConfig(tokenizer="x"), method=cfg_cls(name=NEW)))

    # built and used like any method
    method = build_method(cfg_cls(name=NEW, kd_scale_for_test=3.0, alpha_kd=0.5), "finetune")
    assert _specs(method) == (T, None, None, False)
    torch.manual_seed(0)
    logits, t_logits, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    total, _ = method.loss(StudentOutput(logits), TeacherOutput(t_logits), LossInputs(labels))
    want = 3.0 * (F.cross_entropy(logits, labels) + 0.5 * 4.0 * kd_loss(logits, t_logits, 2.0))
    torch.testing.assert_close(total, want)


def test_registry_is_back_to_the_packaged_methods():
    # runs after the test above in file order: the fixture unregistered the test method
    assert method_names() == REGISTERED and NEW not in REGISTERED
    assert "kd_scale_for_test" not in {f.name for f in dataclasses.fields(method_config_class())}
    with pytest.raises(CodirError, match="method.name"):
        validate(ExperimentConfig(model=ModelConfig(teacher="x"), method=MethodConfig(name=NEW)))


@dataclass
class HotKDConfig(KDConfig):
    alpha_kd: float = option(1.0, "re-declared: this method's own default")
    kd_temperature: float = option(4.0, "re-declared: this method's own default")


def test_a_method_gives_an_inherited_option_its_own_default():
    """A subclass option dataclass re-declares an inherited key with another default: the key stays one flat
    method.* key, the chosen method's default applies when the key is not given, an explicit value wins, the
    configuration reference lists the difference; a second declaration of an unrelated name is refused."""
    class HotKD(KDMethod):
        name = "hot_kd_for_test"
        config = HotKDConfig
        summary = "test-only KD with its own defaults"

    register_method(HotKD)
    try:
        cfg_cls = method_config_class()
        assert cfg_cls(name="hot_kd_for_test").alpha_kd == 1.0 and cfg_cls(name="kd").alpha_kd == 0.7
        assert cfg_cls(name="hot_kd_for_test").kd_temperature == 4.0 and cfg_cls(name="codir").kd_temperature == 2.0
        assert cfg_cls(name="hot_kd_for_test", alpha_kd=0.2).alpha_kd == 0.2
        field = {f.name: f for f in dataclasses.fields(cfg_cls)}["alpha_kd"]
        assert field.metadata["default"] == 0.7 and field.metadata["method_defaults"] == {"hot_kd_for_test": 1.0}
        assert build_method(cfg_cls(name="hot_kd_for_test"), "finetune").cfg.kd_temperature == 4.0
        from codir_ds.config_reference import _default
        assert _default(field) == "`0.7`; `hot_kd_for_test`: `1.0`"
    finally:
        registry._METHODS.pop("hot_kd_for_test", None)

    @dataclass
    class Clash:
        alpha_kd: float = option(0.1, "an unrelated second declaration")

    class ClashKD(Method):
        name = "clash_for_test"
        config = Clash
        summary = "test-only"
    register_method(ClashKD)
    try:
        with pytest.raises(ValueError, match="'alpha_kd' is declared twice"):
            method_config_class()
    finally:
        registry._METHODS.pop("clash_for_test", None)
