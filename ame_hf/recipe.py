"""The recipe of a merge: what determines its weights. Its short digest stamps every shard; its YAML
form (`ame_config.yaml`) is written into every output and read back by `merge --config`."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from .config import AmeConfig
from .records import Ingredient


def recipe_digest(config: AmeConfig, ingredients: Sequence[Ingredient], pivot: Any) -> str:
    """A short hash of everything that determines the weights (stamped into every shard)."""
    payload = json.dumps({"config": config.to_dict(), "ingredients": [i.identity for i in ingredients],
                          "pivot": pivot.identity if isinstance(pivot, Ingredient) else pivot},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
