import os

# Tiny models train fastest on one thread, and 2-process tests must not oversubscribe a
# 2-core machine; subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

pytest_plugins = ["gradwatch.testing"]

# Tests never pick up third-party plugins installed on the machine unless they ask.
os.environ.setdefault("GRADWATCH_DISABLE_PLUGIN_AUTOLOAD", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
