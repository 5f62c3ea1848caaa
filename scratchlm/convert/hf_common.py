"""What the per-family converters share: reading an HF `config.json` with the class defaults.

`save_pretrained` writes every field, but older files and hand-written ones leave out the fields
at their default, so each family passes the defaults of its HF config class. Every refusal names
the file and the field, and says what our model would need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scratchlm.errors import UserError


@dataclass
class HFConfig:
    """One HF config.json: its fields, the class defaults for absent ones, and where it came from."""

    fields: dict[str, Any]
    defaults: dict[str, Any]
    where: str  # the config.json path, for messages

    def get(self, key: str) -> Any:
        # An explicit null stays null: HF reads it as "derive" (head_dim) or "off" (sliding_window).
        return self.fields[key] if key in self.fields else self.defaults.get(key)

    def int(self, key: str) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{self.where}: {key}={value!r} is not a positive integer", fix="fix config.json")
        return value

    def refuse(self, key: str, value: Any, why: str) -> UserError:
        """The error for a setting our models cannot express."""
        return UserError(f"{self.where}: {key}={value!r} cannot be converted: {why}")

    def require(self, key: str, allowed: tuple, why: str) -> Any:
        value = self.get(key)
        if value not in allowed:
            raise self.refuse(key, value, why)
        return value
