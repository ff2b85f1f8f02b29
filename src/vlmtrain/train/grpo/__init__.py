"""GRPO's losses/rewards layer: the clipped policy-gradient objective (`loss`), group-relative advantages
(`advantages`), reward functions by dotted path (`rewards`) and the rewards vlmtrain ships (`reward_fns`).

No generation loop and no stage are built here yet (see docs/grpo.md): these are the pure pieces such a loop calls.
"""
