"""Errors a user can act on. The CLI prints them as one line and exits with their code, never a traceback."""


class VlmtrainError(Exception):
    """A user-facing failure (missing file, incompatible model): exit code 1."""

    exit_code = 1


class ConfigError(VlmtrainError):
    """An invalid configuration: exit code 2. `problems` holds one `field: message` line per bad field."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))
