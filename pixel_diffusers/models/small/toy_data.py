"""2-D toy datasets of smalldiffusion: the Swiss roll and the labelled tree."""

from __future__ import annotations

import math

import numpy as np
import torch


class Swissroll(torch.utils.data.Dataset):
    """``N`` points ``center + scale * (t cos t, t sin t) / tmax`` with ``t = tmin + linspace(0, 1, N) * tmax``.

    As upstream, ``t`` spans ``[tmin, tmin + tmax]`` (not ``[tmin, tmax]``); the README example is
    ``Swissroll(pi / 2, 5 pi, 100)``.
    """

    def __init__(self, tmin: float, tmax: float, N: int, center=(0.0, 0.0), scale: float = 1.0):
        t = tmin + torch.linspace(0, 1, N) * tmax
        self.tmin, self.tmax, self.center, self.scale = tmin, tmax, torch.tensor(center), scale
        self.vals = self.center + scale * torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / tmax

    def __len__(self) -> int:
        return len(self.vals)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.vals[index]

    def distance_to_curve(self, points: torch.Tensor, resolution: int = 20000) -> torch.Tensor:
        """Euclidean distance of each point to the continuous spiral the dataset samples."""
        t = self.tmin + torch.linspace(0, 1, resolution) * self.tmax
        curve = self.center + self.scale * torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / self.tmax
        return torch.cdist(points.float(), curve).min(dim=1).values


class TreeDataset(torch.utils.data.Dataset):
    """A tree of ``branching_factor ** depth`` leaves; each leaf's root-to-leaf polyline is one class.

    At level ``l`` the path of leaf ``i`` passes through radius ``l / depth`` at the angle of the centre of its
    subtree: ``theta = (A * g + (g - 1) / 2) * 2 pi / leaves`` with ``g = b ** (depth - l)`` and ``A = i // g``.
    ``num_samples_per_path`` points are spaced uniformly by arc length along each polyline (ends included).
    Items are ``(point float32 [2], label)``.
    """

    def __init__(self, branching_factor: int = 4, depth: int = 3, num_samples_per_path: int = 30):
        self.num_leaves = branching_factor**depth
        points, labels, self.paths = [], [], []
        for leaf in range(self.num_leaves):
            path = [np.zeros(2)]
            for level in range(1, depth + 1):
                group = branching_factor ** (depth - level)
                theta = ((leaf // group) * group + (group - 1) / 2) * 2 * math.pi / self.num_leaves
                path.append(level / depth * np.array([math.cos(theta), math.sin(theta)]))
            path = np.stack(path)
            self.paths.append(torch.from_numpy(path).float())
            lengths = np.linalg.norm(np.diff(path, axis=0), axis=1)
            cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
            positions = np.linspace(0, cumulative[-1], num_samples_per_path)
            points.append(np.stack([np.interp(positions, cumulative, path[:, k]) for k in range(2)], axis=1))
            labels += [leaf] * num_samples_per_path
        self.points = torch.from_numpy(np.concatenate(points)).float()
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int):
        return self.points[index], int(self.labels[index])

    @property
    def leaf_spacing(self) -> float:
        """Distance between neighbouring leaves (adjacent points on the unit circle): ``2 sin(pi / leaves)``."""
        return 2 * math.sin(math.pi / self.num_leaves)

    def distance_to_paths(self, points: torch.Tensor) -> torch.Tensor:
        """``[N, leaves]``: distance of each point to every root-to-leaf polyline.

        Leaves that share a trunk segment get bitwise equal distances for a point nearest to that segment.
        """
        paths = torch.stack(self.paths)  # [leaves, depth + 1, 2]
        start, segment = paths[:, :-1], paths[:, 1:] - paths[:, :-1]  # [leaves, depth, 2]
        offset = points.float()[:, None, None] - start  # [N, leaves, depth, 2]
        u = ((offset * segment).sum(-1) / segment.square().sum(-1)).clamp(0, 1)
        return torch.linalg.norm(offset - u[..., None] * segment, dim=-1).amin(dim=-1)

    def distance_to_path(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Distance of each point to the root-to-leaf polyline of its label."""
        return self.distance_to_paths(points).gather(1, torch.as_tensor(labels).reshape(-1, 1))[:, 0]

    def on_leaf(self, points: torch.Tensor, labels: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
        """Whether each point lies on its label's leaf: that leaf's path is (one of) the nearest of all paths (a point
        on a shared trunk is on every leaf below it) and the point is within ``tolerance`` of it (defaults to half
        the leaf spacing, where a leaf tip's own neighbourhood ends).
        """
        distances = self.distance_to_paths(points)
        own = distances.gather(1, torch.as_tensor(labels).reshape(-1, 1))[:, 0]
        tolerance = self.leaf_spacing / 2 if tolerance is None else tolerance
        return (own <= distances.amin(dim=1)) & (own < tolerance)
