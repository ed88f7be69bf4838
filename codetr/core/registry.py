"""Component registries resolved through Python entry points.

A *component* is a pydantic config class (with a ``type`` discriminator) plus a builder. Components are
published under an entry-point group; codetr publishes its own built-ins in its ``pyproject.toml``
exactly as a third-party package would::

    [project.entry-points."codetr.assigners"]
    simota = "my_pkg.simota:COMPONENT"

where ``COMPONENT = Component(config=SimOTAConfig, build=build_simota, summary="...")``.

Groups and builder signatures (the builder is called by :func:`codetr.assembly.build_detector` or by the
component that owns the slot, never by users; the positional arguments after ``cfg`` are exactly these):

==========================  ==========================================================================
``codetr.backbones``        ``build(cfg) -> nn.Module`` with ``out_channels``/``strides`` attributes
``codetr.necks``            ``build(cfg, in_channels: list[int], in_strides: list[int]) -> nn.Module``
                            with ``out_strides``
``codetr.variants``         ``build(cfg) -> DETRVariant``
``codetr.aux_heads``        ``build(cfg, loss_scale: float) -> AuxHead`` (``loss_scale`` =
                            ``co_detr.lambda_2 * num_decoder_layers``, multiplied into every aux loss)
``codetr.assigners``        ``build(cfg) -> OneToOneAssigner | OneToManyAssigner`` (built by the slot
                            that holds it: the criterion's matcher, an aux head's assigners)
``codetr.query_encoders``   ``build(cfg, num_groups: int) -> QueryEncoder`` (``num_groups`` = number of
                            aux heads)
==========================  ==========================================================================

A plugin that fails to import is recorded with its distribution and exception and does not break the
other components of the group; asking for it by name raises :class:`ComponentError` with that story.
"""

from __future__ import annotations

import difflib
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = [
    "SHARED_FIELDS",
    "component_field",
    "ComponentGroup",
    "GROUPS",
    "ComponentConfig",
    "Component",
    "ComponentError",
    "LoadFailure",
    "Registry",
    "registry",
]

#: The recipe's single source of truth: set once in ``model:`` and injected into every component config that
#: declares a field of the same name (:func:`codetr.core.config.loader.inject_shared`).
SHARED_FIELDS: tuple[str, ...] = ("num_classes", "hidden_dim", "num_levels", "num_queries", "num_decoder_layers")

GROUPS: dict[str, str] = {
    "backbones": "codetr.backbones",
    "necks": "codetr.necks",
    "variants": "codetr.variants",
    "aux_heads": "codetr.aux_heads",
    "assigners": "codetr.assigners",
    "query_encoders": "codetr.query_encoders",
}


class ComponentConfig(BaseModel):
    """Base of every component config: strict (unknown keys rejected), immutable, has ``type``.

    Fields named in :attr:`SHARED_FIELDS` (``num_classes``, ``hidden_dim``, ``num_levels``,
    ``num_queries``, ``num_decoder_layers``) are the recipe's single source of truth: declare them as
    ``Optional[int] = None`` and the recipe injects the model-level value; a recipe that sets a
    different value in a component is rejected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    SHARED_FIELDS: ClassVar[tuple[str, ...]] = SHARED_FIELDS

    type: str

    def require_shared(self, *names: str) -> None:
        """Raise a clear ``ValueError`` when a shared field this component needs was not injected.

        Builders call it first (``cfg.require_shared("num_classes", "hidden_dim")``); the message names the
        component, the fields and where the value normally comes from (the recipe's ``model:`` section).
        """
        unknown = [n for n in names if n not in SHARED_FIELDS]
        if unknown:
            raise ValueError(f"require_shared: {unknown} are not shared fields ({', '.join(SHARED_FIELDS)})")
        missing = [n for n in names if getattr(self, n, None) is None]
        if missing:
            fields = ", ".join(missing)
            origin = ", ".join(f"model.{n}" for n in missing)
            raise ValueError(f"{self.type} ({type(self).__name__}): {fields} not set. A recipe injects it from "
                             f"{origin}; when building the component by hand, set {fields} in its config.")


@dataclass(frozen=True)
class Component:
    """What an entry point points at."""

    config: type[ComponentConfig]
    build: Callable[..., Any]
    summary: str = ""


class ComponentError(ValueError):
    """Unknown component name, or a plugin that failed to load."""


@dataclass(frozen=True)
class LoadFailure:
    group: str
    name: str
    distribution: str
    target: str
    error: str


@dataclass
class _Entry:
    group: str
    name: str
    target: str
    distribution: str
    component: Component | None = None
    failure: LoadFailure | None = None


@dataclass
class Registry:
    """Lazily reads entry points; ``register`` adds in-process components (tests, notebooks)."""

    _entries: dict[str, dict[str, _Entry]] = field(default_factory=dict)
    _scanned: bool = False

    # ---------------------------------------------------------------- discovery
    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for group, ep_group in GROUPS.items():
            table = self._entries.setdefault(group, {})
            for ep in metadata.entry_points(group=ep_group):
                dist = ep.dist.name if getattr(ep, "dist", None) is not None else "?"
                if ep.name in table and table[ep.name].distribution != dist:
                    other = table[ep.name]
                    table[ep.name] = _Entry(group, ep.name, ep.value, dist, failure=LoadFailure(
                        group, ep.name, dist, ep.value,
                        f"name clash: also provided by {other.distribution} ({other.target}); "
                        "uninstall one of the two distributions"))
                    continue
                table[ep.name] = _Entry(group, ep.name, ep.value, dist)

    def refresh(self) -> None:
        """Forget discovered entry points (after installing a plugin in-process)."""
        manual = {g: {n: e for n, e in t.items() if e.distribution == "<in-process>"}
                  for g, t in self._entries.items()}
        self._entries = manual
        self._scanned = False

    def register(self, group: str, name: str, component: Component) -> None:
        """Register a component in-process (no packaging needed)."""
        self._check_group(group)
        self._scan()
        self._entries.setdefault(group, {})[name] = _Entry(
            group, name, f"{component.build.__module__}", "<in-process>", component=component)

    def unregister(self, group: str, name: str) -> None:
        self._entries.get(group, {}).pop(name, None)

    # ---------------------------------------------------------------- lookup
    def _check_group(self, group: str) -> None:
        if group not in GROUPS:
            raise ComponentError(f"unknown component group {group!r}; groups: {', '.join(GROUPS)}")

    def _load(self, entry: _Entry) -> Component:
        if entry.component is not None:
            return entry.component
        if entry.failure is None:
            try:
                ep = metadata.EntryPoint(name=entry.name, value=entry.target, group=GROUPS[entry.group])
                obj = ep.load()
                if not isinstance(obj, Component):
                    raise TypeError(f"{entry.target} is a {type(obj).__name__}, expected codetr.core.registry.Component")
                if not (isinstance(obj.config, type) and issubclass(obj.config, ComponentConfig)):
                    raise TypeError(f"{entry.target}.config must subclass ComponentConfig")
                entry.component = obj
                return obj
            except Exception as exc:  # a broken plugin must not break the others
                msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                entry.failure = LoadFailure(entry.group, entry.name, entry.distribution, entry.target, msg)
        f = entry.failure
        raise ComponentError(
            f"{f.group} component {f.name!r} from package {f.distribution!r} ({f.target}) failed to load: "
            f"{f.error}. Fix or reinstall that package (pip install -U {f.distribution}), or use another type.")

    def names(self, group: str) -> list[str]:
        self._check_group(group)
        self._scan()
        return sorted(self._entries.get(group, {}))

    def get(self, group: str, name: str) -> Component:
        self._check_group(group)
        self._scan()
        table = self._entries.get(group, {})
        if name not in table:
            avail = sorted(table)
            close = difflib.get_close_matches(name, avail, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ComponentError(
                f"unknown {group[:-1].replace('_', ' ')} type {name!r}; available: {', '.join(avail) or '(none)'}."
                f"{hint} Third-party components are found through the '{GROUPS[group]}' entry-point group "
                "(pip install the plugin package).")
        return self._load(table[name])

    def listing(self) -> list[dict[str, str]]:
        """Every known component with its group, distribution and load status (loads each)."""
        self._scan()
        rows = []
        for group in GROUPS:
            for name, entry in sorted(self._entries.get(group, {}).items()):
                status, summary = "ok", ""
                try:
                    summary = self._load(entry).summary
                except ComponentError:
                    status = f"failed: {entry.failure.error if entry.failure else '?'}"
                rows.append({"group": GROUPS[group], "name": name, "distribution": entry.distribution,
                             "target": entry.target, "status": status, "summary": summary})
        return rows

    def failures(self) -> list[LoadFailure]:
        self.listing()
        return [e.failure for t in self._entries.values() for e in t.values() if e.failure is not None]

    # ---------------------------------------------------------------- build
    def validate(self, group: str, data: Any) -> ComponentConfig:
        """Validate a component section (dict with ``type``) with the component's own config class."""
        if isinstance(data, ComponentConfig):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping with a 'type' key, got {type(data).__name__}")
        if "type" not in data:
            raise ValueError(f"missing 'type'; available {group}: {', '.join(self.names(group)) or '(none)'}")
        comp = self.get(group, str(data["type"]))
        return comp.config.model_validate(data)

    def build(self, group: str, cfg: ComponentConfig, *args: Any) -> Any:
        return self.get(group, cfg.type).build(cfg, *args)


registry = Registry()


def component_field(group: str) -> Any:
    """Type for a recipe field holding a component of ``group``.

    The section is validated with the component's own config class (found by ``type`` through the
    registry), so plugin options get the same strict validation and error paths as built-in ones.
    """
    from typing import Annotated

    from pydantic import BeforeValidator, SerializeAsAny

    if group not in GROUPS:
        raise ComponentError(f"unknown component group {group!r}")
    return Annotated[SerializeAsAny[ComponentConfig], BeforeValidator(lambda v: registry.validate(group, v)),
                     ComponentGroup(group)]


@dataclass(frozen=True)
class ComponentGroup:
    """Marker in a recipe field's metadata: the field holds a component of ``group``."""

    group: str
