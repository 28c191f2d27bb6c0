"""Progress display for training stages.

On a terminal: one tqdm bar per stage (images seen, rate, ETA) plus a line per
epoch. Elsewhere (CI logs, pipes, ``make demo | tee``): no carriage-return
bars, just the epoch lines, each with the stage's ETA. Only the main process
draws.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, enabled: bool = True, print_fn=print, bar: bool | None = None):
        self.enabled = enabled
        self.print = print_fn
        self.use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        self.label = ""
        self._loss = None
        self._epochs = 0
        self._done = 0
        self._t0 = 0.0

    def start_stage(self, label: str, epochs: int, start_epoch: int, images_per_epoch: int) -> None:
        self.close()
        self.label, self._epochs, self._done, self._t0 = label, epochs, 0, time.perf_counter()
        self._start_epoch = start_epoch
        if self.enabled and self.use_bar:
            self.bar = tqdm(total=epochs * images_per_epoch, initial=start_epoch * images_per_epoch,
                            desc=label, unit="img", dynamic_ncols=True, leave=False, file=sys.stderr)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.label} epoch {epoch + 1}/{epochs}")

    def update(self, n: int, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self._loss = loss if self._loss is None else 0.9 * self._loss + 0.1 * loss
                self.bar.set_postfix(loss=f"{self._loss:.3f}", refresh=False)

    def end_epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        self._done += 1
        parts = [f"{self.label} epoch {record['epoch']}/{self._epochs}", f"loss {record['train_loss']:.4f}",
                 f"train {record['train_top1']:.2f}%"]
        for split in ("val", "test"):
            if f"{split}_top1" in record:
                parts.append(f"{split} {record[f'{split}_top1']:.2f}%")
        parts.append(f"{record['seconds']:.1f}s")
        remaining = self._epochs - record["epoch"]
        if remaining > 0:
            per_epoch = (time.perf_counter() - self._t0) / self._done
            parts.append(f"ETA {per_epoch * remaining:.0f}s")
        msg = "  " + " | ".join(parts)
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            self.print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
