"""Conversions between protobuf messages and domain values."""

from __future__ import annotations


def test_timestamp_conversion_matches_protobufs_own() -> None:
    from datetime import UTC, datetime, timedelta

    from google.protobuf import timestamp_pb2

    from server.api.convert import timestamp

    for value in (
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2024, 2, 29, tzinfo=UTC) + timedelta(microseconds=1),
    ):
        expected = timestamp_pb2.Timestamp()
        expected.FromDatetime(value)
        assert timestamp(value) == expected, value
