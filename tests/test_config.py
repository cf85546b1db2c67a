"""Run configuration: YAML loading, type checks, choices and --set overrides."""

import pytest

from sdft.config import Config, ConfigError, load_config


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def expect_config_error(tmp_path, text, overrides=None):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    return str(info.value)


# Loading.


def test_defaults_without_file():
    config = load_config()
    assert isinstance(config, Config)
    assert config.model.name == "embedded"
    assert config.train.epochs == 5.0


def test_paper_generation_defaults():
    generation = load_config().distill.generation
    assert generation.mode == "sample"
    assert generation.temperature == 0.95
    assert generation.top_p == 0.7
    assert generation.top_k == 50
    assert generation.max_new_tokens == 512


def test_paper_train_defaults():
    train = load_config().train
    assert train.method == "lora"
    assert train.lora_r == 8
    assert train.lora_alpha == 16
    assert train.lora_dropout == 0.1
    assert train.lora_targets == ["q_proj", "v_proj"]
    assert train.learning_rate == 1e-4
    assert train.lr_scheduler == "cosine"
    assert train.warmup_ratio == 0.0
    assert train.weight_decay == 0.0
    assert train.max_grad_norm == 1.0
    assert train.batch_size == 2
    assert train.gradient_accumulation == 4
    assert train.max_length == 1024
    assert train.seed == 42


def test_yaml_values_applied(tmp_path):
    text = (
        "model:\n  name: embedded\n  dtype: float32\n"
        "data:\n  train: alpaca\n  limit: 16\n"
        "distill:\n  template: alpaca_distill_using\n  check: none\n"
        "train:\n  template: alpaca\n  epochs: 2\n  lora_targets: [q_proj, k_proj]\n"
        "eval:\n  benchmarks: [advbench]\n  limits: {advbench: 8}\n"
        "output_dir: runs/x\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.model.dtype == "float32"
    assert config.data.train == "alpaca"
    assert config.data.limit == 16
    assert config.distill.template == "alpaca_distill_using"
    assert config.distill.check == "none"
    assert config.train.template == "alpaca"
    assert config.train.lora_targets == ["q_proj", "k_proj"]
    assert config.eval.benchmarks == ["advbench"]
    assert config.eval.limit_for("advbench") == 8
    assert config.output_dir == "runs/x"


def test_empty_file_gives_defaults(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.train.epochs == 5.0


def test_null_section_gives_defaults(tmp_path):
    config = load_config(write(tmp_path, "train:\n"))
    assert config.train.batch_size == 2


def test_int_accepted_for_float(tmp_path):
    config = load_config(write(tmp_path, "train:\n  epochs: 3\n  learning_rate: 1\n"))
    assert config.train.epochs == 3.0
    assert isinstance(config.train.epochs, float)
    assert isinstance(config.train.learning_rate, float)


def test_float_with_exponent_accepted(tmp_path):
    config = load_config(write(tmp_path, "train:\n  learning_rate: 2.0e-5\n"))
    assert config.train.learning_rate == pytest.approx(2e-5)


def test_to_dict_round_trip():
    data = load_config().to_dict()
    assert data["train"]["epochs"] == 5.0
    assert data["distill"]["generation"]["top_k"] == 50


# File errors.


def test_missing_file_named(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "config file not found" in str(info.value)


def test_invalid_yaml_line_column(tmp_path):
    message = expect_config_error(tmp_path, "model:\n  name: embedded\n\tdevice: cpu\n")
    assert "run.yaml" in message
    assert "invalid YAML at line 3, column 1" in message


def test_top_level_list_rejected(tmp_path):
    message = expect_config_error(tmp_path, "- train\n- eval\n")
    assert "expected a mapping of sections at the top level" in message


def test_non_utf8_file_rejected(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"output_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_section_not_mapping_message(tmp_path):
    message = expect_config_error(tmp_path, "train: 3\n")
    assert "expected a mapping, got int" in message


def test_section_not_mapping_key(tmp_path):
    message = expect_config_error(tmp_path, "train: 3\n")
    assert message.startswith("train: ")


# Unknown keys.


def test_unknown_key_suggests_epochs(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  epoch: 3\n")
    assert "train.epoch: unknown key" in message
    assert "did you mean 'epochs'" in message


def test_unknown_key_lists_valid(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  epoch: 3\n")
    assert "valid keys:" in message
    assert "learning_rate" in message


def test_unknown_section_rejected(tmp_path):
    message = expect_config_error(tmp_path, "trian:\n  epochs: 3\n")
    assert "trian: unknown key" in message
    assert "did you mean 'train'" in message


def test_unknown_nested_key(tmp_path):
    message = expect_config_error(tmp_path, "distill:\n  generation:\n    temprature: 0.5\n")
    assert "distill.generation.temprature: unknown key" in message
    assert "did you mean 'temperature'" in message


def test_unknown_column_field(tmp_path):
    message = expect_config_error(tmp_path, "data:\n  columns: {instructions: q}\n")
    assert "data.columns.instructions: unknown field" in message
    assert "did you mean 'instruction'" in message


# Wrong types.


def test_string_for_int_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  batch_size: two\n")
    assert "train.batch_size: expected an integer, got 'two'" in message


def test_bool_for_int_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  batch_size: true\n")
    assert "train.batch_size: expected an integer, got True" in message


def test_float_for_int_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  max_length: 512.5\n")
    assert "train.max_length: expected an integer" in message


def test_string_for_float_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  epochs: many\n")
    assert "train.epochs: expected a number, got 'many'" in message


def test_bool_for_float_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  epochs: true\n")
    assert "train.epochs: expected a number" in message


def test_int_for_bool_rejected(tmp_path):
    message = expect_config_error(tmp_path, "eval:\n  drift: 1\n")
    assert "eval.drift: expected true or false, got 1" in message


def test_number_for_text_kept(tmp_path):
    config = load_config(write(tmp_path, "output_dir: 2024\n"))
    assert config.output_dir == "2024"


def test_list_for_text_rejected(tmp_path):
    message = expect_config_error(tmp_path, "model:\n  name: [a, b]\n")
    assert "model.name: expected text, got ['a', 'b']" in message


def test_scalar_for_list_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  lora_targets: q_proj\n")
    assert "train.lora_targets: expected a list, got 'q_proj'" in message


def test_list_item_type_named(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  lora_targets: [q_proj, {a: 1}]\n")
    assert "train.lora_targets[1]: expected text" in message


# Value checks.


def test_invalid_choice_suggests(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  method: lorra\n")
    assert "train.method: invalid value 'lorra'" in message
    assert "did you mean 'lora'" in message
    assert "valid values: lora, full" in message


def test_invalid_dtype_rejected(tmp_path):
    message = expect_config_error(tmp_path, "model:\n  dtype: fp16\n")
    assert "model.dtype: invalid value 'fp16'" in message


def test_invalid_benchmark_rejected(tmp_path):
    message = expect_config_error(tmp_path, "eval:\n  benchmarks: [gsm8k, gsm9k]\n")
    assert "eval.benchmarks: invalid value 'gsm9k'" in message


def test_invalid_template_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  template: alpaka\n")
    assert "train.template: invalid value 'alpaka'" in message
    assert "did you mean 'alpaca'" in message


def test_distill_template_needs_reference(tmp_path):
    message = expect_config_error(tmp_path, "distill:\n  template: alpaca\n")
    assert "distill.template: 'alpaca' does not show a reference answer" in message


@pytest.mark.parametrize(
    "name", ["gsm8k_distill", "alpaca_distill_using", "alpaca_distill_refer"]
)
def test_distill_rewrite_templates_accepted(tmp_path, name):
    config = load_config(write(tmp_path, f"distill:\n  template: {name}\n"))
    assert config.distill.template == name


def test_invalid_check_rejected(tmp_path):
    message = expect_config_error(tmp_path, "distill:\n  check: maths\n")
    assert "distill.check: invalid value 'maths'" in message
    assert "did you mean 'math'" in message


def test_zero_epochs_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  epochs: 0\n")
    assert "train.epochs: must be > 0" in message


def test_zero_batch_size_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  batch_size: 0\n")
    assert "train.batch_size: must be a positive integer, got 0" in message


def test_warmup_ratio_one_rejected(tmp_path):
    message = expect_config_error(tmp_path, "train:\n  warmup_ratio: 1\n")
    assert "train.warmup_ratio: must be in [0, 1)" in message


def test_zero_temperature_rejected(tmp_path):
    message = expect_config_error(tmp_path, "eval:\n  generation:\n    temperature: 0\n")
    assert "generation.temperature: must be > 0" in message
    assert "mode: greedy" in message


def test_benchmark_limit_positive(tmp_path):
    message = expect_config_error(tmp_path, "eval:\n  limits: {advbench: 0}\n")
    assert "eval.limits.advbench: must be a positive integer, got 0" in message


def test_invalid_format_rejected(tmp_path):
    message = expect_config_error(tmp_path, "data:\n  format: sharegpt\n")
    assert "data.format: invalid value 'sharegpt'" in message


# --set overrides.


def test_set_epochs_parsed_number():
    config = load_config(None, ["train.epochs=3"])
    assert config.train.epochs == 3.0
    assert isinstance(config.train.epochs, float)


def test_set_overrides_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n  batch_size: 4\n")
    config = load_config(path, ["train.epochs=7", "eval.limit=32"])
    assert config.train.epochs == 7.0
    assert config.train.batch_size == 4
    assert config.eval.limit == 32


def test_set_nested_section():
    config = load_config(None, ["distill.generation.mode=greedy"])
    assert config.distill.generation.mode == "greedy"


def test_set_list_value():
    config = load_config(None, ["eval.benchmarks=[gsm8k, advbench]"])
    assert config.eval.benchmarks == ["gsm8k", "advbench"]


def test_set_bool_value():
    config = load_config(None, ["eval.drift=false"])
    assert config.eval.drift is False


def test_set_string_for_int_rejected():
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_config(None, ["train.batch_size=big"])


def test_set_unknown_key_suggests():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(None, ["train.epoch=3"])


def test_set_without_equals_rejected():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.epochs"])


def test_set_empty_key_rejected():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["=3"])


def test_set_through_value_rejected():
    with pytest.raises(ConfigError, match="epochs is not a section"):
        load_config(None, ["train.epochs=3", "train.epochs.x=1"])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_exponent_without_dot_is_number(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n")
    assert load_config(path).train.learning_rate == 1e-4
    assert load_config(None, ["train.learning_rate=2e-5"]).train.learning_rate == 2e-5
