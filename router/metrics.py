"""Prometheus metrics, one registry per process (GET /metrics)."""

from prometheus_client import Counter, Gauge

INBOUND = Counter("router_inbound_messages", "Inbound messages accepted", ["channel", "urgency"])
PIPELINE_FAILURES = Counter("router_pipeline_failures", "Pipeline attempts that raised")
OUTBOUND = Counter("router_outbound_deliveries", "Outbound delivery outcomes", ["channel", "status"])
REJECTED = Counter("router_ingress_rejected", "Ingress requests rejected", ["channel", "code"])
BACKLOG = Gauge("router_inbound_backlog", "Inbound messages not yet handled")
