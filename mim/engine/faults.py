"""Fault injection, to see recovery happen (the tests use it; so can anyone): the environment
variable MIM_FAULT lists faults as `KIND@STEP[:rankR]`, separated by commas:

    nan@40          the loss of step 40 becomes NaN on every rank (so do its gradients)
    spike@40:rank1  rank 1's loss of step 40 is multiplied by SPIKE_FACTOR
    hang@25:rank0   rank 0 stops answering at step 25 (it sleeps, holding its peers in the next collective)

Each listed fault fires once in a run: the first time the step is run after the faults listed
before it of the same kind and step (`nan@40,nan@40` fires on the first two passes over step 40,
as a run that rolls back meets it again). What has fired is recorded per rank in
RUN_DIR/faults/rank-NNNNN.json, so a restarted or requeued run does not fire it again. Unset, this
module does nothing at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mim.errors import UserInputError
from mim.files import atomic_write_text

log = logging.getLogger(__name__)
FAULT_VARIABLE = "MIM_FAULT"
KINDS = ("nan", "spike", "hang")
SPIKE_FACTOR = 50.0
_ITEM = re.compile(r"^(?P<kind>[a-z]+)@(?P<step>\d+)(?::rank(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int  # 1-based, as the log counts steps
    rank: int | None  # None: every rank


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _ITEM.match(item)
        if match is None or match["kind"] not in KINDS or int(match["step"]) < 1:
            raise UserInputError(
                f"{FAULT_VARIABLE}: cannot read {item!r}; expected KIND@STEP[:rankR] with KIND one of "
                f"{', '.join(KINDS)} and STEP >= 1, e.g. nan@40 or hang@25:rank1"
            )
        rank = match["rank"]
        faults.append(Fault(match["kind"], int(match["step"]), None if rank is None else int(rank)))
    return faults


class Faults:
    def __init__(self, faults: list[Fault], run_dir: Path, rank: int) -> None:
        self.rank = rank
        self.mine = [(i, f) for i, f in enumerate(faults) if f.rank in (None, rank)]
        self.path = Path(run_dir) / "faults" / f"rank-{rank:05d}.json"
        self.fired: list[int] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def _fire(self, step: int, kind: str) -> bool:
        for index, fault in self.mine:
            if index not in self.fired and fault.step == step and fault.kind == kind:
                self.fired.append(index)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path, json.dumps(self.fired))
                log.warning("%s: injecting %s at step %d on rank %d", FAULT_VARIABLE, kind, step, self.rank)
                return True
        return False

    def loss(self, step: int, micro: int, loss: torch.Tensor) -> torch.Tensor:
        """`loss` of micro-batch `micro` of step `step` (1-based), with this step's fault if one is due."""
        if micro == 0 and self._fire(step, "hang"):
            while True:  # stops answering; only the watchdog or a kill ends it
                time.sleep(1.0)
        if micro == 0 and self._fire(step, "nan"):
            return loss * float("nan")
        if micro == 0 and self._fire(step, "spike"):
            return loss * SPIKE_FACTOR
        return loss


def requested_faults() -> list[Fault]:
    """What MIM_FAULT asks for (a UserInputError where it cannot be read: checked before any work)."""
    return parse_faults(os.environ.get(FAULT_VARIABLE, ""))


def injected_faults(run_dir: Path, rank: int) -> Faults | None:
    """The faults MIM_FAULT asks for, or None where it is unset or empty."""
    faults = requested_faults()
    return Faults(faults, run_dir, rank) if faults else None
