"""cilbench: a benchmark harness for class-incremental learning with dynamic networks."""
__version__ = "0.1.0"


def _mount_method_plugins() -> None:
    """Make the method plug-ins importable as `cilbench.methods`, never as a top-level `methods` (a name any
    other project may use). An installed wheel holds them in cilbench/methods/ (pyproject maps the repository's
    methods/ folder there); in the source tree (a checkout, pytest from the repository root, `pip install -e`)
    they are the methods/ folder beside this package, mounted here under the same name."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    source = here.parent / "methods"
    if (here / "methods").is_dir() or not (source / "__init__.py").is_file() or f"{__name__}.methods" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(f"{__name__}.methods", source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    globals()["methods"] = module       # as the import system binds a submodule on its parent
    spec.loader.exec_module(module)


_mount_method_plugins()
