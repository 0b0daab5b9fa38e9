"""The statement names of the query metrics: verb and first table, from the SQL text."""

from __future__ import annotations

import pytest

from server.storage.dbmetrics import statement_name


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("SELECT users.id, users.email \nFROM users \nWHERE users.id = ?", "select users"),
        ('SELECT t.id FROM "tunnels" AS t JOIN shares ON ...', "select tunnels"),
        (
            "INSERT INTO webhook_deliveries (id, body) VALUES (%(id)s, %(body)s)",
            "insert webhook_deliveries",
        ),
        ("UPDATE tunnels SET state=? WHERE tunnels.id = ?", "update tunnels"),
        ("DELETE FROM sessions WHERE sessions.expires_at < ?", "delete sessions"),
        ("WITH due AS (SELECT id FROM outbox) UPDATE outbox SET x = 1", "update outbox"),
        ("SELECT 1", "select"),
        ("BEGIN", "begin"),
        ("  ", "other"),
    ],
)
def test_a_statement_is_named_by_its_verb_and_first_table(sql: str, name: str) -> None:
    assert statement_name(sql) == name
