"""The sandbox: a Tripo API emulator and a local S3 server, for tests and `tripo-watchd sandbox`."""

from tripo_watchd.sandbox.emulator import Fault, RequestRecord, TripoEmulator
from tripo_watchd.sandbox.s3server import S3Server

__all__ = ["Fault", "RequestRecord", "S3Server", "TripoEmulator"]
