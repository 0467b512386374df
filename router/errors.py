"""Errors the routing core raises for bad configuration or input."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
