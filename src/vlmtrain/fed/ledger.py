"""A site's privacy ledger: every DP-SGD step ever run on its dataset, on the site's own disk.

A SuperNode's memory dies with its process, and every round of every run on the same patients must compose, so the
accountant's history lives in `SITE/privacy_ledger.json`, keyed by the dataset (`sites.dataset_key`). ε is
Opacus' accountant over the whole history (RDP composes by adding the (σ, q, steps) terms). A round that would
push ε past the site's budget is refused before any gradient is computed.

The file is replaced atomically (`vlmtrain.atomic`: a temporary file, fsync, `os.replace`): a site killed mid-write
keeps the previous ledger, never a torn one. A round is charged after its training finishes and before its reply is
sent; a site killed before the charge has released nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmtrain.atomic import write_json
from vlmtrain.errors import VlmtrainError

FORMAT = "vlmtrain-fed-ledger/1"


class BudgetExceeded(VlmtrainError):
    """A round whose charge would take the site's ε past its budget (the site refuses the round)."""


def epsilon_of(entries: list[dict], delta: float, accountant: str = "rdp") -> float:
    """ε at δ of a list of {noise_multiplier, sample_rate, steps} entries, by Opacus' accountant."""
    from opacus.accountants import create_accountant

    if not entries:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    return float(acc.get_epsilon(delta=delta))


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict:
        if not self.path.is_file():
            return {"format": FORMAT, "datasets": {}}
        data = json.loads(self.path.read_text())
        if data.get("format") != FORMAT:
            raise VlmtrainError(f"{self.path}: format: expected {FORMAT}, found {data.get('format')!r}")
        return data

    def entries(self, key: str) -> list[dict]:
        return self.read()["datasets"].get(key, {}).get("entries", [])

    def find(self, key: str, run: str, rnd: int) -> dict | None:
        return next((e for e in self.entries(key) if e["run"] == run and e["round"] == rnd), None)

    def epsilon(self, key: str, delta: float, accountant: str = "rdp") -> float:
        return epsilon_of(self.entries(key), delta, accountant)

    def check(self, key: str, planned: dict, delta: float, budget: float, accountant: str = "rdp") -> float:
        """ε after the planned round; raises BudgetExceeded when it would pass `budget`."""
        after = epsilon_of(self.entries(key) + [planned], delta, accountant)
        if after > budget:
            raise BudgetExceeded(f"privacy budget: this round would bring the dataset's ε to {after:.4f} at "
                                 f"δ={delta:g}, over the site's budget {budget:g} ({self.path}); round refused")
        return after

    def charge(self, key: str, entry: dict, delta: float, accountant: str = "rdp") -> float:
        """Append one round's (σ, q, steps) with its run id and round; returns ε after it."""
        data = self.read()
        ds = data["datasets"].setdefault(key, {"delta": delta, "accountant": accountant, "entries": []})
        if ds["delta"] != delta or ds["accountant"] != accountant:
            raise VlmtrainError(f"{self.path}: dataset {key[:12]} is accounted at δ={ds['delta']} with "
                                f"{ds['accountant']}; this run asks δ={delta} with {accountant}")
        ds["entries"].append(dict(entry))
        ds["entries"][-1]["epsilon_after"] = epsilon_of(ds["entries"], delta, accountant)
        write_json(self.path, data, indent=1)
        return ds["entries"][-1]["epsilon_after"]
