"""Batches of dataset indices for in-memory data (texts, toy points): shuffled, split across processes, resumable."""

from __future__ import annotations

import torch


class IndexBatches:
    """Endless batches `{"indices": [...]}` over `num_items` items.

    One permutation per epoch drawn from (seed, epoch); the global stream of indices is dealt round-robin to the
    `num_replicas` processes, so every process sees other items. The state is the number of indices handed out.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if num_items < 1:
            raise ValueError("The data holds no item to train on.")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.position = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._order = (epoch, torch.randperm(self.num_items, generator=generator))
        return self._order[1]

    def next(self) -> list[int]:
        flat = (self.position + torch.arange(self.batch_size)) * self.num_replicas + self.rank
        epochs, offsets = flat // self.num_items, flat % self.num_items
        batch = torch.empty_like(flat)
        for epoch in torch.unique_consecutive(epochs).tolist():  # a batch may run into the next epochs
            spans = epochs == epoch
            batch[spans] = self._permutation(epoch)[offsets[spans]]
        self.position += self.batch_size
        return batch.tolist()

    def __len__(self) -> int:
        """Batches per epoch on each process."""
        return max(1, -(-self.num_items // (self.batch_size * self.num_replicas)))

    def __iter__(self):
        while True:
            yield {"indices": self.next()}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
