"""The device core's one exception: a refusal with the D-Bus error kind it
maps to (AccessDenied, InvalidArgument, NotFound, Busy, LimitExceeded,
Unsupported, Failed) and a message for the caller that names the rule or
check, and never anything about another caller."""
from __future__ import annotations


class DeviceError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.info: dict = {}         # for the log line: the rules' decision, if any


def denied(message: str) -> DeviceError:
    return DeviceError("AccessDenied", message)


def invalid(message: str) -> DeviceError:
    return DeviceError("InvalidArgument", message)
