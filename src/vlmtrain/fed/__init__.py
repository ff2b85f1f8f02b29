"""Federated training across sites with Flower: sites run DP stages on their own data (docs/federated.md)."""
