"""Mapped classes used across the tests."""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, LargeBinary, Numeric, String, Uuid, func, select
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, deferred, mapped_column, relationship
from sqlalchemy.types import DateTime, Interval, Time


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "cd_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer, default=0)
    bio: Mapped[str] = deferred(mapped_column(String(2000), default=""))
    posts: Mapped[list[Post]] = relationship(back_populates="user", order_by="Post.id")


class Post(Base):
    __tablename__ = "cd_posts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("cd_users.id"))
    title: Mapped[str] = mapped_column(String(100), default="")
    user: Mapped[User] = relationship(back_populates="posts")


class Membership(Base):
    """Composite primary key."""

    __tablename__ = "cd_memberships"
    tenant: Mapped[str] = mapped_column(String(50), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(50))


class Employee(Base):
    """Joined-table inheritance root."""

    __tablename__ = "cd_employees"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "cd_managers"
    id: Mapped[int] = mapped_column(ForeignKey("cd_employees.id"), primary_key=True)
    budget: Mapped[int] = mapped_column(Integer, default=0)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Engineer(Employee):
    __tablename__ = "cd_engineers"
    id: Mapped[int] = mapped_column(ForeignKey("cd_employees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(50), default="python")
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Vehicle(Base):
    """Single-table inheritance root."""

    __tablename__ = "cd_vehicles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    wheels: Mapped[int] = mapped_column(Integer, default=4)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class Truck(Vehicle):
    payload: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __mapper_args__ = {"polymorphic_identity": "truck"}


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


class Everything(Base):
    """One column of each type whose values must survive the cache exactly."""

    __tablename__ = "cd_everything"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    at_naive: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=False), nullable=True)
    at_aware: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    day: Mapped[datetime.date | None] = mapped_column(nullable=True)
    clock: Mapped[datetime.time | None] = mapped_column(Time, nullable=True)
    span: Mapped[datetime.timedelta | None] = mapped_column(Interval, nullable=True)
    amount: Mapped[decimal.Decimal | None] = mapped_column(Numeric(20, 6), nullable=True)
    blob: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    color: Mapped[Color | None] = mapped_column(SAEnum(Color), nullable=True)
    doc: Mapped[Any] = mapped_column(JSON, nullable=True)
    ratio: Mapped[float | None] = mapped_column(nullable=True)
    flag: Mapped[bool | None] = mapped_column(nullable=True)
    text: Mapped[str | None] = mapped_column(String(5000), nullable=True)


class Team(Base):
    """Derived columns: a count of related rows and an expression."""

    __tablename__ = "cd_teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    members: Mapped[list[Member]] = relationship(back_populates="team", order_by="Member.id")


class Member(Base):
    __tablename__ = "cd_members"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    team_id: Mapped[int] = mapped_column(ForeignKey("cd_teams.id"))
    team: Mapped[Team] = relationship(back_populates="members")


Team.member_count = column_property(  # type: ignore[attr-defined]
    select(func.count(Member.id)).where(Member.team_id == Team.id).correlate_except(Member).scalar_subquery()
)
Team.shout = column_property(Team.name + "!")  # type: ignore[attr-defined]


class Note(Base):
    """A primary key the database assigns."""

    __tablename__ = "cd_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    text: Mapped[str] = mapped_column(String(100), default="")
