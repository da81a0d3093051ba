"""Flow accounting: a Kafka consumer group that turns the event stream into
finished-flow rows and per-minute rollups, exactly once (issue 5)."""
