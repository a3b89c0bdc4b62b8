"""What customers wrote reaches an agent's terminal through `inbox`: it must
not forge inbox rows or drive the terminal with escape sequences."""

from __future__ import annotations

import asyncio
from pathlib import Path

from router import config as configuration
from router.acks import Templates
from router.pipeline import Pipeline
from router.store import Store
from tests.conftest import customer_message, write_config
from tests.test_cli import Run, rules, run, with_store  # noqa: F401 - `run` is a fixture

FORGED = "refund\nT-000099  critical security   security   sec        due -  \x1b]0;owned\x07\x1b[2J"


def seed_subject(config_file: Path, subject: str) -> None:
    async def work(store: Store) -> None:
        pipeline = Pipeline(store, configuration.load(str(config_file)), rules(), Templates(None))
        await pipeline.accept(customer_message("where is my deposit?", subject=subject))
        await pipeline.drain()

    asyncio.run(with_store(config_file, work))


def test_inbox_prints_a_customers_subject_on_its_own_row_without_control_characters(
    run: Run,  # noqa: F811
    tmp_path: Path,
) -> None:
    seed_subject(write_config(tmp_path, None), FORGED)
    code, out, err = run("inbox")
    assert code == 0 and err == ""
    [row] = out.splitlines()
    assert row.startswith("T-000001 ") and "refund T-000099" in row
    assert row.isprintable(), "no escape, bell or line break of the customer's reaches the terminal"
