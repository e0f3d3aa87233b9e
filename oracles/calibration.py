"""Oracle calibration: how well an automatic oracle agrees with people on changed images.

An invariance figure is only as good as its judge. Given images that people labelled (e.g. Tramèr et
al.'s published MNIST invariance sets) and each image's original label (the test label of the point
it was made from), the calibration counts, over the images the oracle decides (does not abstain on):

- **agreement**: the oracle's label equals people's label;
- **sees-change**: of the images whose people's label differs from the original, the share the oracle
  also labels differently from the original (its recall of real label changes);
- **false-change**: of the images people read as the original digit, the share the oracle calls
  changed (label changes the oracle invents).

Rates come with counts and 95% Wilson intervals, so that a small labelled set shows as one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from invarbench.errors import DataError
from invarbench.oracles.people import majority_sets
from invarbench.oracles.types import ABSTAIN, InvarianceSet, Oracle, load_invariance_sets
from invarbench.statistics import wilson_interval


@dataclass(frozen=True)
class Calibration:
    """Counts of one oracle on one labelled set (see the module docstring for the rates)."""

    labels: str
    items: int
    abstained: int
    agreed: int
    #: Decided images whose people's label differs from the original, and how many of them the oracle saw change.
    changed: int
    saw_change: int
    #: Decided images people read as the original digit, and how many of them the oracle called changed.
    unchanged: int
    called_change: int

    @property
    def decided(self) -> int:
        return self.items - self.abstained

    @property
    def abstention_rate(self) -> float:
        return self.abstained / self.items if self.items else 0.0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.decided if self.decided else None

    @property
    def sees_change(self) -> float | None:
        return self.saw_change / self.changed if self.changed else None

    @property
    def false_change(self) -> float | None:
        return self.called_change / self.unchanged if self.unchanged else None

    def to_dict(self) -> dict:
        """Counts, rates and 95% intervals (what runs, entries and oracle files store)."""
        return {
            **asdict(self),
            "abstention_rate": self.abstention_rate,
            "agreement": self.agreement,
            "agreement_ci95": wilson_interval(self.agreed, self.decided),
            "sees_change": self.sees_change,
            "sees_change_ci95": wilson_interval(self.saw_change, self.changed),
            "false_change": self.false_change,
            "false_change_ci95": wilson_interval(self.called_change, self.unchanged),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def calibrate(
    oracle: Oracle, labelled: InvarianceSet, original_labels: torch.Tensor, *, name: str | None = None
) -> Calibration:
    """The oracle's counts on one set of people-labelled images (``original_labels``: one per image)."""
    if len(original_labels) != len(labelled.labels):
        raise ValueError(f"{len(original_labels)} original labels for {len(labelled.labels)} labelled images")
    judged = oracle.label(labelled.images).cpu()
    people = labelled.labels.cpu()
    original = original_labels.cpu()
    decided = judged != ABSTAIN
    changed = decided & (people != original)
    unchanged = decided & (people == original)
    return Calibration(
        labels=name or labelled.name,
        items=len(people),
        abstained=int((~decided).sum()),
        agreed=int((decided & (judged == people)).sum()),
        changed=int(changed.sum()),
        saw_change=int((changed & (judged != original)).sum()),
        unchanged=int(unchanged.sum()),
        called_change=int((unchanged & (judged != original)).sum()),
    )


def format_rate(count: int, total: int) -> str:
    """``62.2% (23/37) [46.1, 75.9]``: a rate with its counts and 95% interval, for tables."""
    if not total:
        return "- (0/0)"
    low, high = wilson_interval(count, total)
    return f"{100 * count / total:.1f}% ({count}/{total}) [{100 * low:.1f}, {100 * high:.1f}]"


def calibration_summary(report: dict | None) -> str:
    """An oracle's calibration against people's labels in a few words (a run's or an entry's record of
    it), for a table cell."""
    if report is None:
        return "unknown oracle"
    if report.get("exact"):
        return "exact (labelling function or people's labels)"
    calibration = report.get("calibration") or []
    if not calibration:
        return "not calibrated against people's labels"

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    return "; ".join(
        f"{item['labels']}: sees {percent(item['sees_change'])}, false {percent(item['false_change'])}"
        for item in calibration
    )


def calibration_row(calibration: Calibration) -> list[str]:
    """One table row: set, items, abstains, agrees with people, sees-change, false-change."""
    return [
        calibration.labels,
        str(calibration.items),
        format_rate(calibration.abstained, calibration.items),
        format_rate(calibration.agreed, calibration.decided),
        format_rate(calibration.saw_change, calibration.changed),
        format_rate(calibration.called_change, calibration.unchanged),
    ]


CALIBRATION_HEADER = [
    "labelled set",
    "items",
    "abstains",
    "agrees with people",
    "sees change people saw",
    "calls change people did not see",
]


def labelled_sets(source: str | Path) -> list[InvarianceSet]:
    """People-labelled images: a folder in Tramèr et al.'s layout or a labels database of
    ``invarbench label`` (majority labels); set names are prefixed with the source's name."""
    path = Path(source)
    if path.is_file():
        sets = majority_sets(path)
    else:
        sets = load_invariance_sets(path)
    return [replace(item, name=f"{path.resolve().name}/{item.name}") for item in sets]


def calibrate_sets(oracle: Oracle, sets: list[InvarianceSet], test_labels: torch.Tensor) -> list[Calibration]:
    """The oracle's calibration on each set; original labels are the test labels of the sets' points."""
    calibrations = []
    for item in sets:
        if int(item.original_indices.max()) >= len(test_labels) or int(item.original_indices.min()) < 0:
            raise DataError(
                f"labelled set {item.name} refers to test point {int(item.original_indices.max())}, outside the"
                f" {len(test_labels)} test points; check its index file"
            )
        calibrations.append(calibrate(oracle, item, test_labels[item.original_indices]))
    return calibrations
