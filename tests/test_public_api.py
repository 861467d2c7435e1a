"""Every public name has an annotated signature (mypy checks the annotations).

The public API is the `__all__` of the modules below. A function must annotate
every parameter and its return value; a class every parameter of its
constructor (`__init__` written in tfp_glow; one inherited from Keras or TFP is
theirs). mypy (`pyproject.toml`, CI's type step) then checks these annotations
against the code; this test makes sure there is something to check.
"""

import importlib
import inspect

import pytest

PUBLIC_MODULES = (
    "tfp_glow",
    "tfp_glow.bijectors",
    "tfp_glow.nets",
    "tfp_glow.vi",
    "tfp_glow.training",
    "tfp_glow.data",
    "tfp_glow.npe",
)


def _public_callables():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj) or hasattr(obj, "__wrapped__"):
                yield f"{module_name}.{name}", obj


def _unannotated(obj):
    """Names of the parameters (and "return") of `obj`'s signature lacking annotations."""
    if inspect.isclass(obj):
        init = obj.__dict__.get("__init__") or next(
            (
                klass.__dict__["__init__"]
                for klass in obj.__mro__[1:]
                if "__init__" in klass.__dict__
            ),
            None,
        )
        if init is None or not (init.__module__ or "").startswith("tfp_glow"):
            return []  # object's, Keras' or TFP's constructor
        parameters = list(inspect.signature(init).parameters.values())[1:]  # self
        return [p.name for p in parameters if p.annotation is inspect.Parameter.empty]
    signature = inspect.signature(obj)  # follows __wrapped__ (contextmanager, tf decorators)
    missing = [
        p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


_PUBLIC = dict(_public_callables())


@pytest.mark.parametrize("name", sorted(_PUBLIC))
def test_public_signature_is_annotated(name):
    obj = _PUBLIC[name]
    assert _unannotated(obj) == [], f"{name}: unannotated {_unannotated(obj)}"


def test_the_check_sees_missing_annotations():
    def half(x, y: int = 1):
        return x

    class Layer:
        def __init__(self, units: int, name=None) -> None:
            pass

    class Child(Layer):
        pass

    assert _unannotated(half) == ["x", "return"]
    for klass in (Layer, Child):
        klass.__init__.__module__ = "tfp_glow.example"
        assert _unannotated(klass) == ["name"]
