"""An Accelerate custom loop under ``gradwatch.watch()``: no door needed.

``watch(model, optimizer)`` takes what ``accelerator.prepare`` returns (the
``AcceleratedOptimizer``, a DDP-wrapped model under ``accelerate launch``). Under
``accelerator.accumulate(model)`` the optimizer steps once per accumulated step, and so
does gradwatch. It reads the gradients at ``optimizer.step()``: after
``accelerator.clip_grad_norm_`` when you clip with it, as here; pass ``clip=1.0`` to
``watch()`` instead (torch's ``clip_grad_norm_``, to the bit) to see them before clipping.

Run: ``python examples/accelerate_loop.py`` (or ``accelerate launch examples/accelerate_loop.py``).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

import gradwatch


def main() -> gradwatch.Watcher:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (512, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(tokens, batch_size=8, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    with gradwatch.watch(model, optimizer, report_every=8) as gw:  # <- the one line
        for ids in loader:  # 64 micro-batches: 16 optimizer steps
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                gw.observe_loss(loss.detach())
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
    print(f"{gw.step_count} optimizer steps watched, {len(gw.history)} statistics rows, {len(gw.diagnoses)} diagnoses")
    return gw


if __name__ == "__main__":
    main()
