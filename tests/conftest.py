import os

import pytest

pytest_plugins = ["gradwatch.testing"]

# Tests never pick up third-party plugins installed on the machine unless they ask.
os.environ.setdefault("GRADWATCH_DISABLE_PLUGIN_AUTOLOAD", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
