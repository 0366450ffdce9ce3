"""What a datamodule tells the model about its data (classes, channels, box counts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    """Facts a model is built from, read off the training split at setup.

    ``class_names`` excludes background; for detection, label ``i`` (1-based) is
    ``class_names[i - 1]``. ``class_counts`` holds the training split's number of
    samples (classification) or boxes (detection) per class, in the same order.
    ``labelling`` states the rule that made the labels where it is a setting and the class
    names do not show it (ELPV: "defective if p ∈ {2/3, 1}"); None elsewhere.
    """

    task: str
    class_names: tuple[str, ...]
    in_channels: int
    class_counts: tuple[int, ...] = field(default_factory=tuple)
    image_size: tuple[int, int] | None = None
    labelling: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | DatasetInfo) -> DatasetInfo:
        if isinstance(data, DatasetInfo):
            return data
        data = dict(data)
        for key in ("class_names", "class_counts", "image_size"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)
