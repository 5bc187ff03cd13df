"""``strategy="ddp_spawn"``: what rank zero found reaches the callback in the main process through the run log (issue 12).

``ddp_spawn`` pickles the Trainer and its callbacks into processes it starts; the callback
object the user holds in the main process never sees a step. The test runs a script (spawn
cannot start from inside pytest) that trains a deep sigmoid stack (vanishing gradients)
and prints, from the main process, what its ``GradWatch`` object says afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import warnings

    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import gradwatch
    from gradwatch.testing import sigmoid_mlp


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = sigmoid_mlp(depth=16)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    def main():
        log = sys.argv[1]
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(128, 16, generator=g), torch.randn(128, 1, generator=g))
        cb = gradwatch.GradWatch(log=log or None, report=False, stats_every=1, sample_every=1, report_every=4)
        trainer = pl.Trainer(
            strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=8, callbacks=[cb], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(Net(), DataLoader(data, batch_size=8))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = [(d.kind, d.step, list(d.layers)) for d in cb.diagnoses]
        said = [str(w.message) for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
        print("RESULT " + json.dumps({"diagnoses": found, "warnings": said, "watchers": len(cb.watchers)}))


    if __name__ == "__main__":
        main()
    """
)


def _run(tmp_path: Path, log: str) -> dict:
    script = tmp_path / "spawn.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), log], capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_ddp_spawn_diagnoses_reach_the_main_process_through_the_run_log(tmp_path) -> None:
    from gradwatch.logfile import read_log

    log = str(tmp_path / "run.jsonl")
    seen = _run(tmp_path, log)
    assert seen["watchers"] == 0  # the main process's copy trained nothing itself
    assert not seen["warnings"]
    assert "vanishing" in {kind for kind, _, _ in seen["diagnoses"]}
    written = read_log(log)
    assert seen["diagnoses"] == sorted(([d.kind, d.step, list(d.layers)] for d in written.diagnoses), key=lambda d: d[1])
    assert written.steps()[0] == list(range(8))


def test_ddp_spawn_without_a_log_says_where_the_results_are(tmp_path) -> None:
    seen = _run(tmp_path, "")
    assert seen["diagnoses"] == []
    assert len(seen["warnings"]) == 1 and "log='run.jsonl'" in seen["warnings"][0]
