"""Data room: record schema, conversation encoding with role-span labels, collation (shards: see the data issue)."""
