"""One line for a Hugging Face ``Trainer`` user: ``callbacks=[GradWatchCallback()]``.

A two-block GPT-2 built from ``GPT2Config`` (no download) trained with plain SGD at a
learning rate far too high, on random tokens, for 40 steps on CPU (about 10 s). Trainer clips every
step at ``max_grad_norm=1.0`` (its default) and logs one number, ``grad_norm``; gradwatch
reads the gradients before that clip, per layer, finds them growing step after step, says
which remedies fit, and adds ``grad/...`` keys to the same log entries (so they reach any
``report_to`` integration).

Run: ``python examples/hf_trainer.py``.
"""

from __future__ import annotations

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradwatch.hf import GradWatchCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 512, length: int = 16, vocab: int = 64) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> Trainer:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    with tempfile.TemporaryDirectory() as root:
        args = TrainingArguments(
            output_dir=root,
            max_steps=40,
            per_device_train_batch_size=8,
            optim="sgd",
            learning_rate=1000.0,  # far too high, even with Trainer's clipping
            lr_scheduler_type="constant",
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        )
        trainer = Trainer(
            model=GPT2LMHeadModel(config),
            args=args,
            train_dataset=RandomTokens(),
            callbacks=[GradWatchCallback()],  # <- the one line
        )
        trainer.train()
    last = next(e for e in reversed(trainer.state.log_history) if "grad/norm_total" in e)
    print({k: v for k, v in last.items() if k in ("step", "grad_norm", "grad/norm_total") or k.startswith("grad/diagnoses/")})
    return trainer


if __name__ == "__main__":
    main()
