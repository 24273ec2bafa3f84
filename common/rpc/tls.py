"""Mutual TLS on every gRPC connection inside a deployment: the gateway to workers, and a decode
worker to the prefill workers it pulls KV from. One CA signs every service's certificate; a server
accepts only clients that present a certificate signed by it, and a client accepts only servers
whose certificate it signed and whose name matches the address dialled (or `server_name`).

Off when no files are given (a loopback deployment); on when all three are.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TLSSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ca_file: str | None = Field(None, description="PEM of the CA that signs every kvrelay service's certificate")
    cert_file: str | None = Field(None, description="PEM certificate of this process (server and client)")
    key_file: str | None = Field(None, description="PEM private key of cert_file")
    server_name: str | None = Field(None, description="name expected in servers' certificates (default: the host)")

    @model_validator(mode="after")
    def _all_or_none(self) -> TLSSettings:
        given = [f for f in ("ca_file", "cert_file", "key_file") if getattr(self, f)]
        if given and len(given) != 3:
            raise ValueError(f"mutual TLS needs ca_file, cert_file and key_file together; only {given} given")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None

    def _read(self) -> tuple[bytes, bytes, bytes]:
        assert self.ca_file and self.cert_file and self.key_file
        return Path(self.ca_file).read_bytes(), Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
