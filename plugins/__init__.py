"""gradwatch's built-in plugins, installed as ``gradwatch.plugins``.

This folder ships under the name ``gradwatch.plugins`` (setuptools ``package-dir``);
importing it as a top-level ``plugins`` package would load every plugin twice and
fire each hook twice, so that import is refused.
"""

if __name__ != "gradwatch.plugins":
    raise ImportError(
        f"the built-in plugins must be imported as 'gradwatch.plugins', not {__name__!r}; "
        "install gradwatch (pip install -e .) and run pytest with --import-mode=importlib"
    )
