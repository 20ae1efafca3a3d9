"""redirect_logger: answer every request with a redirect, log every hit to Kafka."""

__version__ = "0.1.0"
