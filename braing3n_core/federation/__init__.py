"""The federated protocol without Flower: message payloads, one site's round, reply checks, the run config and run folder, federated probes."""
