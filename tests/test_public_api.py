"""The public names stay what they are: no subpackage shadows a public function."""

import importlib

import paretune


def test_public_functions_are_not_shadowed_by_subpackages():
    importlib.import_module("paretune.training.trainer")  # loading a subpackage must not rebind a name
    importlib.import_module("paretune.methods.lora")
    assert callable(paretune.train) and paretune.train.__module__ == "paretune"
    assert callable(paretune.list_methods) and "lora" in paretune.list_methods()
    for name in paretune.__all__:
        assert hasattr(paretune, name), name


def test_peft_style_helpers_are_public():
    for name in ("print_trainable_parameters", "MethodConfig", "LoraConfig", "PissaConfig"):
        assert name in paretune.__all__ and hasattr(paretune, name), name
