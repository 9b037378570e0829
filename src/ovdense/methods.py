"""The method registry: every method is one ``@register_method`` on its head class, in one file of ``heads/``.

A *method* is a dense head plus its authors' settings: a one-line summary, the default settings (any
:class:`ovdense.presets.Preset` field), per-benchmark settings, the CLIP weights and the vision foundation
model it defaults to, and the head's own options (the keyword arguments of its ``__init__``, typed by their
annotations, described in the class docstring's ``Args:``). Example, in ``heads/mymethod.py``::

    @register_method(
        "mymethod",
        summary="q-q attention with a twist",
        defaults={"short_side": 448, "crop": 448, "stride": 224},
        datasets={"voc21": {"prob_thd": 0.3}},
    )
    class MyHead(DenseHead):
        '''...

        Args:
            twist: how much twist (0.5).
        '''

        def __init__(self, twist: float = 0.5): ...

The registry reads the registrations of ``ovdense/heads/*.py`` from their source, without importing them (their
arguments must be literals: strings, numbers, dicts, tuples), so ``ovdense --help``, ``list-methods`` and argument
errors answer without importing torch; a head's module is imported when the head is built
(:func:`head_class`). A head registered at run time (a plug-in, a test's toy head) joins the same registry when
its module executes the decorator.

A method that is not a CLIP dense head runs a model of its own (SAM 3, ``ovdense/sam3.py``): its registered class
sets ``own_model = True``, holds the options and says how to load the model and build the segmenter
(:attr:`MethodSpec.own_model`); the files of :data:`OWN_MODEL_MODULES` are read like ``heads/``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import ranges
from .ranges import Range

__all__ = [
    "MethodSpec",
    "builtin_methods",
    "read_registrations",
    "check_method_inputs",
    "check_options",
    "OptionSpec",
    "create_head",
    "get_method",
    "head_class",
    "list_methods",
    "methods",
    "register_method",
    "unregister_method",
]

HEADS_DIR = Path(__file__).parent / "heads"
#: Modules of ``ovdense/`` registering methods that run a model of their own instead of a CLIP dense head.
OWN_MODEL_MODULES = ("sam3",)
_PACKAGE = __name__.rsplit(".", 1)[0]


@dataclass(frozen=True)
class OptionSpec:
    """One option of a method's head: a keyword argument of the head's ``__init__``.

    Attributes:
        name: the keyword.
        default: its default value.
        annotation: its type as written (``"float"``, ``"Literal['csa', 'qq']"``, ``"tuple[int, ...]"``).
        help: its line of the head docstring's ``Args:`` section ("" when it has none).
        range: the values a number (each item of a sequence) accepts: the registration's ``ranges`` entry; numbers
            without one are only required to be finite.
    """

    name: str
    default: object
    annotation: str
    help: str = ""
    range: Range | None = None

    @property
    def choices(self) -> tuple | None:
        """The allowed values of a ``Literal[...]`` option, else None."""
        node = ast.parse(self.annotation, mode="eval").body
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return tuple(ast.literal_eval(item) for item in items)
        return None

    @property
    def kind(self) -> str:
        """How a command-line value is read: ``bool``, ``int``, ``float``, ``str``, ``choice``, ``ints``, ``floats``."""
        if self.choices is not None:
            return "choice"
        simple = {"bool": "bool", "int": "int", "float": "float", "str": "str"}
        if self.annotation in simple:
            return simple[self.annotation]
        if re.fullmatch(r"tuple\[(int|float), \.\.\.\]", self.annotation):
            return "ints" if "int" in self.annotation else "floats"
        raise TypeError(
            f"option {self.name!r}: annotation {self.annotation!r} is not one the registry reads "
            "(bool, int, float, str, Literal[...], tuple[int, ...], tuple[float, ...])"
        )

    def check(self, value, method: str) -> object:
        """``value`` for this option, checked against its type (ints are accepted as floats) and its declared
        range (numbers are finite in any case). A choice among a ``Literal`` is checked by the head when it is
        built, in its own words.

        Raises:
            ValueError: a value of the wrong type or out of range, naming the method and option.
        """
        kind = self.kind
        where = f"method {method!r} option {self.name!r}"
        if kind == "choice":
            return value
        types = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
        if kind in ("ints", "floats"):
            item = (int,) if kind == "ints" else (int, float)
            is_sequence = isinstance(value, (tuple, list))
            if not is_sequence or any(isinstance(v, bool) or not isinstance(v, item) for v in value):
                raise ValueError(f"{where}: expected a sequence of {kind[:-1]}s, got {value!r}")
            return tuple(self._in_range(v, method) for v in value)
        if (isinstance(value, bool) and kind != "bool") or not isinstance(value, types[kind]):
            raise ValueError(f"{where}: expected {kind}, got {value!r}")
        if kind in ("int", "float"):
            value = self._in_range(value, method)
        return float(value) if kind == "float" else value

    def _in_range(self, value, method: str):
        integer = self.kind in ("int", "ints")
        rng = self.range or Range()
        return ranges.check(f"{self.name} ({method})", value, replace(rng, integer=integer))

    def parse(self, text: str, method: str) -> object:
        """A command-line string as this option's value (``on/off`` for bools, commas for sequences)."""
        kind = self.kind
        where = f"method {method!r} option {self.name!r}"
        try:
            if kind == "bool":
                words = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
                if text.lower() not in words:
                    raise ValueError
                value = words[text.lower()]
            elif kind == "choice":
                by_text = {str(c): c for c in self.choices}
                if text not in by_text:
                    raise ValueError
                value = by_text[text]
            elif kind in ("ints", "floats"):
                value = tuple((int if kind == "ints" else float)(v) for v in text.split(","))
            else:
                value = {"int": int, "float": float, "str": str}[kind](text)
        except ValueError:
            if kind in ("int", "float", "ints", "floats"):  # in the words of the declared range
                rng = replace(self.range or Range(), integer=kind in ("int", "ints"))
                each = " each" if kind in ("ints", "floats") else ""
                raise ValueError(f"{self.name} ({method}) must be{each} {rng.describe()}, got {text!r}") from None
            expected = ", ".join(map(str, self.choices)) if kind == "choice" else kind
            raise ValueError(f"{where}: expected {expected}, got {text!r}") from None
        return self.check(value, method)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method (see the module docstring).

    Attributes:
        name: the ``method=`` / ``--method`` name.
        summary: one line for ``ovdense list-methods``.
        head: the head class as ``"module:QualifiedName"``.
        defaults: settings (:class:`ovdense.presets.Preset` fields) for every image and benchmark.
        datasets: per-benchmark settings, over ``defaults``; a benchmark's ``head_kwargs`` update the options.
        datasets_of, without: share another method's per-benchmark settings (those of ``datasets_of`` without
            the keys in ``without``), under this method's own ``datasets``.
        model, pretrained: the CLIP weights the method's authors default to (None: OpenAI's ViT-B/16).
        vfm: the vision foundation model its head uses by default (None: it uses none or the caller names one).
        options: the head's options by name.
        needs_text, uses_vfm, uses_masks, native_vfm: what the head's pass needs (its class attributes, see
            :class:`ovdense.heads.base.DenseHead`).
        own_model: not a CLIP dense head: the method runs its own model (SAM 3); :class:`ovdense.Segmenter` does
            not build it, its registered class does (``check(preset)``, ``load(preset, device)``,
            ``segmenter(loaded, preset, precision)``; see :mod:`ovdense.cli.common`).
        order: the method's place in listings (``list-methods``, ``--help``), then by name; plug-ins without one
            come after the built-in methods.
    """

    name: str
    summary: str
    head: str
    defaults: dict = field(default_factory=dict)
    datasets: dict = field(default_factory=dict)
    datasets_of: str | None = None
    without: tuple = ()
    model: str | None = None
    pretrained: str | None = None
    vfm: str | None = None
    options: dict = field(default_factory=dict)
    needs_text: bool = False
    uses_vfm: bool = False
    uses_masks: bool = False
    native_vfm: bool = False
    own_model: bool = False
    order: int = 1000

    def dataset_settings(self, dataset: str) -> dict:
        """The settings of one benchmark (empty where the method has none of its own)."""
        shared = {}
        if self.datasets_of is not None:
            base = get_method(self.datasets_of).dataset_settings(dataset)
            shared = {k: v for k, v in base.items() if k not in self.without}
        return {**shared, **self.datasets.get(dataset, {})}

    @property
    def datasets_with_settings(self) -> list[str]:
        """Benchmarks with settings of their own (directly or through ``datasets_of``)."""
        names = list(self.datasets)
        if self.datasets_of is not None:
            names += [d for d in get_method(self.datasets_of).datasets_with_settings if d not in names]
        return names


#: Keyword arguments of :func:`register_method` and their types (checked on both ways of reading it).
_REGISTRATION_KEYS = {
    "summary": str,
    "defaults": dict,
    "datasets": dict,
    "datasets_of": str,
    "without": tuple,
    "model": str,
    "pretrained": str,
    "vfm": str,
    "order": int,
    "ranges": dict,
}


#: The head's class attributes a registration records (what its pass needs).
NEEDS = ("needs_text", "uses_vfm", "uses_masks", "native_vfm", "own_model")


def _spec(name, head: str, options: dict, needs: dict, where: str, **kwargs) -> MethodSpec:
    """A :class:`MethodSpec` from a registration's arguments, each checked."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"{where}: a method name is lower-case letters, digits and _, got {name!r}")
    for key, value in kwargs.items():
        if key not in _REGISTRATION_KEYS:
            raise ValueError(f"{where}: register_method has no argument {key!r} ({', '.join(_REGISTRATION_KEYS)})")
        if value is not None and not isinstance(value, _REGISTRATION_KEYS[key]):
            raise ValueError(f"{where}: {key} must be a {_REGISTRATION_KEYS[key].__name__}, got {value!r}")
    if "summary" not in kwargs:
        raise ValueError(f"{where}: register_method needs summary=")
    for option in options.values():
        option.kind  # noqa: B018 - raises TypeError for an annotation the registry cannot read
    for option, bounds in (kwargs.pop("ranges", None) or {}).items():
        if option not in options or not isinstance(bounds, dict):
            raise ValueError(f"{where}: ranges names {option!r}, not an option of the head with a dict of bounds")
        options[option] = replace(options[option], range=Range(**bounds))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return MethodSpec(name=name, head=head, options=options, **needs, **kwargs)


def _arg_helps(docstring: str | None) -> dict[str, str]:
    """The ``Args:`` lines of a Google-style docstring: ``name: text`` (or ``a, b: text``) -> {name: text}."""
    helps: dict[str, str] = {}
    lines = inspect.cleandoc(docstring or "").splitlines()
    inside, current = False, []
    for line in lines:
        if line.strip() == "Args:":
            inside = True
            continue
        if inside:
            if line and not line.startswith(" "):
                break
            match = re.match(r"^ {4}([\w, ]+):\s*(.*)$", line)
            if match:
                current = [n.strip() for n in match.group(1).split(",")]
                for n in current:
                    helps[n] = match.group(2).strip()
            elif line.strip():
                for n in current:
                    helps[n] += " " + line.strip()
    return helps


def _normalised(annotation: str) -> str:
    return ast.unparse(ast.parse(annotation, mode="eval").body)


# -- reading registrations from source (no import) ---------------------------------------------------------------
def _is_registration(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == "register_method") or (
        isinstance(func, ast.Attribute) and func.attr == "register_method"
    )


def _options_from_ast(cls: ast.ClassDef) -> dict[str, OptionSpec]:
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return {}
    helps = _arg_helps(ast.get_docstring(cls))
    args = init.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults, strict=True))[1:] + list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    options = {}
    for arg, default in pairs:
        if default is None or arg.annotation is None:
            raise ValueError(f"{cls.name}.__init__: option {arg.arg!r} needs a type annotation and a default")
        options[arg.arg] = OptionSpec(
            arg.arg, ast.literal_eval(default), _normalised(ast.unparse(arg.annotation)), helps.get(arg.arg, "")
        )
    return options


def read_registrations(path: str | Path, module: str) -> list[MethodSpec]:
    """The ``@register_method`` registrations of one source file, read without importing it (``module``: its
    import name).

    Raises:
        ValueError: a registration whose arguments are not literals, or that breaks a rule.
    """
    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    specs = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            if not _is_registration(deco):
                continue
            where = f"{path.name}: {node.name}"
            try:
                args = [ast.literal_eval(a) for a in deco.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in deco.keywords}
            except ValueError:
                raise ValueError(f"{where}: register_method's arguments must be literals") from None
            if len(args) != 1:
                raise ValueError(f"{where}: register_method takes the method name, then keywords")
            needs = {
                t.id: ast.literal_eval(n.value)
                for n in node.body
                if isinstance(n, ast.Assign)
                for t in n.targets
                if isinstance(t, ast.Name) and t.id in NEEDS
            }
            specs.append(_spec(args[0], f"{module}:{node.name}", _options_from_ast(node), needs, where, **kwargs))
    return specs


_BUILTIN: dict[str, MethodSpec] | None = None
_REGISTERED: dict[str, MethodSpec] = {}
_CLASSES: dict[str, type] = {}


def builtin_methods() -> dict[str, MethodSpec]:
    """The methods of ``ovdense/heads/*.py`` and :data:`OWN_MODEL_MODULES`, read from their source once per
    process."""
    global _BUILTIN
    if _BUILTIN is None:
        found: dict[str, MethodSpec] = {}
        files = [(path, f"{_PACKAGE}.heads.{path.stem}") for path in sorted(HEADS_DIR.glob("*.py"))]
        files += [(HEADS_DIR.parent / f"{stem}.py", f"{_PACKAGE}.{stem}") for stem in OWN_MODEL_MODULES]
        for path, module in files:
            for spec in read_registrations(path, module):
                if spec.name in found:
                    raise ValueError(f"method {spec.name!r} is registered twice ({found[spec.name].head}, {spec.head})")
                found[spec.name] = spec
        _BUILTIN = found
    return _BUILTIN


# -- registering at run time ------------------------------------------------------------------------------------
def _options_from_class(cls: type) -> dict[str, OptionSpec]:
    if "__init__" not in vars(cls):
        return {}
    helps = _arg_helps(cls.__doc__)
    options = {}
    for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty or p.annotation is p.empty:
            raise ValueError(f"{cls.__name__}.__init__: option {name!r} needs a type annotation and a default")
        annotation = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        options[name] = OptionSpec(name, p.default, _normalised(annotation), helps.get(name, ""))
    return options


def register_method(name: str, **kwargs):
    """Class decorator: register a :class:`ovdense.heads.base.DenseHead` subclass as method ``name``.

    Args:
        name: the method's name (lower-case letters, digits, ``_``).
        kwargs: ``summary`` (required), ``defaults``, ``datasets``, ``datasets_of``, ``without``, ``model``,
            ``pretrained``, ``vfm``, ``order`` (see :class:`MethodSpec`), ``ranges``: per option, the keyword
            arguments of an :class:`ovdense.ranges.Range` (``{"temp_thd": {"low": 0, "high": 1}}``). In
            ``ovdense/heads/`` they must be literals.

    Raises:
        ValueError: a malformed registration, or a name another class already holds.
    """

    def decorate(cls: type) -> type:
        where = f"{cls.__module__}.{cls.__qualname__}"
        needs = {n: bool(getattr(cls, n, False)) for n in NEEDS}
        spec = _spec(name, f"{cls.__module__}:{cls.__qualname__}", _options_from_class(cls), needs, where, **kwargs)
        known = builtin_methods().get(name) or _REGISTERED.get(name)
        if known is not None and known.head != spec.head:
            raise ValueError(f"method {name!r} is already registered by {known.head}")
        if known is not None and known != spec:
            raise ValueError(f"{where}: the registration of {name!r} read from the source differs from the run one")
        _REGISTERED[name] = spec
        _CLASSES[name] = cls
        cls.name = name
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method registered at run time (a plug-in's, a test's); the built-in ones stay.

    Raises:
        ValueError: a built-in or unknown method.
    """
    if name in builtin_methods() or name not in _REGISTERED:
        raise ValueError(f"{name!r} is not a method registered at run time")
    del _REGISTERED[name]
    _CLASSES.pop(name, None)


# -- lookup -----------------------------------------------------------------------------------------------------
def methods() -> dict[str, MethodSpec]:
    """Every registered method by name, built-in and registered at run time, in listing order."""
    known = {**builtin_methods(), **_REGISTERED}
    return {spec.name: spec for spec in sorted(known.values(), key=lambda spec: (spec.order, spec.name))}


def list_methods() -> list[str]:
    """Names accepted as ``method=`` / ``--method``."""
    return list(methods())


def get_method(name: str) -> MethodSpec:
    """The registration of ``name``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    known = methods()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(known)}")
    return known[name]


def head_class(name: str) -> type:
    """The head class of method ``name``, importing its module on first use."""
    spec = get_method(name)
    if name not in _CLASSES:
        module, qualname = spec.head.split(":")
        importlib.import_module(module)  # executes the decorator, which records the class
        if name not in _CLASSES:
            raise ValueError(f"method {name!r}: {spec.head} did not register itself")
    return _CLASSES[name]


def check_options(name: str, options: dict) -> dict:
    """``options`` checked against method ``name``'s declared options (names and types), without importing the
    head.

    Raises:
        ValueError: an unknown option (listing the method's) or a bad value.
    """
    spec = get_method(name)
    checked = {}
    for key, value in options.items():
        if key not in spec.options:
            known = ", ".join(spec.options) or "none"
            raise ValueError(f"method {name!r} has no option {key!r} (its options: {known})")
        checked[key] = spec.options[key].check(value, name)
    return checked


def create_head(name: str, **options):
    """Build method ``name``'s head with ``options`` (checked against its declaration first).

    Raises:
        ValueError: unknown head (method) or option, or a value the head refuses.
    """
    if name not in methods():
        raise ValueError(f"unknown head {name!r}; available: {', '.join(methods())}")
    spec = methods()[name]
    if spec.own_model:
        raise ValueError(
            f"{name} is not a CLIP dense head but a model of its own: see {spec.head.split(':')[0]} "
            f"(ovdense segment/eval --method {name}, or ovdense demo --methods {name})"
        )
    return head_class(name)(**check_options(name, options))


def check_method_inputs(
    method: str,
    *,
    vfm=None,
    vfm_checkpoint=None,
    masks_dir=None,
    mask_generator=None,
    mask_model=None,
    images=(),
    dataset: str | None = None,
    any_vfm: bool = False,
    masks_required: bool = False,
) -> None:
    """What a method is given against what its head uses, before any weights load.

    Args:
        method: a registered method.
        vfm, vfm_checkpoint: a VFM (name or model) and its weights file; only for a head that uses a VFM, unless
            ``any_vfm`` (a VFM to show beside any method, as ``ovdense attention`` does).
        masks_dir, mask_generator, mask_model: region masks of a head that uses them: a folder of
            ``<image stem>.npz`` files or a generator (name or callable), not both, and one of them.
        images: image paths whose mask files must exist in ``masks_dir`` (one line naming the first missing).
        dataset: the benchmark whose masks subfolder holds them (see :func:`ovdense.masks.region_map_for`).
        any_vfm: a VFM is fine with every method.
        masks_required: a head that uses masks must be given a folder or a generator (the command line: it has
            no other way to pass them; in Python ``set_image(image, masks=...)`` is a third).

    Raises:
        InvalidArgumentError: the first mismatch, in one line.
    """
    from .errors import InvalidArgumentError

    spec = get_method(method)
    with_vfm = ", ".join(n for n, s in methods().items() if s.uses_vfm)
    with_masks = ", ".join(n for n, s in methods().items() if s.uses_masks)
    if (vfm is not None or vfm_checkpoint is not None) and not spec.uses_vfm and not any_vfm:
        raise InvalidArgumentError(
            f"vfm: the {method} head uses no vision foundation model "
            f"(--vfm and --vfm-checkpoint apply to methods with a VFM: {with_vfm})"
        )
    if (masks_dir is not None or mask_generator is not None or mask_model is not None) and not spec.uses_masks:
        raise InvalidArgumentError(
            f"masks_dir, mask_generator: the {method} head uses no region masks "
            f"(--masks-dir, --mask-generator and --mask-model apply to {with_masks}, not {method})"
        )
    if not spec.uses_masks:
        return
    if masks_dir is not None and mask_generator is not None:
        raise InvalidArgumentError("masks_dir, mask_generator: give one of them, not both")
    if mask_model is not None and mask_generator is None:
        raise InvalidArgumentError("mask_model: it names the checkpoint of a mask_generator; give one")
    if masks_dir is None and mask_generator is None and masks_required:
        raise InvalidArgumentError(
            f"{method} needs class-agnostic masks: masks_dir= (--masks-dir DIR, CorrCLIP's <image stem>.npz files) "
            "or mask_generator= (--mask-generator sam); or set_image(image, masks=...) in Python"
        )
    if isinstance(mask_generator, str):
        from .mask_generators import MASK_GENERATORS

        if mask_generator not in MASK_GENERATORS:
            raise InvalidArgumentError(
                f"mask_generator: unknown generator {mask_generator!r}; available: {', '.join(MASK_GENERATORS)}"
            )
    if masks_dir is not None:
        if not Path(masks_dir).is_dir():
            raise InvalidArgumentError(f"masks_dir: {masks_dir} is not a folder")
        from .masks import region_map_for

        for path in images:
            region_map_for(masks_dir, path, dataset)  # one line naming the first image without a mask file
