"""A case: one papermill execution of one notebook with one parameter set, and its id.

The id is a readable slug (the case's name and the values its grid varies) plus a short hash of
the notebook and every parameter, so two cases never share an id and the same case always gets
the same one: on another machine, in another shard, after a crash. ``out_dir`` and ``cache_dir``
are not in the hash (the runner sets them inside ``--out DIR``), so moving DIR keeps the ids.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

_SLUG_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
SLUG_MAX = 60


@dataclass(frozen=True)
class Case:
    """notebook: its path under the grid's notebook folder, without ``.ipynb`` (e.g. ``grids/run_protocol``).
    parameters: what papermill injects (before the runner adds ``out_dir``/``cache_dir``).
    varying: the parameter names the grid crosses (they make the slug readable).
    name: an optional label from the grid file, first in the slug.
    """

    notebook: str
    parameters: Mapping[str, Any]
    varying: tuple[str, ...] = ()
    name: str | None = None
    id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", dict(self.parameters))
        object.__setattr__(self, "id", case_id(self.notebook, self.parameters, self.varying, self.name))

    @property
    def stem(self) -> str:
        """The notebook's file name without folder or suffix: the folder of its outputs."""
        return self.notebook.rsplit("/", 1)[-1]

    @property
    def key(self) -> str:
        """Unique over a grid: ``<notebook stem>/<case id>`` (``--only`` patterns match it)."""
        return f"{self.stem}/{self.id}"

    @property
    def label(self) -> str:
        return self.key


def case_id(notebook: str, parameters: Mapping[str, Any], varying: tuple[str, ...] = (),
            name: str | None = None) -> str:
    """``<slug>-<8 hex>``: e.g. ``miniworld_shape_largest-shots16-seed1-3f9a0c21``."""
    parts = [str(name)] if name else []
    for key in varying:
        value = parameters[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(text if isinstance(value, str) else f"{key}{text}")
    slug = _SLUG_CHARS.sub("_", "-".join(parts)).strip("_-")[:SLUG_MAX] or "default"
    digest = hashlib.sha256(json.dumps([notebook, dict(parameters)], sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"
