"""The `vlmtrain` command: thin verbs over the packages (no logic of its own)."""
