"""Operations: counters, Prometheus metrics, liveness/readiness, the HTTP listener, log formats."""
