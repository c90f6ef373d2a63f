"""Experiment config: YAML + --set overrides, validation messages, round trip."""

import dataclasses

import pytest

from codir_ds.config import (DataConfig, ExperimentConfig, LoggingConfig, MethodConfig, ModelConfig,
                             TrainingConfig, load_config, save_config, validate)
from codir_ds.errors import CodirError
from conftest import REPO

TEACHER = ["model.teacher=all-MiniLM-L6-v2"]


def _err(path=None, overrides=None) -> str:
    with pytest.raises(CodirError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg


def _yaml(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ----------------------------------------------------------------------------- defaults and YAML

def test_defaults_need_a_teacher_for_codir():
    msg = _err()
    assert "method.name=codir" in msg and "model.teacher" in msg


def test_defaults_with_teacher():
    cfg = load_config(None, TEACHER)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.teacher == "all-MiniLM-L6-v2"
    assert cfg.method == MethodConfig()
    assert cfg.training == TrainingConfig()
    assert cfg.data == DataConfig()
    assert cfg.logging == LoggingConfig()


def test_yaml_values_are_read_and_typed(tmp_path):
    path = _yaml(tmp_path, """
name: exp1
model:
  teacher: /some/teacher
  student_layers: 3
data:
  task: trec6
  max_length: 64
method:
  name: codir
  alpha_kd: 1          # int widened to float
  kd_t2_scale: false
  teacher_layers: [2, 4, 6]
training:
  lr: 1e-4             # YAML 1.1 reads this as a string
  epochs: 2
  adam_betas: [0.8, 0.99]
logging:
  tensorboard: false
""")
    cfg = load_config(path)
    assert cfg.name == "exp1"
    assert cfg.model.teacher == "/some/teacher" and cfg.model.student_layers == 3
    assert cfg.data.task == "trec6" and cfg.data.max_length == 64
    assert cfg.method.name == "codir"
    assert cfg.method.alpha_kd == 1.0 and isinstance(cfg.method.alpha_kd, float)
    assert cfg.method.kd_t2_scale is False
    assert cfg.method.teacher_layers == [2, 4, 6]
    assert cfg.training.lr == pytest.approx(1e-4) and isinstance(cfg.training.lr, float)
    assert cfg.training.epochs == 2.0 and isinstance(cfg.training.epochs, float)
    assert cfg.training.adam_betas == [0.8, 0.99]
    assert cfg.logging.tensorboard is False
    # untouched keys keep their defaults
    assert cfg.method.crd_temperature == 0.07 and cfg.training.seed == 42


def test_empty_yaml_file_gives_defaults(tmp_path):
    cfg = load_config(_yaml(tmp_path, ""), TEACHER)
    assert cfg.method.name == "codir" and cfg.training.lr == 2e-5


# ----------------------------------------------------------------------------- overrides

def test_overrides_nested_numbers_lists_null_booleans():
    cfg = load_config(None, TEACHER + [
        "training.lr=1e-4",
        "training.max_steps=7",
        "training.epochs=0.5",
        "method.teacher_layers=[1,2]",
        "method.student_layers=all",
        "model.student_init_layers=null",
        "model.student_intermediate=~",
        "method.kd_t2_scale=false",
        "logging.progress_bar=False",
        "logging.tensorboard=true",
        "training.adam_betas=[0.5, 0.75]",
        "name=my run",
    ])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.training.max_steps == 7 and isinstance(cfg.training.max_steps, int)
    assert cfg.training.epochs == 0.5
    assert cfg.method.teacher_layers == [1, 2]
    assert cfg.method.student_layers == "all"
    assert cfg.model.student_init_layers is None
    assert cfg.model.student_intermediate is None
    assert cfg.method.kd_t2_scale is False
    assert cfg.logging.progress_bar is False and cfg.logging.tensorboard is True
    assert cfg.training.adam_betas == [0.5, 0.75]
    assert cfg.name == "my run"


def test_override_value_may_contain_equals_sign():
    cfg = load_config(None, TEACHER + ["name=a=b"])
    assert cfg.name == "a=b"


def test_overrides_win_over_yaml_and_add_sections(tmp_path):
    path = _yaml(tmp_path, "model:\n  teacher: /t\ntraining:\n  lr: 0.001\n  seed: 1\n")
    cfg = load_config(path, ["training.lr=3e-5", "method.num_negatives=500", "training.lr=5e-5"])
    assert cfg.training.lr == pytest.approx(5e-5)  # the last --set wins
    assert cfg.training.seed == 1                   # YAML value kept
    assert cfg.method.num_negatives == 500
    assert cfg.model.teacher == "/t"


def test_override_into_a_null_yaml_section(tmp_path):
    path = _yaml(tmp_path, "model:\n  teacher: /t\nmethod:\n")
    cfg = load_config(path, ["method.pooling=cls"])
    assert cfg.method.pooling == "cls"


@pytest.mark.parametrize("item", ["training.lr", "=5"])
def test_override_without_key_value(item):
    msg = _err(None, TEACHER + [item])
    assert "key=value" in msg


def test_override_through_a_scalar_is_not_a_section(tmp_path):
    path = _yaml(tmp_path, "name: x\nmodel:\n  teacher: /t\n")
    msg = _err(path, ["name.sub=1"])
    assert "'name' is not a section" in msg


# ----------------------------------------------------------------------------- unknown keys

def test_unknown_key_suggests_closest():
    msg = _err(None, TEACHER + ["training.lrr=1e-4"])
    assert "training.lrr" in msg
    assert "'training.lr'" in msg


def test_unknown_key_in_yaml_suggests_closest(tmp_path):
    path = _yaml(tmp_path, "model:\n  teacher: /t\nmethod:\n  alpha_kdd: 0.5\n")
    msg = _err(path)
    assert "method.alpha_kdd" in msg and "'method.alpha_kd'" in msg


def test_misspelt_section_suggests_section():
    msg = _err(None, TEACHER + ["trainng.lr=1e-4"])
    assert "'trainng'" in msg and "'training'" in msg


def test_unknown_section_lists_valid_sections():
    msg = _err(None, TEACHER + ["zzz.q=1"])
    assert "'zzz'" in msg
    for section in ("model", "data", "method", "training", "logging"):
        assert section in msg


# ----------------------------------------------------------------------------- wrong types

@pytest.mark.parametrize("item, key, expected", [
    ("training.max_steps=abc", "training.max_steps", "integer"),
    ("training.max_steps=1.5", "training.max_steps", "integer"),
    ("training.seed=true", "training.seed", "integer"),       # bool is not an int here
    ("training.lr=fast", "training.lr", "number"),
    ("method.alpha_kd=[1]", "method.alpha_kd", "number"),
    ("logging.tensorboard=3", "logging.tensorboard", "true or false"),
    ("data.task=5", "data.task", "string"),
    ("training.adam_betas=0.9", "training.adam_betas", "list"),
    ("method.teacher_layers=3", "method.teacher_layers", "list"),
    ("model.student_init=[1]", "model.student_init", "null"),
])
def test_wrong_type_names_expected_type(item, key, expected):
    msg = _err(None, TEACHER + [item])
    assert f"'{key}'" in msg and expected in msg


def test_section_must_be_mapping(tmp_path):
    msg = _err(_yaml(tmp_path, "training: 5\n"))
    assert "'training'" in msg and "mapping" in msg


def test_top_level_must_be_mapping(tmp_path):
    msg = _err(_yaml(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg


def test_wrong_list_item_type_names_item_type():
    msg = _err(None, TEACHER + ["model.student_init_layers=[a]"])
    assert "'model.student_init_layers'" in msg and "int" in msg


# ----------------------------------------------------------------------------- bad values

def test_bad_method_name_lists_allowed():
    msg = _err(None, TEACHER + ["method.name=crd"])
    assert "'method.name'" in msg and "ce, mlm, kd, codir" in msg and "'crd'" in msg


def test_bad_pooling_lists_allowed():
    msg = _err(None, TEACHER + ["method.pooling=max"])
    assert "'method.pooling'" in msg and "mean, cls" in msg and "'max'" in msg


def test_bad_fp16_fallback_lists_allowed():
    msg = _err(None, TEACHER + ["training.fp16_fallback=fp8"])
    assert "bf16, fp32" in msg


@pytest.mark.parametrize("item, key", [
    ("method.crd_temperature=0", "method.crd_temperature"),
    ("method.num_negatives=-1", "method.num_negatives"),
    ("method.alpha_crd=-0.1", "method.alpha_crd"),
    ("method.bank_momentum=1.0", "method.bank_momentum"),
    ("data.validation_fraction=0", "data.validation_fraction"),
    ("training.lr=0", "training.lr"),
    ("training.adam_betas=[0.9]", "training.adam_betas"),
    ("method.teacher_layers=[]", "method.teacher_layers"),
    ("method.teacher_layers=first", "method.teacher_layers"),
])
def test_out_of_range_values(item, key):
    msg = _err(None, TEACHER + [item])
    assert f"'{key}'" in msg


def test_nan_learning_rate_refused():
    _err(None, TEACHER + ["training.lr=nan"])


def test_alpha_zero_is_allowed():
    cfg = load_config(None, TEACHER + ["method.alpha_crd=0", "method.alpha_kd=0"])
    assert cfg.method.alpha_crd == 0.0 and cfg.method.alpha_kd == 0.0


def test_hidden_not_divisible_by_heads():
    msg = _err(None, TEACHER + ["model.student_hidden=30", "model.student_heads=4"])
    assert "30" in msg and "4" in msg


def test_epochs_and_max_steps_both_zero():
    msg = _err(None, TEACHER + ["training.epochs=0"])
    assert "training.epochs" in msg and "training.max_steps" in msg
    cfg = load_config(None, TEACHER + ["training.epochs=0", "training.max_steps=10"])
    assert cfg.training.max_steps == 10


# ----------------------------------------------------------------------------- files and data

def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _err(str(missing))
    assert str(missing) in msg and "does not exist" in msg


def test_invalid_yaml(tmp_path):
    path = _yaml(tmp_path, "model:\n  teacher: [unclosed\ntraining:\n  lr: 1\n")
    msg = _err(path)
    assert path in msg and "not valid YAML" in msg


def test_yaml_tab_indentation_is_invalid(tmp_path):
    path = _yaml(tmp_path, "model:\n\tteacher: x\n")
    msg = _err(path)
    assert "not valid YAML" in msg


def test_train_file_without_task_files():
    msg = _err(None, TEACHER + ["data.train_file=train.csv"])
    assert "data.train_file" in msg and "data.task=files" in msg


def test_task_files_without_train_file():
    msg = _err(None, TEACHER + ["data.task=files"])
    assert "data.train_file" in msg


def test_task_files_with_train_file():
    cfg = load_config(None, TEACHER + ["data.task=files", "data.train_file=train.csv",
                                       "data.validation_file=dev.jsonl", "data.text_pair_column=b"])
    assert cfg.data.train_file == "train.csv" and cfg.data.text_pair_column == "b"


@pytest.mark.parametrize("method", ["kd", "codir"])
def test_kd_and_codir_need_teacher(method):
    msg = _err(None, [f"method.name={method}", "model.tokenizer=/tok"])
    assert f"method.name={method}" in msg and "model.teacher" in msg


def test_ce_without_teacher_needs_a_tokenizer_source():
    msg = _err(None, ["method.name=ce"])
    assert "tokenizer" in msg
    cfg = load_config(None, ["method.name=ce", "model.student_init=all-MiniLM-L6-v2"])
    assert cfg.model.teacher is None and cfg.method.name == "ce"


def test_validate_on_dataclass_directly():
    cfg = ExperimentConfig(model=ModelConfig(teacher="/t"))
    validate(cfg)  # defaults + teacher are valid
    bad = dataclasses.replace(cfg, method=MethodConfig(pooling="max"))
    with pytest.raises(CodirError, match="mean, cls"):
        validate(bad)


# ----------------------------------------------------------------------------- round trip

def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, [
        "name=round trip", "model.teacher=all-MiniLM-L6-v2", "model.student_init_layers=[0,2,4]",
        "model.student_init=all-MiniLM-L6-v2", "model.teacher_sha256=abc",
        "data.task=files", "data.train_file=t.tsv", "data.text_pair_column=s2",
        "method.teacher_layers=[2,4]", "method.pooling=cls", "method.kd_t2_scale=false",
        "training.lr=1e-5", "training.adam_betas=[0.9,0.999]", "training.train_batch_size=16",
        "training.fp16_fallback=fp32", "logging.tensorboard=false",
    ])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_round_trip_of_defaults(tmp_path):
    cfg = load_config(None, TEACHER)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(str(path)) == cfg


# ----------------------------------------------------------------------------- each method's own options

def test_a_key_of_another_method_is_one_error_naming_its_method(tmp_path):
    with pytest.raises(CodirError, match=r"^method\.alpha_crd is an option of codir, not of method\.name=kd "
                                         r"\(which reads alpha_kd, kd_t2_scale, kd_temperature, mlm_probability\): "
                                         r"remove it \(--set\), or set method\.name=codir$"):
        load_config(None, TEACHER + ["method.name=kd", "method.alpha_crd=0.2"])
    with pytest.raises(CodirError, match=r"method\.layer_map is an option of pkd, tinybert, distilbert, cr_ild, not "
                                         r"of method\.name=codir .*, or set method\.name=pkd$"):
        load_config(None, TEACHER + ["method.layer_map=[[1, 2]]"])
    # a YAML that sets a key its own method does not read names the file
    path = _yaml(tmp_path, "method:\n  name: ce\n  alpha_kd: 0.5\n")
    with pytest.raises(CodirError, match=rf"method\.alpha_kd is an option of .*remove it from {path}"):
        load_config(path)


def test_switching_the_method_on_the_command_line_drops_the_yamls_other_keys(tmp_path):
    path = _yaml(tmp_path, "method:\n  name: codir\n  alpha_kd: 0.3\n  alpha_crd: 0.5\n  num_negatives: 7\n")
    cfg = load_config(path, TEACHER + ["method.name=kd"])
    assert cfg.method.name == "kd" and cfg.method.alpha_kd == 0.3   # kd reads alpha_kd: kept
    assert set(cfg.to_dict()["method"]) == {"name", "alpha_kd", "kd_temperature", "kd_t2_scale", "mlm_probability"}
    # ... but a key of another method given on the same command line is still refused
    with pytest.raises(CodirError, match=r"method\.num_negatives is an option of codir"):
        load_config(path, TEACHER + ["method.name=kd", "method.num_negatives=9"])


def test_an_option_the_launchers_stage_ignores_is_refused():
    with pytest.raises(CodirError, match=r"^method\.pretrain_negatives is read in pre-training only, and this is "
                                         r"finetuning \(method\.name=codir\): remove it \(--set\)$"):
        load_config(None, TEACHER + ["method.pretrain_negatives=bank"], stage="finetune")
    with pytest.raises(CodirError, match=r"method\.mlm_probability is read in pre-training only"):
        load_config(None, TEACHER + ["method.mlm_probability=0.2"], stage="finetune")
    with pytest.raises(CodirError, match=r"method\.finetune_negatives is read in finetuning only"):
        load_config(None, TEACHER + ["method.finetune_negatives=anchor", "method.alpha_kd=0"], stage="pretrain")
    # without a stage (a YAML checked on its own) both are accepted
    assert load_config(None, TEACHER + ["method.pretrain_negatives=bank"]).method.pretrain_negatives == "bank"


def test_every_shipped_yaml_loads_with_its_own_and_each_other_method():
    """The documented commands switch method.name on the command line (e.g. --set method.name=kd on the codir
    YAML): the YAML's keys of the old method are dropped, never an error."""
    from codir_ds.distill.methods import get_method, method_names
    for yaml_path in sorted((REPO / "configs").glob("*.yaml")):
        stage = "pretrain" if yaml_path.name.startswith("pre_") else "finetune"
        for name in method_names(stage):
            extra = ["model.teacher=/some/teacher", "model.tokenizer=/some/tok"]
            if name == "ctcd" and stage == "pretrain":
                extra.append("method.ctcd_one_way=false")
            try:
                cfg = load_config(str(yaml_path), [f"method.name={name}", *extra, "method.alpha_kd=0"]
                                  if "alpha_kd" in get_method(name).reads() else [f"method.name={name}", *extra],
                                  stage=stage)
            except CodirError as e:
                assert "is an option of" not in str(e) and "only, and this is" not in str(e), (yaml_path, name, e)
                continue
            assert set(cfg.to_dict()["method"]) <= get_method(name).reads(), (yaml_path, name)


def test_resume_accepts_a_run_that_saved_every_methods_options(tmp_path):
    """Runs written before each method kept its own options saved the whole method section: resuming them
    compares only the options the method reads."""
    import yaml
    from codir_ds.engine.rundir import check_run_dir
    cfg = load_config(None, TEACHER + ["method.name=kd", "method.alpha_kd=0.4"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert "alpha_crd" in yaml.safe_load((tmp_path / "config.yaml").read_text())["method"]
    try:
        check_run_dir(tmp_path, cfg.to_dict(), resume=True, overwrite=False)
    except CodirError as e:
        assert "differs" not in str(e), e
    other = load_config(None, TEACHER + ["method.name=kd", "method.alpha_kd=0.5"])
    with pytest.raises(CodirError, match=r"differs from the saved run's in method\.alpha_kd"):
        check_run_dir(tmp_path, other.to_dict(), resume=True, overwrite=False)


def test_the_section_a_stage_never_reads_is_refused(tmp_path):
    """Finetuning trains on data.*, pre-training on corpus.*: the other section's keys are an error, not ignored."""
    with pytest.raises(CodirError, match=r"^corpus\.block_size is read in pre-training only, and this is finetuning: "
                                         r"remove the corpus keys \(--set\), or run launchers/pretrain\.py$"):
        load_config(None, TEACHER + ["corpus.block_size=64"], stage="finetune")
    path = _yaml(tmp_path, "data:\n  max_length: 64\n")
    with pytest.raises(CodirError, match=rf"^data\.max_length is read in finetuning only, and this is pre-training: "
                                         rf"remove the data keys from {path}, or run launchers/finetune\.py$"):
        load_config(path, ["method.alpha_kd=0"], stage="pretrain")
    # without a stage (evaluation, benches building configs for either recipe) both sections are accepted
    assert load_config(None, TEACHER + ["corpus.block_size=64"]).corpus.block_size == 64
