"""The project's exception hierarchy: one root, a subclass per kind of failure."""


class EVError(Exception):
    """Root of every error the services raise on purpose."""


class ConfigError(EVError):
    """A setting is missing or malformed."""


class FrameError(EVError):
    """A socket frame could not be decoded."""


class FrameTooLarge(FrameError):
    """A socket frame exceeded the maximum size."""


class MessageError(EVError):
    """A message is not valid JSON or does not match any known model."""


class ConnectionLost(EVError):
    """The peer closed the connection or stopped answering."""


class DeliveryFailed(EVError):
    """A frame was refused (NACK) or not acknowledged after every retry."""
