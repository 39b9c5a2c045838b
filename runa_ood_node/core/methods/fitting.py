"""The training loop the few-shot heads share (TagOOD's projector, UNI-OOD's combiners): plain torch.

:func:`seeded` makes everything random inside it (module init, dropout) depend on one seed without touching
the caller's global RNG; :func:`run_epochs` shuffles with its own generator, steps the optimiser per batch
and returns the per-epoch loss curve; :func:`label_set_warnings` is the check every fit passes
(``base.Method.fit_shots``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, List, Optional

import torch

__all__ = ["seeded", "run_epochs", "label_set_warnings"]

LOG = logging.getLogger(__name__)


def label_set_warnings(method: str, n_classes: int) -> List[str]:
    """What is wrong with fitting ``method``'s head on a label set of ``n_classes`` classes, as warning
    messages (empty: nothing), each also logged with ``logging.warning``. Called once for every method by
    ``base.Method.fit_shots``, the one fitting path.

    One class: every method's loss contrasts a box's class with the other classes (RUNA's Eq. 7 and TagOOD's
    cross-entropy are softmaxes over the K classes, identically 0 for K = 1 with zero gradient; UNI-OOD's
    contrastive loss then pairs every box with the same text and has no wrong text to push away from), so
    the head learns nothing that separates the class from anything else.
    """
    out: List[str] = []
    if int(n_classes) == 1:
        out.append(f"{method} head fitted on a ONE-class label set: its loss has no other class to contrast "
                   "(RUNA's Eq. 7 and TagOOD's cross-entropy are identically 0, UNI-OOD's contrastive loss has no "
                   "negative text), so the head learns nothing that separates ID from OOD; add classes to the "
                   "label set (e.g. the other classes the detector reports) before fine-tuning")
    for msg in out:
        LOG.warning("%s", msg)
    return out


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global CPU RNG seeded by ``seed``, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def run_epochs(n: int, batch: int, epochs: int, seed: int, step: Callable[[torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler=None, progress: bool = False,
               desc: str = "fit") -> List[float]:
    """``epochs`` passes over ``n`` samples in shuffled batches of ``batch``; returns each epoch's
    sample-weighted mean loss.

    Per batch: ``loss = step(idx)`` (``idx`` the batch's sample indices), then ``zero_grad``, ``backward``,
    ``optimizer.step()`` and ``scheduler.step()`` (if any: schedules are per step). The order of the samples
    comes from a private generator seeded with ``seed``. ``progress`` shows a tqdm bar when tqdm is installed.
    """
    gen = torch.Generator().manual_seed(int(seed))
    epoch_iter = range(int(epochs))
    bar: Optional[object] = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = epoch_iter = tqdm(epoch_iter, desc=desc, unit="epoch")
        except ImportError:  # tqdm is optional
            pass
    curve: List[float] = []
    for _ in epoch_iter:
        perm = torch.randperm(int(n), generator=gen)
        total = 0.0
        for start in range(0, int(n), int(batch)):
            idx = perm[start:start + int(batch)]
            loss = step(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * idx.numel()
        curve.append(total / int(n))
        if bar is not None:
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
    if bar is not None:
        bar.close()
    return curve
