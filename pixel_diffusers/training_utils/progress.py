"""The training progress bar: tqdm on the local main process, as diffusers' example scripts show it."""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class TrainingProgress:
    """Steps done out of `total` with the loss, learning rate and images per second (all processes) and tqdm's ETA.

    Shown on the local main process only; with `disable=True` (`--disable_progress_bar`) the main process logs a line
    every `log_every` steps instead.
    """

    def __init__(self, accelerator, total: int, state, disable: bool = False, log_every: int = 10):
        self.main = accelerator.is_local_main_process
        self.disabled, self.log_every = disable, log_every
        self.bar = tqdm(total=total, initial=state.step, desc="Steps", disable=disable or not self.main,
                        dynamic_ncols=True)
        self.start, self.start_images = time.perf_counter(), state.images_seen

    def update(self, step: int, images_seen: int, logs: dict) -> None:
        """Moves the bar to `step` and shows `logs`' loss and lr with the throughput since the bar was created."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        images_per_second = (images_seen - self.start_images) / elapsed
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs['lr']:.3g}", img_s=f"{images_per_second:.1f}")
        if self.disabled and self.main and (step % self.log_every == 0 or step == 1):
            shown = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
            logger.info("step %d: %s images/s=%.1f", step, shown, images_per_second)

    def close(self, step: int) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.close()
