"""The training loop shared by ``compress train`` and every distillation stage.

Plain functions over Hugging Face Accelerate, in the style of torchvision's
``references/classification`` and accelerate's ``complete_cv_example``:
:func:`train_one_epoch`, :func:`evaluate`, and :func:`fit` which runs the
epochs of one model with its guides, saves an Accelerate state after every
epoch and resumes from it.

Determinism: the data order comes from :class:`~compressor.data.EpochSampler`
(seed, epoch); augmentation and guide dropping draw from a generator seeded by
(stage seed, epoch, step). Nothing depends on wall-clock or on how many epochs
ran in this process, so a resumed run is bit-identical to an uninterrupted one
on the same CPU machine.

Ctrl-C (single process): the first one is deferred to the end of the running
step; :func:`fit` then saves the state *inside* the epoch (the step reached and
the epoch's running sums) and raises ``KeyboardInterrupt``. A resume skips the
steps already done in the batch sampler (Accelerate's ``skip_first_batches``: a
streamed split does not decode them) and keeps the step numbers that seed
augmentation, so nothing but the running step is lost. A second Ctrl-C stops at once; with
several processes the state is saved after every epoch only. SIGTERM is handled
the same way (a scheduler's preemption or time limit, Kubernetes' eviction,
``timeout``: each sends it and waits before SIGKILL) and raises
:class:`~compressor.errors.Terminated`, a ``KeyboardInterrupt`` the CLI ends with
exit code 143.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .bn_recalibration import random_state_kept
from .config import OptimConfig
from .data import augment_batch, batch_augmentation, normalize
from .errors import CompressError, Terminated
from .fileio import append_jsonl, read_jsonl, write_text
from .guides import GuideLogitCache, GuideSet
from .losses import dgkd_loss, guides_kd_loss, kd_weight_at, kept_guides, with_unlabeled
from .progress import Progress


class TrainingDiverged(CompressError):
    """The loss became NaN/inf; nothing is written for the stage."""


def divergence_check_interval(device) -> int:
    """Steps between reads of the on-device NaN/inf flag.

    Reading it makes the host wait for the device; on a GPU that stall costs
    more than the step, so it is read every 32 steps (and at the end of the
    epoch). On the CPU the read is free and it is checked every step, so a
    diverged loss is never stepped.
    """
    return 1 if torch.device(device).type == "cpu" else 32


def _test_nan_hook(accelerator, epoch: int, step: int) -> bool:
    """Test hook: ``COMPRESS_TEST_NAN_AT=RANK:STEP`` makes that process's loss NaN at that
    step of the first epoch (tests/test_multiprocess.py: one rank diverging stops all)."""
    spec = os.environ.get("COMPRESS_TEST_NAN_AT")
    if not spec:
        return False
    rank, at = (int(v) for v in spec.split(":"))
    return epoch == 0 and step == at and accelerator.process_index == rank


def raise_if_diverged(accelerator, bad: torch.Tensor, *, epoch: int, lr: float) -> None:
    """Stop every process together when any process saw a non-finite loss.

    ``bad`` is this process's ``[first bad step or -1, that loss]`` kept on the
    device; it is gathered from all processes (one small collective at the same
    step everywhere), so a NaN on one rank raises :class:`TrainingDiverged` on
    every rank instead of leaving the others waiting in the next all-reduce.
    """
    world = accelerator.gather(bad.view(1, 2)).view(-1, 2).cpu() if accelerator.num_processes > 1 else bad.view(1, 2).cpu()
    hits = [(rank, int(row[0]), float(row[1])) for rank, row in enumerate(world) if row[0] >= 0]
    if not hits:
        return
    rank, step, value = min(hits, key=lambda h: h[1])
    where = f" in process {rank} of {accelerator.num_processes}" if accelerator.num_processes > 1 else ""
    raise TrainingDiverged(
        f"training diverged: loss is {value} at epoch {epoch + 1}, step {step + 1}{where}; "
        f"lower the learning rate (--lr, now {lr:g}) or use --mixed-precision no"
    )


def augmentation_generator(aug_seed: int, epoch: int, step: int, accelerator) -> torch.Generator:
    """The crop/flip draws for one batch: seeded by (seed, epoch, step) and, with several
    processes, the process index, so ranks draw differently yet reproducibly. A single
    process keeps the seeds of earlier versions (same augmented batches)."""
    if accelerator is not None and accelerator.num_processes > 1:
        return seeded_generator(aug_seed, epoch, step, "rank", accelerator.process_index)
    return seeded_generator(aug_seed, epoch, step)


def stable_seed(*parts) -> int:
    """A seed mixed from ints and strings, stable across processes and runs."""
    acc = 0x9E3779B9
    for p in parts:
        value = zlib.crc32(p.encode()) if isinstance(p, str) else int(p)
        acc = (acc * 1_000_003 + value) % (2**61 - 1)
    return acc % (2**31 - 1)  # small enough for samplers that mix it further


def seeded_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def lr_at_epoch(cfg: OptimConfig, epoch: float, epochs: int) -> float:
    """Learning rate at (fractional) ``epoch``: linear warmup per step, then the schedule.

    ``cfg`` holds resolved values (:func:`compressor.training_defaults.resolve_training_defaults`).
    The warm-up may be a fraction of an epoch; the cosine follows ``epoch`` per step
    (``0.5·lr·(1 + cos(π·(epoch − warmup)/(epochs − warmup)))``), the step schedule per epoch.
    """
    warmup = float(cfg.warmup_epochs or 0)
    if warmup and epoch < warmup:
        return cfg.lr * min(1.0, (epoch + 1e-3) / warmup)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(epochs - warmup, 1e-6)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(epoch - warmup, span) / span))
    epoch = int(epoch)
    # milestone m decays from epoch ceil(m * epochs) on (never epoch 0): 160 epochs -> 80, 120
    passed = sum(epoch >= max(1, math.ceil(float(m) * epochs - 1e-9)) for m in cfg.milestones)
    return cfg.lr * cfg.gamma ** passed


RESUME_FILE = "resume.json"


@dataclass
class ResumeState:
    """The epochs done, saved as ``state/resume.json`` beside Accelerate's state.

    Plain JSON on purpose: Accelerate's ``register_for_checkpointing`` pickles
    custom objects and unpickles them with ``weights_only=False``, so a crafted
    run directory could run code on ``--resume``. JSON cannot.
    """

    epoch: int = 0
    best_top1: float = -1.0
    stage: str = ""
    step: int = 0        # steps done in epoch ``epoch`` when Ctrl-C saved the state mid-epoch
    partial: dict = field(default_factory=dict)  # that epoch's running sums (see train_one_epoch)
    num_processes: int = 1  # the world that saved it: another one changes the batches (refused)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "best_top1": self.best_top1, "stage": self.stage, "step": self.step,
                "partial": json.dumps(self.partial), "num_processes": self.num_processes}

    def save(self, state_dir: Path) -> None:
        write_text(Path(state_dir) / RESUME_FILE, json.dumps(self.state_dict()) + "\n")

    def load(self, state_dir: Path) -> None:
        path = Path(state_dir) / RESUME_FILE
        if not path.is_file():
            raise ValueError(f"{RESUME_FILE} is missing (a state saved by an older version?)")
        self.load_state_dict(json.loads(path.read_text()))

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.best_top1 = float(state["best_top1"])
        self.stage = str(state.get("stage", ""))
        self.step = int(state.get("step", 0))
        self.partial = json.loads(state.get("partial") or "{}")
        self.num_processes = int(state.get("num_processes", 1))


def _check_rng_state(state_path, process_index: int) -> None:
    """Accelerate skips a damaged RNG state with a log line and resumes with other random numbers
    (other augmentations, another shuffle): refuse instead (the caller turns this into one line)."""
    from accelerate.utils import load

    path = Path(state_path) / f"random_states_{process_index}.pkl"
    if not path.is_file():
        raise ValueError(f"the random number state {path.name} is missing")
    try:
        states = load(str(path))
    except Exception as exc:  # noqa: BLE001 -- any reader error: damaged
        raise ValueError(f"the random number state {path.name} is damaged ({type(exc).__name__})") from None
    if not isinstance(states, dict) or not {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states):
        raise ValueError(f"the random number state {path.name} is incomplete")


class EpochInterrupted(Exception):
    """Ctrl-C inside an epoch, raised at a step boundary with what is needed to continue there."""

    def __init__(self, steps_done: int, partial: dict):
        super().__init__(f"interrupted after step {steps_done}")
        self.steps_done, self.partial = steps_done, partial


class DeferredStop:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only sets :attr:`hit` (checked at step
    boundaries); a second one raises at once. A signal is taken over only where its handler is
    the default one (SIGINT: Python's ``KeyboardInterrupt``; SIGTERM: ``SIG_DFL``, which ends the
    process) -- never from a framework that installed its own -- and only in the main thread of a
    single process. Leaving the block with :attr:`hit` set raises :meth:`interrupt`, so a stop
    request is never swallowed."""

    _NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.hit: int | None = None   # the first signal received
        self._previous: dict = {}

    @staticmethod
    def _stop_for(signum) -> KeyboardInterrupt:
        return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def interrupt(self) -> KeyboardInterrupt:
        """What to raise once the state is saved: :class:`Terminated` after SIGTERM (exit 143)."""
        return self._stop_for(self.hit)

    def _handle(self, signum, frame):
        if self.hit is not None:
            raise self._stop_for(signum)
        self.hit = signum
        name = self._NAMES[signum]
        print(f"\n{name}: saving the training state after the running step ({name} again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if self.hit is not None and exc_type is None:
            raise self.interrupt()
        return False


@dataclass
class LossSettings:
    temperature: float = 5.0
    kd_weight: float = 1.0
    drop_guides: int = 0
    kd_reduction: str = "sum"
    kd_weighting: str = "uniform"  # uniform | confidence (losses.dgkd_loss)
    kd_logits: str = "raw"  # raw | standardized (losses.kd_loss_per_sample)
    kd_warmup_epochs: float = 0.0  # λ ramps from 0 over these epochs (losses.kd_weight_at)


@dataclass
class FitResult:
    model: nn.Module
    final: dict
    best_top1: float
    seconds: float
    epochs_run: int
    history: list = field(default_factory=list)


def check_compile_available(device) -> None:
    """Refuse ``--compile`` up front where torch.compile cannot work.

    Its default backend (inductor) writes and builds C++ for the CPU, so a machine
    without a C++ compiler would fail at the first step with a long traceback.
    """
    if device.type != "cpu":
        return
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if not any(shutil.which(n) for n in names):
        raise CompressError("--compile on the CPU needs a C++ compiler (torch.compile builds C++ kernels) and none "
                            f"was found ({', '.join(names)}); install one (e.g. apt install g++) or drop --compile")


def compile_for_training(module: nn.Module) -> nn.Module:
    """``torch.compile(module)``: the wrapper shares the module's parameters.

    Only the forward/backward of training steps and guide inference go through the
    wrapper; Accelerate keeps the plain module, so saved states, checkpoints and the
    per-epoch evaluation (eval mode, another batch size: it would recompile) use it
    unchanged. Compilation is lazy: a guide whose logits all come from the cache is
    never compiled. Measured cost and gain: docs/performance.md.
    """
    return torch.compile(module)


def _prepare_guides(guides: Sequence[nn.Module], device, channels_last: bool,
                    caches: Sequence[GuideLogitCache | None] | None, compile: bool = False,
                    autocast=None) -> GuideSet:
    moved = []
    for g in guides:
        g = g.to(device)
        if channels_last:
            g = g.to(memory_format=torch.channels_last)
        moved.append(compile_for_training(g) if compile else g)
    return GuideSet(moved, caches, autocast=autocast)


def _to_input(images, mean, std, channels_last: bool):
    x = normalize(images, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_one_epoch(accelerator, model, guides: GuideSet, loader, optimizer, *, cfg: OptimConfig, loss_cfg: LossSettings,
                    mean, std, epoch: int, stage_seed: int, aug_seed: int | None = None,
                    progress: Progress | None = None, start_step: int = 0, partial: dict | None = None,
                    stop_requested=None, epochs: int | None = None, unlabeled=None,
                    unlabeled_guides: GuideSet | None = None) -> dict:
    """One pass over ``loader``; returns mean loss terms and training top-1.

    ``unlabeled`` (a :class:`compressor.data.unlabeled.UnlabeledStream`): every step also takes
    an unlabeled batch; the student runs on both at once (one forward, BatchNorm over both), the
    kept guides (the same draw as the labelled batch) label it through ``unlabeled_guides`` (their
    own logit caches), and its ``λ_t·`` :func:`~compressor.losses.guides_kd_loss` joins the step's loss
    as a mean over all the step's images, ``(B·L_labelled + U·λ_t·KD_unlabeled) / (B + U)``
    (``train_kd_unlabeled`` is its mean). The labelled batches define the epoch.

    ``epochs`` is the run's length (the cosine's span; default ``epoch + 1``).

    ``start_step``/``partial`` continue an epoch saved mid-way (steps before
    ``start_step`` are skipped, the running sums start from ``partial``); when
    ``stop_requested()`` turns true after a step, :class:`EpochInterrupted` is raised
    carrying both.

    Augmentation draws from a generator seeded by (``aug_seed``, epoch, step) and
    guide dropping from one seeded by (``stage_seed``, epoch, step): with a shared
    ``aug_seed`` every stage of a chain sees exactly the same augmented batches.
    """
    aug_seed = stage_seed if aug_seed is None else aug_seed
    model.train()
    device = accelerator.device
    partial = partial or {}
    sum_keys = ("loss", "ce", "kd") + (("kd_unlabeled",) if unlabeled is not None else ())
    sums = {k: torch.tensor(float(partial.get("sums", {}).get(k, 0.0)), device=device) for k in sum_keys}
    correct = torch.tensor(float(partial.get("correct", 0.0)), device=device)
    seen = int(partial.get("seen", 0))
    if progress is not None and seen:
        progress.resumed_in_epoch(seen)
    guide_uses = list(partial.get("guide_uses", [0] * len(guides)))
    # The lr moves every step during the warm-up and under the cosine (see lr_at_epoch).
    warmup_steps = len(loader) if epoch < float(cfg.warmup_epochs or 0) or cfg.schedule == "cosine" else 0
    check_every = divergence_check_interval(device)
    bad = torch.tensor([-1.0, 0.0], device=device)  # [first step with a non-finite loss, its value]
    step = start_step - 1
    batches = loader
    if start_step:  # resumed mid-epoch: skip the finished batches in the sampler, without loading them
        batches = accelerator.skip_first_batches(loader, start_step)
    # the unlabeled batches of this epoch's steps (a pure function of seed, epoch and step)
    unlabeled_batches = unlabeled.epoch(epoch, len(loader), start_step) if unlabeled is not None else None
    for step, (images, labels) in enumerate(batches, start=start_step):
        if warmup_steps:  # warmup raises the lr every step, not every epoch; so does the cosine
            for group in optimizer.param_groups:
                group["lr"] = lr_at_epoch(cfg, epoch + step / warmup_steps, epochs or epoch + 1)
        batch_aug = batch_augmentation(cfg.augment)
        if batch_aug is not None and not getattr(loader.dataset, "augments", False):
            images = augment_batch(images, augmentation_generator(aug_seed, epoch, step, accelerator), **batch_aug)
        x = _to_input(images, mean, std, cfg.channels_last)
        kept = kept_guides(len(guides), loss_cfg.drop_guides, seeded_generator(stage_seed, epoch, step))
        guide_logits = guides.logits(kept, x, epoch, step, accelerator.autocast)
        x_unlabeled = None
        if unlabeled_batches is not None:
            x_unlabeled = _unlabeled_input(next(unlabeled_batches), unlabeled, cfg, mean, std, device,
                                           aug_seed=aug_seed, epoch=epoch, step=step, accelerator=accelerator)
            guide_logits_u = (unlabeled_guides or guides).logits(kept, x_unlabeled, epoch, step, accelerator.autocast)
        for i in kept:
            guide_uses[i] += 1
        with accelerator.accumulate(model):
            kd_weight = kd_weight_at(loss_cfg.kd_weight, epoch + step / max(len(loader), 1), loss_cfg.kd_warmup_epochs)
            with accelerator.autocast():
                if x_unlabeled is None:
                    logits = model(x)
                else:  # one forward over both batches: BatchNorm sees them together
                    both = model(torch.cat([x, x_unlabeled]))
                    logits, logits_u = both[: x.shape[0]], both[x.shape[0]:]
            terms = dgkd_loss(logits, guide_logits, labels, temperature=loss_cfg.temperature,
                              kd_weight=kd_weight, reduction=loss_cfg.kd_reduction,
                              label_smoothing=float(cfg.label_smoothing or 0.0), weighting=loss_cfg.kd_weighting,
                              logits=loss_cfg.kd_logits)
            if x_unlabeled is not None:
                terms["kd_unlabeled"] = guides_kd_loss(logits_u, guide_logits_u, temperature=loss_cfg.temperature,
                                                          reduction=loss_cfg.kd_reduction, logits=loss_cfg.kd_logits)
                terms["loss"] = with_unlabeled(terms["loss"], terms["kd_unlabeled"], n_labelled=logits.shape[0],
                                               n_unlabeled=logits_u.shape[0], kd_weight=kd_weight)
            loss = terms["loss"]
            if _test_nan_hook(accelerator, epoch, step):
                loss = loss * float("nan")
            # Stays on the device: no host sync here (see divergence_check_interval).
            first = (bad[0] < 0) & ~torch.isfinite(loss.detach())
            bad = torch.where(first, torch.stack([torch.tensor(float(step), device=device),
                                                  loss.detach().float()]), bad)
            checked = (step + 1) % check_every == 0
            if checked:
                raise_if_diverged(accelerator, bad, epoch=epoch, lr=optimizer.param_groups[0]["lr"])
            accelerator.backward(loss)
            if cfg.grad_clip and accelerator.sync_gradients:  # bounds a blow-up that stays finite
                accelerator.clip_grad_norm_(model.parameters(), float(cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        n = labels.shape[0]
        seen += n
        for key in sums:
            sums[key] += terms[key].detach().float() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        if progress is not None:  # the shown loss is read only when the flag is read anyway
            progress.update(n, loss=float(terms["loss"].detach()) if checked else None)
        if stop_requested is not None and accelerator.sync_gradients and stop_requested():
            raise_if_diverged(accelerator, bad, epoch=epoch, lr=optimizer.param_groups[0]["lr"])
            raise EpochInterrupted(step + 1, {"sums": {k: float(v) for k, v in sums.items()},
                                              "correct": float(correct), "seen": seen, "guide_uses": guide_uses})
    raise_if_diverged(accelerator, bad, epoch=epoch, lr=optimizer.param_groups[0]["lr"])
    totals = accelerator.reduce(torch.stack([*sums.values(), correct, torch.tensor(float(seen), device=device)]),
                                reduction="sum")
    n_all = max(float(totals[-1]), 1.0)
    out = {f"train_{k}": float(v) / n_all for k, v in zip(sums, totals[:len(sums)])}
    out["train_top1"] = 100.0 * float(totals[len(sums)]) / n_all
    out["guide_uses"] = guide_uses
    out["steps"] = step + 1 if seen else 0  # optimisation micro-steps of this process
    return out


def _unlabeled_input(images, unlabeled, cfg: OptimConfig, mean, std, device, *, aug_seed: int, epoch: int,
                     step: int, accelerator):
    """An unlabeled batch as the model takes it: on the device, augmented like a labelled batch
    (cifar: the batch crop + flip, from its own generator seeded by (seed, "unlabeled", epoch, step,
    process); imagenet: already done per sample by the loader), normalised."""
    images = images.to(device, non_blocking=True)
    batch_aug = batch_augmentation(cfg.augment)
    if batch_aug is not None and not unlabeled.augments:
        rank = accelerator.process_index if accelerator is not None else 0
        images = augment_batch(images, seeded_generator(aug_seed, "unlabeled", epoch, step, rank), **batch_aug)
    return _to_input(images, mean, std, cfg.channels_last)


@torch.inference_mode()
def evaluate(accelerator, model, loader, *, mean, std, channels_last: bool = False, autocast: bool = False) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over ``loader``.

    Counted by :class:`compressor.evaluation.Accuracy` (one tie rule for torch and
    ONNX: among equal logits the lowest class index wins). Computed in fp32, as the
    deployed (ONNX) file runs, even when training runs in bf16/fp16 autocast; with
    ``autocast`` in the training precision instead. With ``accelerator=None``
    (plain ``compress eval``) batches are moved to the model's device and nothing is
    gathered; otherwise the loader is a prepared one and results are gathered from
    every process.
    """
    from .evaluation import Accuracy

    model.eval()
    device = next(model.parameters()).device
    forward = model
    if accelerator is not None and not autocast:
        # Accelerate wraps a prepared model's forward in its mixed-precision autocast; run the
        # original forward of the unwrapped module, with autocast off.
        inner = accelerator.unwrap_model(model)
        forward = getattr(inner, "_original_forward", inner)
    acc = Accuracy()
    for images, labels in loader:
        if accelerator is None:
            images, labels = images.to(device), labels.to(device)
        x = _to_input(images, mean, std, channels_last)
        if accelerator is not None and autocast:
            with accelerator.autocast():
                logits = model(x).float()
        else:
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                logits = forward(x).float()
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        acc.update(logits, labels)
    return acc.result()


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm/bias parameters is a common trick; the paper's code decays all.
    # ``cfg`` comes resolved (training_defaults); a bare OptimConfig (benchmarks, tests) gets the old defaults.
    from .training_defaults import LEGACY

    lr = cfg.lr if cfg.lr is not None else LEGACY["lr"]
    wd = cfg.weight_decay if cfg.weight_decay is not None else LEGACY["weight_decay"]
    if (getattr(cfg, "optimizer", None) or LEGACY["optimizer"]) == "adamw":  # decoupled wd, betas (0.9, 0.999)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=wd, nesterov=cfg.nesterov)


def _save_state_atomically(accelerator, state_dir: Path, resume_state: ResumeState) -> None:
    """``save_state`` (+ ``resume.json``) into a temp folder, then swap it in (a crash keeps the old state)."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    old = state_dir.with_name(state_dir.name + ".old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        resume_state.save(tmp)
        if state_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_state(stage_dir: Path) -> Path | None:
    """The saved state to resume from: ``state/``, or ``state.old/`` after a crash mid-swap."""
    for name in ("state", "state.old"):
        p = stage_dir / name
        if p.is_dir() and any(p.iterdir()):
            return p
    return None


def _score_without_rng(accelerator, model, loader, **kw) -> dict:
    """:func:`evaluate` under a forked random state: starting a DataLoader draws its base seed from
    the global generator, and a reported-only score must not move the training's random stream
    (dropout masks: a MobileNetV2 student trained differently with ``--test-every-epoch``)."""
    with random_state_kept(model):
        return evaluate(accelerator, model, loader, **kw)


def fit(accelerator, model: nn.Module, guides: Sequence[nn.Module], train_loader, test_loader, *,
        cfg: OptimConfig, loss_cfg: LossSettings, epochs: int, mean, std, stage_seed: int, stage_dir: Path,
        stage_label: str, resume: bool, progress: Progress, aug_seed: int | None = None,
        guide_caches: Sequence[GuideLogitCache | None] | None = None, eval_split: str = "val",
        unlabeled=None, unlabeled_caches: Sequence[GuideLogitCache | None] | None = None,
        refresh_bn: Callable[[nn.Module], int] | None = None, report_loaders: dict | None = None,
        guide_autocast: Callable | None = None) -> FitResult:
    """Train ``model`` for ``epochs`` from its ``guides``; state saved in ``stage_dir/state``.

    ``guide_autocast``: the guides' autocast context factory where it differs from the training's
    (``accelerator.autocast``): bf16 inference beside fp32 training (``PrecisionChoice.guides``).

    ``unlabeled`` (an :class:`~compressor.data.unlabeled.UnlabeledStream`, with ``guides`` only):
    each step also learns from an unlabeled batch (:func:`train_one_epoch`); ``unlabeled_caches``
    are the guides' logit caches for those batches.

    ``test_loader`` is the per-epoch evaluation split named ``eval_split`` (``val``, or
    ``test`` under the paper's protocol); its metrics are logged as ``<eval_split>_top1`` etc.
    ``report_loaders`` (``{name: loader}``, e.g. the test split for ``--test-every-epoch``) are
    scored right after it and logged as ``<name>_top1`` and ``<name>_loss``: reported only, the
    best epoch and the returned ``final`` are the evaluation split's.

    ``refresh_bn(model)`` (the unwrapped model; returns the batches used) runs before each
    per-epoch evaluation so that the score is not taken with stale BatchNorm statistics: a
    MobileNetV2-0.35 after the first of 3 epochs scored 10.0 % (chance) with its running
    statistics and 18.6 % with statistics recomputed on 5 batches of 16. Running statistics
    do not enter the training forward pass, so the weights' trajectory is unchanged; the
    refreshed statistics are saved with the epoch's state (resume stays exact).
    """
    accelerator.free_memory()  # forget the previous stage's prepared objects
    if cfg.channels_last:  # before prepare(): DDP must wrap (and broadcast) the channels_last parameters
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    report_loaders = {name: accelerator.prepare(loader) for name, loader in (report_loaders or {}).items()}
    guides = _prepare_guides(guides, accelerator.device, cfg.channels_last, guide_caches, compile=cfg.compile,
                             autocast=guide_autocast)
    if not len(guides):
        unlabeled = None  # nobody to label the images (a stage without guides)
    unlabeled_guides = GuideSet(guides.guides, unlabeled_caches, autocast=guide_autocast) if unlabeled is not None else None
    step_model = compile_for_training(model) if cfg.compile else model
    resume_state = ResumeState(stage=stage_label, num_processes=accelerator.num_processes)
    metrics_path = stage_dir / "metrics.jsonl"
    state_path = find_state(stage_dir) if resume else None
    if state_path is not None:
        try:
            resume_state.load(state_path)
        except Exception as exc:
            raise CompressError(f"{stage_label}: the saved training state {state_path} does not load "
                                f"({type(exc).__name__}: {exc}); delete it to restart the stage from its first "
                                f"epoch and resume again: rm -r {state_path}") from None
        if resume_state.num_processes != accelerator.num_processes:
            raise CompressError(
                f"{stage_label}: the saved state was written by {resume_state.num_processes} process(es), this run "
                f"has {accelerator.num_processes} (the batches per step and the steps per epoch would change); "
                f"resume with {resume_state.num_processes} process(es), or delete {state_path} to restart the stage")
        try:
            _check_rng_state(state_path, accelerator.process_index)
            accelerator.load_state(str(state_path))
        except Exception as exc:  # a damaged state folder (saved states are swapped in atomically)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CompressError(f"{stage_label}: the saved training state {state_path} does not load "
                                f"({type(exc).__name__}: {reason}); delete it to restart the stage from its "
                                f"first epoch and resume again: rm -r {state_path}") from None
        if accelerator.is_main_process:
            kept = [r for r in read_jsonl(metrics_path) if r.get("epoch", 0) <= resume_state.epoch]
            write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        where = (f"in epoch {resume_state.epoch + 1}/{epochs} after step {resume_state.step}" if resume_state.step
                 else f"after epoch {resume_state.epoch}/{epochs}")
        accelerator.print(f"  resumed {stage_label} {where}")
    elif accelerator.is_main_process and metrics_path.exists():
        metrics_path.unlink()
    start = time.perf_counter()
    history: list[dict] = []
    final: dict = {}
    stop = DeferredStop(enabled=accelerator.num_processes == 1)
    with stop:
        for epoch in range(resume_state.epoch, epochs):
            lr = lr_at_epoch(cfg, epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_loader.set_epoch(epoch)
            progress.start_epoch(epoch, epochs)
            t0 = time.perf_counter()
            try:
                train_metrics = train_one_epoch(accelerator, step_model, guides, train_loader, optimizer, cfg=cfg,
                                                loss_cfg=loss_cfg, mean=mean, std=std, epoch=epoch,
                                                stage_seed=stage_seed, aug_seed=aug_seed, progress=progress,
                                                start_step=resume_state.step, partial=resume_state.partial,
                                                stop_requested=lambda: stop.hit is not None, epochs=epochs,
                                                unlabeled=unlabeled, unlabeled_guides=unlabeled_guides)
            except EpochInterrupted as stopped:  # Ctrl-C or SIGTERM: keep the steps done so far
                guides.flush()
                if unlabeled_guides is not None:
                    unlabeled_guides.flush()
                resume_state.step, resume_state.partial = stopped.steps_done, stopped.partial
                _save_state_atomically(accelerator, stage_dir / "state", resume_state)
                raise stop.interrupt() from None
            resume_state.step, resume_state.partial = 0, {}
            guides.flush()
            if unlabeled_guides is not None:
                unlabeled_guides.flush()
            record = {"epoch": epoch + 1, "lr": lr, **train_metrics}
            if guide_caches and any(c is not None for c in guide_caches):
                record["guide_cache_hits_misses"] = guides.cache_stats()
            if unlabeled_guides is not None and unlabeled_caches and any(c is not None for c in unlabeled_caches):
                record["unlabeled_cache_hits_misses"] = unlabeled_guides.cache_stats()
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:
                if refresh_bn is not None:
                    record["bn_batches"] = refresh_bn(accelerator.unwrap_model(model))
                test = evaluate(accelerator, model, test_loader, mean=mean, std=std, channels_last=cfg.channels_last)
                record.update({f"{eval_split}_top1": test["top1"], f"{eval_split}_top5": test["top5"],
                               f"{eval_split}_loss": test["loss"]})
                resume_state.best_top1 = max(resume_state.best_top1, test["top1"])
                final = test
                for name, loader in report_loaders.items():
                    scored = _score_without_rng(accelerator, model, loader, mean=mean, std=std,
                                                channels_last=cfg.channels_last)
                    record.update({f"{name}_top1": scored["top1"], f"{name}_loss": scored["loss"]})
            record["seconds"] = time.perf_counter() - t0
            progress.end_epoch(record)
            resume_state.epoch = epoch + 1
            if accelerator.is_main_process:
                append_jsonl(metrics_path, record)
            if accelerator.trackers:  # --log-with tensorboard|wandb|...: one series per stage
                accelerator.log({f"{stage_label}/{k}": v for k, v in record.items()
                                 if isinstance(v, (int, float)) and k != "epoch"}, step=epoch + 1)
            _save_state_atomically(accelerator, stage_dir / "state", resume_state)
            history.append(record)
            if stop.hit is not None:  # a stop during evaluation or saving: the finished epoch is saved
                raise stop.interrupt()
    if not final:  # resumed after the last epoch: evaluate what was restored
        final = evaluate(accelerator, model, test_loader, mean=mean, std=std, channels_last=cfg.channels_last)
        resume_state.best_top1 = max(resume_state.best_top1, final["top1"])
    unwrapped = accelerator.unwrap_model(model)
    if cfg.channels_last:
        unwrapped = unwrapped.to(memory_format=torch.contiguous_format)
    return FitResult(model=unwrapped, final=final, best_top1=resume_state.best_top1,
                     seconds=time.perf_counter() - start, epochs_run=epochs - (history[0]["epoch"] - 1 if history else epochs),
                     history=history)
