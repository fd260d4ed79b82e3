"""What a load or a scan found: problems with their row and file, and the counts.

Standard library only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# How many problems a summary line or an error message names before "and N more".
FIRST_FEW = 5


@dataclass
class Problem:
    """One bad sample.

    Args:
        where: the row it came from, as a person finds it (``metadata.csv line 4``,
            ``row 17``, ``cats/a.png``).
        file: the image file concerned, when there is one.
        reason: what is wrong with it.
        row: the row of the staged data set that is left out in ``skip`` mode;
            None when only a caption row is dropped and its image stays, or when
            the row never became a sample.
    """

    where: str
    file: str | None
    reason: str
    row: int | None = None

    def __str__(self) -> str:
        file = f" ({self.file})" if self.file and self.file not in self.where else ""
        return f"{self.where}{file}: {self.reason}"


@dataclass
class DataReport:
    """The outcome of :func:`mmtransfer.data.validate` or of a load with ``on_bad_sample``.

    Prints as a short readable report; :meth:`to_dict` gives plain values for a
    run summary.

    Example:
        >>> r = DataReport(source="captions.csv", split=None, num_rows=2, num_captions=3)
        >>> r.ok
        True
    """

    # The data set's name or path.
    source: str
    # The split that was read (None: the whole source).
    split: str | None
    # Samples (images) in the loaded data set, or scanned by validate.
    num_rows: int
    # Captions over those samples (0 for sources without captions).
    num_captions: int = 0
    # Classes of the label column (None: no labels).
    num_classes: int | None = None
    # Images opened and decoded by the scan (0 when verify="none" or built-in).
    checked_images: int = 0
    # How images were checked: "full", "header" or "none".
    verify: str = "full"
    # Every bad sample found, in row order.
    problems: list[Problem] = field(default_factory=list)
    # Samples (or caption rows) left out because on_bad_sample="skip".
    skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def first_problems(self, n: int = FIRST_FEW) -> str:
        """The first ``n`` problems, one per line, and how many more there are."""
        lines = [f"  - {p}" for p in self.problems[:n]]
        if len(self.problems) > n:
            lines.append(f"  ... and {len(self.problems) - n} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        split = f" [{self.split}]" if self.split else ""
        head = f"Data report for '{self.source}'{split}"
        lines = [head, "-" * len(head)]
        lines.append(f"samples:        {self.num_rows}")
        lines.append(f"captions:       {self.num_captions}")
        if self.num_classes is not None:
            lines.append(f"classes:        {self.num_classes}")
        lines.append(f"images checked: {self.checked_images} (verify={self.verify})")
        if self.skipped:
            lines.append(f"skipped:        {self.skipped}")
        if self.ok:
            lines.append("problems:       none")
        else:
            lines.append(f"problems:       {len(self.problems)}")
            lines.extend(f"  - {p}" for p in self.problems[:50])
            if len(self.problems) > 50:
                lines.append(f"  ... and {len(self.problems) - 50} more (see .problems)")
        return "\n".join(lines)
