"""A stage's weights as named tensors, and a stage's modules rebuilt from them.

A device that already holds a stage can hand its weights to a same-node device
(docs/runtime.md "Peer weight copies"): the holder lists every tensor of the stage's
modules (:func:`stage_tensors`: parameters and buffers, persistent or not, tied ones
named once with their aliases), the runtime moves them (a shared-memory file on the
node), and the receiver builds the same modules from their configs on the meta device
and puts those tensors in place (:func:`build_modules`), without reading the model
directory's weight files. The result is the module ``from_pretrained`` gives, tensor
for tensor (dtypes included: a module kept partly in float32 stays so), which is what
makes a peer-loaded stage's output bit-identical to a disk-loaded one.

Tensor names are ``<component>/<dotted name in the module>``; an alias (a tied weight,
e.g. T5's ``shared.weight`` and ``encoder.embed_tokens.weight``) is listed in
:class:`StageTensors.aliases` and gets the same tensor object back.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["StageTensors", "WeightsError", "build_modules", "module_components", "stage_tensors"]


class WeightsError(Exception):
    """Peer weights that do not fit the modules their configs build (a tensor missing,
    extra, or of another shape): the caller loads from disk instead."""


@dataclass
class StageTensors:
    """Every tensor of a stage's modules, each storage once."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias name -> listed name


def module_components(pipe: Any, names: list[str]) -> dict[str, torch.nn.Module]:
    """The ``torch.nn.Module`` components among ``names`` of a loaded pipeline."""
    out = {}
    for name in names:
        value = getattr(pipe, name, None)
        if isinstance(value, torch.nn.Module):
            out[name] = value
    return out


def stage_tensors(modules: Mapping[str, torch.nn.Module]) -> StageTensors:
    """Parameters and buffers of ``modules`` by ``<component>/<name>``; a tensor shared
    by several names (tied weights) is listed under its first name, the others are
    aliases of it."""
    out = StageTensors()
    seen: dict[tuple[Any, ...], str] = {}
    for comp, module in modules.items():
        named: list[tuple[str, torch.Tensor]] = list(
            module.named_parameters(remove_duplicate=False)
        )
        named += list(module.named_buffers(remove_duplicate=False))
        for name, t in named:
            full = f"{comp}/{name}"
            data = t.detach()
            key = (
                data.data_ptr(),
                data.storage_offset(),
                tuple(data.shape),
                data.stride(),
                data.dtype,
            )
            if data.numel() and key in seen:
                out.aliases[full] = seen[key]
                continue
            seen[key] = full
            out.tensors[full] = data
    return out


def _component_class(library: str, class_name: str) -> Any:
    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as exc:
        raise WeightsError(f"cannot import {library}.{class_name}: {exc}") from exc


def _empty_module(root: Path, name: str, library: str, class_name: str, dtype: torch.dtype) -> Any:
    """``name``'s module built from its config with every parameter and buffer on the
    meta device (no memory, no initialisation)."""
    cls = _component_class(library, class_name)
    folder = root / name
    # torch's device context is per thread (accelerate's init_empty_weights patches
    # nn.Module for the whole process, which a load in another thread would see).
    with torch.device("meta"):
        if library == "transformers":
            config = cls.config_class.from_pretrained(folder)
            module = cls._from_config(config, dtype=dtype)
        else:
            module = cls.from_config(cls.load_config(folder))
    return module.eval()


def _put(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Set the parameter or buffer ``name`` (dotted) of ``module`` to ``tensor`` itself."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = torch.nn.Parameter(
            tensor, requires_grad=bool(old is not None and old.requires_grad)
        )
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise WeightsError(f"no parameter or buffer {name!r} in {type(module).__name__}")


def build_modules(
    root: str | Path,
    components: Mapping[str, Any],
    names: list[str],
    weights: StageTensors,
    dtype: torch.dtype,
) -> dict[str, torch.nn.Module]:
    """The modules among ``names`` (``model_index.json`` entries ``[library, class]``),
    built from their configs under ``root`` and holding ``weights``' tensors (not
    copies). Raises :class:`WeightsError` unless every tensor of every module is given
    exactly, with the shape the config builds."""
    root = Path(root)
    by_comp: dict[str, dict[str, torch.Tensor]] = {}
    for full, t in weights.tensors.items():
        comp, _, name = full.partition("/")
        by_comp.setdefault(comp, {})[name] = t
    for alias, target in weights.aliases.items():
        comp, _, name = alias.partition("/")
        if target not in weights.tensors:
            raise WeightsError(f"alias {alias!r} of a tensor not given ({target!r})")
        by_comp.setdefault(comp, {})[name] = weights.tensors[target]
    built: dict[str, torch.nn.Module] = {}
    for comp in names:
        if comp not in by_comp:
            continue  # not a module (tokenizer, scheduler): from_pretrained reads it
        library, class_name = components[comp]
        module = _empty_module(root, comp, str(library), str(class_name), dtype)
        given = by_comp.pop(comp)
        expected = {
            n: t
            for n, t in [
                *module.named_parameters(remove_duplicate=False),
                *module.named_buffers(remove_duplicate=False),
            ]
        }
        missing = sorted(set(expected) - set(given))
        extra = sorted(set(given) - set(expected))
        if missing or extra:
            raise WeightsError(
                f"{comp}: peer weights do not match its config"
                f" (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        shared: dict[int, torch.nn.Parameter] = {}
        for name, t in given.items():
            if tuple(expected[name].shape) != tuple(t.shape):
                raise WeightsError(
                    f"{comp}/{name}: shape {tuple(t.shape)}, config builds {tuple(expected[name].shape)}"
                )
            _put(module, name, t)
            # One Parameter object per tensor, as tied weights are after from_pretrained.
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            p = owner._parameters.get(leaf)
            if p is not None:
                key = id(t)
                if key in shared:
                    owner._parameters[leaf] = shared[key]
                else:
                    shared[key] = p
        built[comp] = module
    if by_comp:
        raise WeightsError(f"peer weights name components this stage lacks: {sorted(by_comp)}")
    return built
