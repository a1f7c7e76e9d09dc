"""mim.registry: registered names, `package.module:Name` plug-ins, and an error that names the
key, what is registered and the closest match for everything else."""

from __future__ import annotations

import pytest

from mim.models.target_kinds import TARGETS, Hog, Target
from mim.models.transforms import TRANSFORMS, grad_checkpointing
from mim.registry import Registry, UnknownPart


def test_a_registered_name_and_a_plug_in_path_give_the_part():
    assert TARGETS.get("hog") is Hog
    assert TARGETS.get("mim.models.target_kinds:Hog") is Hog
    assert TRANSFORMS.get("mim.models.transforms:grad_checkpointing") is grad_checkpointing


@pytest.mark.parametrize(
    "registry, spec, message",
    [
        (
            TARGETS,
            "hogg",
            "target.kind='hogg': no such target; did you mean 'hog'? (registered: ema, hog, pixels, teacher",
        ),
        (TARGETS, "no_such_lab.targets:Edges", "cannot import 'no_such_lab.targets'"),
        (TARGETS, "mim.models.target_kinds:Edges", "mim.models.target_kinds has no 'Edges'"),
        (
            TARGETS,
            "mim.models.targets:hog",
            "is not a target: expected a subclass of mim.models.target_kinds.Target",
        ),
        (TRANSFORMS, "mim.models:transforms", "is not a model transform: expected a function"),
    ],
)
def test_what_does_not_resolve_is_refused_naming_it(registry, spec, message):
    with pytest.raises(UnknownPart, match=message.replace("(", r"\(").replace("?", r"\?")):
        registry.get(spec)


def test_a_name_registered_twice_is_an_error():
    registry = Registry("target", "target.kind", base=Target)

    @registry.register("mine")
    class Mine(Target):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        registry.register("mine")(type("Other", (Target,), {}))
    assert registry.get("mine") is Mine and registry.names() == ["mine"]
