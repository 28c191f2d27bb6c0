"""Progress display for training stages.

On a terminal: one tqdm bar per stage (images seen, rate, ETA) plus a line per
epoch. Elsewhere (CI logs, pipes, ``nohup``, a cluster job's log, ``make demo | tee``): no
carriage-return bars, just the epoch lines, each with the stage's ETA, and -- when an epoch
runs longer than :data:`LOG_EVERY_S` -- a line inside it at most that often (images done,
loss, images/s, the epoch's ETA), as timm's ``--log-interval`` lines, so a log of a 224-px
folder of a million images is not silent for hours. Only the main process draws.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_EVERY_S = 120.0  # without a terminal: at most one line inside an epoch this often (epochs shorter print none)


class Progress:
    def __init__(self, enabled: bool = True, print_fn=print, bar: bool | None = None,
                 log_every_s: float = LOG_EVERY_S, processes: int = 1):
        self.enabled = enabled
        # Each process trains its share of an epoch's images; the counts shown are all processes'.
        self.processes = max(1, int(processes))
        self.log_every_s = log_every_s
        self.print = print_fn
        self.use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        self.label = ""
        self._loss = None
        self._epochs = 0
        self._done = 0.0           # epochs trained in this process, a resumed epoch's share as a fraction
        self._t0 = 0.0
        self._per_epoch = 0
        self._epoch = (0, 0)       # (1-based epoch, epochs) being trained
        self._epoch_images = 0     # images this process trained in it so far
        self._epoch_resumed = 0    # of those, the ones done before a mid-epoch resume (not in the rate)
        self._epoch_t0 = self._last_line = 0.0

    def start_stage(self, label: str, epochs: int, images_per_epoch: int) -> None:
        self.close()
        self.label, self._epochs, self._done, self._t0 = label, epochs, 0.0, time.perf_counter()
        self._per_epoch = images_per_epoch
        if self.enabled and self.use_bar:
            self.bar = tqdm(total=epochs * images_per_epoch, desc=label, unit="img", dynamic_ncols=True,
                            leave=False, file=sys.stderr)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self._epoch, self._epoch_images, self._epoch_resumed = (epoch + 1, epochs), 0, 0
        self._epoch_t0 = self._last_line = time.perf_counter()
        if self.bar is not None:
            # A resumed stage starts at its epoch, not at 0: the bar's remaining images and ETA follow.
            self._skip_on_bar(epoch * self._per_epoch - self.bar.n)
            self.bar.set_description(f"{self.label} epoch {epoch + 1}/{epochs}")

    def resumed_in_epoch(self, images: int) -> None:
        """The epoch was resumed after ``images`` of it, per process (counted, not in the rate)."""
        self._epoch_images = self._epoch_resumed = int(images) * self.processes
        if self.bar is not None:
            self._skip_on_bar(self._epoch_resumed)

    def _skip_on_bar(self, images: int) -> None:
        """Move the bar over images trained before this process started, outside tqdm's rate."""
        if images > 0:
            self.bar.n += images
            self.bar.initial += images  # tqdm's average rate is (n - initial) / elapsed
            self.bar.last_print_n = self.bar.n
            self.bar.refresh()

    def update(self, n: int, loss: float | None = None) -> None:
        """``n`` images of one batch of this process (times ``processes``: every process took one)."""
        n *= self.processes
        if loss is not None:
            self._loss = loss if self._loss is None else 0.9 * self._loss + 0.1 * loss
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{self._loss:.3f}", refresh=False)
        elif self.enabled:
            self._epoch_images += n
            now = time.perf_counter()
            if now - self._last_line >= self.log_every_s and self._epoch_images < self._per_epoch:
                self._last_line = now
                self.print(self._inside_epoch_line(now), flush=True)

    def _inside_epoch_line(self, now: float) -> str:
        done, total = self._epoch_images, self._per_epoch
        rate = (done - self._epoch_resumed) / max(now - self._epoch_t0, 1e-9)
        parts = [f"{self.label} epoch {self._epoch[0]}/{self._epoch[1]}: {done:,}/{total:,} images "
                 f"({100 * done / total:.0f}%)"]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        parts += [f"{rate:.1f} img/s", f"epoch ETA {(total - done) / max(rate, 1e-9):.0f}s"]
        return "  " + " | ".join(parts)

    def end_epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        # An epoch resumed midway ran only its remaining share here: counting it as a whole epoch
        # made the stage ETA after a resume several times too short (a 16-min epoch resumed at 83 %).
        self._done += 1.0 - min(self._epoch_resumed / self._per_epoch, 1.0) if self._per_epoch else 1.0
        parts = [f"{self.label} epoch {record['epoch']}/{self._epochs}", f"loss {record['train_loss']:.4f}",
                 f"train {record['train_top1']:.2f}%"]
        for split in ("val", "test"):
            if f"{split}_top1" in record:
                parts.append(f"{split} {record[f'{split}_top1']:.2f}%")
        parts.append(f"{record['seconds']:.1f}s")
        remaining = self._epochs - record["epoch"]
        if remaining > 0 and self._done > 0:
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
