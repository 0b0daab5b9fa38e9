"""The FastAPI baseline of ``make bench``: ``GET /v1/users/me`` as a Python team would
write it without Tunnelplane's gateway.

- ``Authorization: Bearer <JWT>`` through FastAPI's ``HTTPBearer``, verified with PyJWT
  against the server's JWKS (``PyJWKClient``): EdDSA signature, ``exp``, ``iss``, ``aud``.
- The user row selected by id from the same SQLite database with SQLAlchemy 2 async
  (aiosqlite), one session per request.
- The same JSON fields as the gateway's proto3 JSON of a ``User``, through a Pydantic
  response model with camelCase aliases.

None of Tunnelplane's code is imported: this is the app a team would write on their own.
``bench.server --mode fastapi`` serves it under uvicorn (one worker, httptools, asyncio
loop, uvicorn's default logging with its access log).

No ``from __future__ import annotations`` here: FastAPI reads the ``Annotated`` dependency
declarations of the endpoint at run time, and they name functions local to ``create_app``.
"""

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from sqlalchemy import JSON
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


@dataclass(frozen=True, slots=True)
class AppConfig:
    """Where the data and the token keys are, and what tokens must say."""

    database_url: str
    jwks_url: str
    issuer: str
    audience: str


class Base(DeclarativeBase):
    """The ORM base."""


class UserRow(Base):
    """The columns of the ``users`` table this endpoint reads."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(primary_key=True)
    email: Mapped[str]
    display_name: Mapped[str]
    role: Mapped[str]
    tier: Mapped[str]
    state: Mapped[str]
    preferences: Mapped[dict[str, Any]] = mapped_column(JSON)
    has_avatar: Mapped[bool]
    version: Mapped[int]
    create_time: Mapped[datetime]
    update_time: Mapped[datetime]
    delete_time: Mapped[datetime | None]
    purge_time: Mapped[datetime | None]
    last_login_time: Mapped[datetime | None]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Notifications(ApiModel):
    """Notification preferences."""

    email: bool
    security_alerts: bool
    service_alerts: bool
    product_updates: bool


class Preferences(ApiModel):
    """A user's preferences."""

    theme: str
    language: str
    notifications: Notifications
    time_zone: str


class User(ApiModel):
    """The user, with the fields and names of the gateway's JSON."""

    name: str
    email: str
    display_name: str
    role: str
    tier: str
    state: str
    preferences: Preferences
    create_time: datetime
    update_time: datetime
    delete_time: datetime | None = None
    purge_time: datetime | None = None
    last_login_time: datetime | None = None
    etag: str
    has_avatar: bool


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they are UTC."""
    return None if value is None else value.replace(tzinfo=UTC)


def etag(row: UserRow) -> str:
    """The same weak version tag the server sends."""
    digest = hashlib.blake2s(f"{row.id}:{row.version}".encode(), digest_size=8).hexdigest()
    return f'W/"{digest}"'


def to_user(row: UserRow) -> User:
    """The response model of a row."""
    prefs = row.preferences
    return User(
        name=f"users/{row.id}",
        email=row.email,
        display_name=row.display_name,
        role=f"ROLE_{row.role.upper()}",
        tier=f"TIER_{row.tier.upper()}",
        state=f"STATE_{row.state.upper()}",
        preferences=Preferences(
            theme=f"THEME_{prefs['theme'].upper()}",
            language=prefs["language"],
            notifications=Notifications(**prefs["notifications"]),
            time_zone=prefs["time_zone"],
        ),
        create_time=row.create_time.replace(tzinfo=UTC),
        update_time=row.update_time.replace(tzinfo=UTC),
        delete_time=utc(row.delete_time),
        purge_time=utc(row.purge_time),
        last_login_time=utc(row.last_login_time),
        etag=etag(row),
        has_avatar=row.has_avatar,
    )


def create_app(config: AppConfig) -> FastAPI:
    """The app; everything it uses is built here and closed over."""
    engine = create_async_engine(config.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    jwks = jwt.PyJWKClient(config.jwks_url)
    bearer = HTTPBearer()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    async def session() -> AsyncIterator[AsyncSession]:
        async with sessions() as db:
            yield db

    async def current_user_id(
        credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)],
    ) -> str:
        token = credentials.credentials
        try:
            key = jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["EdDSA"],
                audience=config.audience,
                issuer=config.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "invalid token",
                headers={"WWW-Authenticate": "Bearer"},
            ) from None
        return str(claims["sub"])

    app = FastAPI(title="FastAPI baseline", lifespan=lifespan)

    @app.get("/v1/users/me", response_model_exclude_none=True)
    async def get_me(
        user_id: Annotated[str, Depends(current_user_id)],
        db: Annotated[AsyncSession, Depends(session)],
    ) -> User:
        row = await db.get(UserRow, user_id)
        if row is None or row.state != "active":
            raise HTTPException(status.HTTP_404_NOT_FOUND, "user not found")
        return to_user(row)

    return app
