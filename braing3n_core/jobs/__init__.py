"""The user-facing jobs behind the CLI commands: probe, sample, forecast, synthesize, showcase, report, demo."""
