"""What this node has, what is reserved, and which GPU ids each reservation holds."""

from __future__ import annotations

import dataclasses

_EPS = 1e-9


@dataclasses.dataclass
class Reservation:
    demand: dict[str, float]
    gpu_ids: list[int]


class Resources:
    def __init__(self, total: dict[str, float]) -> None:
        self.total = dict(total)
        self.available = dict(total)
        # GPU id -> free fraction of that device.
        self._gpus = {i: 1.0 for i in range(int(total.get("GPU", 0)))}

    def feasible(self, demand: dict[str, float]) -> bool:
        """Whether ``demand`` could ever fit on this node, with nothing else running."""
        return all(self.total.get(k, 0.0) + _EPS >= v for k, v in demand.items())

    def try_reserve(self, demand: dict[str, float]) -> Reservation | None:
        if any(self.available.get(k, 0.0) + _EPS < v for k, v in demand.items()):
            return None
        gpu_ids = self._pick_gpus(demand.get("GPU", 0.0))
        if gpu_ids is None:
            return None
        for k, v in demand.items():
            self.available[k] = self.available.get(k, 0.0) - v
        return Reservation(dict(demand), gpu_ids)

    def _pick_gpus(self, amount: float) -> list[int] | None:
        if amount <= 0:
            return []
        if amount < 1:
            # A fraction shares one device: take the fullest one it still fits on.
            fits = [i for i, free in self._gpus.items() if free + _EPS >= amount]
            if not fits:
                return None
            best = min(fits, key=lambda i: self._gpus[i])
            self._gpus[best] -= amount
            return [best]
        whole = [i for i, free in self._gpus.items() if free >= 1 - _EPS]
        if len(whole) < int(amount):
            return None
        chosen = whole[: int(amount)]
        for i in chosen:
            self._gpus[i] = 0.0
        return chosen

    def take(self, demand: dict[str, float]) -> None:
        """Take ``demand`` back whether or not it is free (a task that stopped waiting resumes with its CPUs, as in Ray)."""
        for k, v in demand.items():
            self.available[k] = self.available.get(k, 0.0) - v

    def release(self, reservation: Reservation) -> None:
        for k, v in reservation.demand.items():
            self.available[k] = min(self.total.get(k, 0.0), self.available.get(k, 0.0) + v)
        share = reservation.demand.get("GPU", 0.0)
        for i in reservation.gpu_ids:
            self._gpus[i] = min(1.0, self._gpus[i] + (share if share < 1 else 1.0))
