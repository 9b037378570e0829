"""``ovdense list-models`` (architectures with a dense head and their pretrained tags) and ``ovdense
list-methods`` (dense heads / method presets)."""

from __future__ import annotations

from ..methods import methods


def register(subparsers) -> None:
    lm = subparsers.add_parser("list-models", help="architectures with a dense head and their pretrained tags")
    lm.set_defaults(func=run_list_models)
    lme = subparsers.add_parser("list-methods", help="dense heads / method presets")
    lme.set_defaults(func=run_list_methods)


def run_list_models(args) -> int:
    import open_clip

    from ..weights import list_models

    for name in list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            tags = ["(random test architecture)"] if name.startswith("ovdense-test") else ["-"]
        print(f"{name}\t{', '.join(tags)}")
    return 0


def run_list_methods(args) -> int:
    for name, spec in methods().items():
        own = spec.datasets_with_settings
        extra = f" (datasets with own settings: {', '.join(own)})" if own else ""
        options = ", ".join(f"{o.name}={o.default}" for o in spec.options.values())
        print(f"{name}\t{spec.summary}{extra}" + (f" [options: {options}]" if options else ""))
    return 0
