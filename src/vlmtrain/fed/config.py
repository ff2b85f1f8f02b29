"""The recipe's `federated:` block (configs/recipes/medical-federated.yaml documents every field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


MIN_SITES_FOR_SECAGG = 3  # with 2 sites the sum and one's own arrays give the other's
MIN_SITES_FOR_SITE_DP = 10  # below this, site-level DP's noise on the mean (σ·C/sites) swamps the update


class SiteDPConfig(BaseModel):
    """Site-level central DP (Flower's `DifferentialPrivacyServerSideFixedClipping`): each site's update clipped to
    `clipping_norm`, Gaussian noise σ·C/k on the unweighted mean of the k replies; σ is planned with Opacus for
    `target_epsilon` over the run's rounds with every site in every round (sampling rate 1: no amplification)."""

    model_config = ConfigDict(extra="forbid")

    target_epsilon: float = Field(gt=0, description="site-level ε of the run (a whole site's data, not a patient)")
    delta: float = Field(1e-5, gt=0, lt=1)
    clipping_norm: float = Field(gt=0, description="L2 bound of one site's update (its arrays − the global arrays)")
    force: bool = Field(False, description=f"run with fewer than {MIN_SITES_FOR_SITE_DP} sites anyway")


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
    strategy: Literal["fedavg", "fedprox", "fedadam"] = Field(
        "fedavg", description="Flower's strategy on the coordinator: fedavg (weighted mean), fedprox (FedAvg + a "
                              "proximal term μ/2·‖w − w_global‖² in every site's local objective), fedadam (the "
                              "weighted mean's change applied by a server-side Adam step)")
    proximal_mu: float = Field(0.0, ge=0, validate_default=True,
                               description="fedprox: μ of the proximal term (must be > 0)")
    server_lr: float = Field(0.01, gt=0, description="fedadam: server learning rate η")
    server_beta_1: float = Field(0.9, ge=0, lt=1, description="fedadam: first-moment decay β₁")
    server_beta_2: float = Field(0.99, ge=0, lt=1, description="fedadam: second-moment decay β₂")
    server_tau: float = Field(1e-3, gt=0, description="fedadam: adaptivity τ (added to √v)")
    site_dp: SiteDPConfig | None = Field(None, description="optional site-level central DP, reported apart from "
                                                          "the patient-level ε (never added to it)")
    secure_aggregation: bool | None = Field(
        None, description="Flower's SecAgg+: the coordinator sees only the sum of the sites' arrays, never one "
                          f"site's. Default (unset): on with {MIN_SITES_FOR_SECAGG} or more sites, off with fewer; "
                          "`false` turns it off (the coordinator then sees each site's update)")
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

    @field_validator("proximal_mu")
    @classmethod
    def _mu(cls, v, info):
        if info.data.get("strategy") == "fedprox" and v <= 0:
            raise ValueError("fedprox needs proximal_mu > 0 (with 0 it is FedAvg)")
        return v

    @field_validator("site_dp")
    @classmethod
    def _site_dp_strategy(cls, v, info):
        if v is not None and info.data.get("strategy") == "fedadam":
            raise ValueError("site-level DP noises the weighted mean; FedAdam's server step on the un-noised mean "
                             "has no calibrated sensitivity (use fedavg or fedprox)")
        return v

    @field_validator("secure_aggregation")
    @classmethod
    def _secagg(cls, v, info):
        n = len(info.data.get("sites") or {})
        if v and n < MIN_SITES_FOR_SECAGG:
            raise ValueError(f"SecAgg+ needs at least {MIN_SITES_FOR_SECAGG} sites ({n} given): with 2, each site "
                             "learns the other's arrays from the sum")
        return v

    @property
    def secure(self) -> bool:
        """Whether the rounds run SecAgg+: as set, or by default with enough sites."""
        if self.secure_aggregation is None:
            return len(self.sites) >= MIN_SITES_FOR_SECAGG
        return self.secure_aggregation

    def strategy_options(self) -> dict:
        """Keyword arguments of the Flower strategy (`fed.coordinator.quorum_strategy`)."""
        if self.strategy == "fedprox":
            return {"proximal_mu": self.proximal_mu}
        if self.strategy == "fedadam":
            return {"eta": self.server_lr, "beta_1": self.server_beta_1, "beta_2": self.server_beta_2,
                    "tau": self.server_tau}
        return {}

    def site_dp_noise(self) -> float | None:
        """σ of site-level DP for this run (Opacus' RDP accountant, q = 1, one step per round)."""
        if self.site_dp is None:
            return None
        from opacus.accountants.utils import get_noise_multiplier

        return float(get_noise_multiplier(target_epsilon=self.site_dp.target_epsilon, target_delta=self.site_dp.delta,
                                          sample_rate=1.0, steps=self.rounds, accountant="rdp"))

    @property
    def quorum(self) -> int:
        return self.min_sites or len(self.sites)
