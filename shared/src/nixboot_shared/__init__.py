"""nixboot shared: event schemas, subjects, config, NATS and metrics helpers."""
