"""Delivery of events: the sinks (sink.py; kafka_sink.py to Kafka), the wire
records (records.py, ring_records.py, wire.py), the producer, the durable
spool, the archive of published records and the replay tool. Imports the
datapath, nothing above."""
