"""The recipe's `federated:` block (configs/recipes/medical-federated.yaml documents every field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FederatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="the recipe stage the sites train (a DP stage); stages before it run centrally "
                                   "on public data and give the base model every site loads from its disk")
    rounds: int = Field(ge=1, description="federated rounds")
    local_steps: int = Field(ge=1, description="DP-SGD steps a site runs per round")
    sites: dict[str, dict[str, float]] = Field(
        min_length=1, description="site name → share of each modality's patients it holds (the cohort split)")
    min_sites: int | None = Field(None, ge=1, description="quorum: a round aggregates only with this many valid "
                                                          "replies (default: every site)")
    round_timeout_s: float = Field(900.0, gt=0, description="deadline of one round (sampling and replies)")
    epsilon_budget: float = Field(gt=0, description="each site's lifetime ε on its dataset, over every round of "
                                                    "every run (the site's ledger refuses a round past it)")
    strategy: Literal["fedavg"] = "fedavg"
    patients_disjoint: bool = Field(True, description="no patient at two sites: global ε = max over sites "
                                                      "(false: the conservative sum)")
    seed: int = 0

    @field_validator("min_sites")
    @classmethod
    def _quorum(cls, v, info):
        n = len(info.data.get("sites") or {})
        if v is not None and v > n:
            raise ValueError(f"{v} is more than the {n} sites")
        return v

    @field_validator("sites")
    @classmethod
    def _shares(cls, v):
        for site, shares in v.items():
            bad = [m for m, x in shares.items() if x < 0]
            if bad:
                raise ValueError(f"{site}: negative share for {bad}")
        return v

    @property
    def quorum(self) -> int:
        return self.min_sites or len(self.sites)
