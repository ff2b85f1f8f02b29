"""vlmtrain: train vision-language models composed from parts.

Rooms (see ../shared/DESIGN.md): config, model, data, train, privacy, cli. Importing the package is cheap:
torch-heavy modules load only when a verb needs them.
"""

__version__ = "0.1.0"
