"""The operations part of ServerSettings (request ids, access logs, CORS): a base class of
server.settings.ServerSettings, so they are fields of the one server Settings, validated here."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode


class OperationsSettings(BaseSettings):
    access_log: bool = Field(
        False,
        description="one JSON line per request on stderr (logger moebert.access): method, path, model, status, "
        "rows, tokens, queue/inference ms, request id",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins browsers may call the API from ('*': any; comma-separated in the env var); "
        "empty: no CORS headers",
    )
    cors_allow_credentials: bool = Field(False, description="CORS: allow cookies / Authorization from browsers")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: object) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            raise ValueError(f"cors_origins: expected origins, got {type(value).__name__}")
        origins = [str(v).strip().rstrip("/") for v in value if str(v).strip()]
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r}: expected '*' or http(s)://host[:port]")
        return origins
