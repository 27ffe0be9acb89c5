"""The sandbox: a Tripo API emulator and a local S3 server, for tests and `tripo-watchd sandbox`."""

from tripo_watchd.sandbox.emulator import Fault, RequestRecord, TripoEmulator
from tripo_watchd.sandbox.s3server import LocalS3, S3Server
from tripo_watchd.sandbox.seaweed import SeaweedS3Server

__all__ = ["Fault", "LocalS3", "RequestRecord", "S3Server", "SeaweedS3Server", "TripoEmulator"]
