"""The HTTP API on each worker's web port: `api` (submit an ad, read results), `health`
(liveness and readiness), `metrics` (Prometheus) and `openapi` (the document describing them)."""
