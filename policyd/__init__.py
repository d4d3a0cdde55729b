"""policyd: a gRPC policy decision service for the spend of AI requests."""

__version__ = "0.1.0"
