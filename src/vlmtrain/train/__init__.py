"""Train room: objectives, stages, the LightningModule, callbacks, the multi-stage runner."""
