"""Observability: Prometheus metrics and MQTT status and alerts, parts a
daemon session runs. Imports the datapath and delivery, nothing above."""
