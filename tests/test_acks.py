from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from router.acks import Templates, ack_block_reason, humanize_duration
from router.model import Direction, Kind, Message, Party, Urgency

VALUES = {"ref": "T-000123", "name": "Ann", "response_time": "15 minutes", "subject": "Help"}


@pytest.fixture
def shipped() -> Templates:
    return Templates(None)


def message(sender_id: str = "user-42", address: str | None = None, auto: bool = False) -> Message:
    return Message(
        id="msg_1",
        channel="mail",
        channel_type="email",
        direction=Direction.IN,
        kind=Kind.CUSTOMER,
        external_id="<1@example.com>",
        sender=Party(id=sender_id, name="Ann", address=address),
        text="hello",
        received_at=datetime.now(UTC),
        auto_generated=auto,
    )


@pytest.mark.parametrize("urgency", [None, Urgency.LOW, Urgency.NORMAL, Urgency.HIGH, Urgency.CRITICAL])
def test_english_ack_names_ref_and_response_time(shipped: Templates, urgency: Urgency | None) -> None:
    text = shipped.render("ack", "en", urgency, VALUES)
    assert "T-000123" in text
    assert "15 minutes" in text
    assert "Ann" in text
    assert "$" not in text


@pytest.mark.parametrize("urgency", [None, Urgency.NORMAL, Urgency.HIGH, Urgency.CRITICAL])
def test_chinese_ack_names_ref_and_response_time(shipped: Templates, urgency: Urgency | None) -> None:
    values = {"ref": "T-000123", "name": "张三", "response_time": "15 分钟"}
    text = shipped.render("ack", "zh-CN", urgency, values)
    assert "T-000123" in text
    assert "15 分钟内" in text
    assert "张三，您好" in text
    assert "$" not in text


def test_critical_ack_warns_about_seed_phrase_in_both_languages(shipped: Templates) -> None:
    en = shipped.render("ack", "en", Urgency.CRITICAL, VALUES)
    assert "seed phrase" in en
    assert "never ask" in en
    assert "API keys" in en
    assert "whitelist" in en
    zh = shipped.render("ack", "zh", Urgency.CRITICAL, VALUES)
    assert "助记词" in zh
    assert "绝不会" in zh
    assert "白名单" in zh


def test_empty_name_reads_naturally(shipped: Templates) -> None:
    assert shipped.render("ack", "en", None, {**VALUES, "name": ""}).startswith("Hi there,")
    assert shipped.render("ack", "zh", None, {"ref": "T-1"}).startswith("尊敬的用户，您好！")
    assert shipped.render("ack", "fr", None, {"name": "  "}).startswith("Hi there,")


def test_welcome_greets_without_ticket(shipped: Templates) -> None:
    assert shipped.render("welcome", "en", None, {"name": "Ann"}).startswith("Hi Ann,")
    assert "助记词" in shipped.render("welcome", "zh", None, {})


def test_user_override_wins_for_its_language(tmp_path: Path) -> None:
    (tmp_path / "ack.en.txt").write_text("Ours: $ref in $response_time\n", encoding="utf-8")
    templates = Templates(tmp_path)
    assert templates.render("ack", "en", Urgency.LOW, VALUES) == "Ours: T-000123 in 15 minutes"
    # The shipped, more specific texts still answer where the desk wrote nothing.
    assert "seed phrase" in templates.render("ack", "en", Urgency.CRITICAL, VALUES)
    assert "助记词" in templates.render("ack", "zh", Urgency.CRITICAL, VALUES)
    assert "T-000123" in templates.render("ack", "zh", None, VALUES)
    assert "工单" in templates.render("ack", "zh", None, VALUES)


def test_urgency_specific_beats_language_generic(tmp_path: Path) -> None:
    (tmp_path / "ack.en.txt").write_text("generic $ref", encoding="utf-8")
    (tmp_path / "ack.en.high.txt").write_text("high $ref", encoding="utf-8")
    templates = Templates(tmp_path)
    assert templates.render("ack", "en", Urgency.HIGH, VALUES) == "high T-000123"
    assert templates.render("ack", "en", Urgency.NORMAL, VALUES) == "generic T-000123"
    assert templates.render("ack", "en", None, VALUES) == "generic T-000123"


def test_language_without_template_falls_back_to_english(tmp_path: Path, shipped: Templates) -> None:
    text = shipped.render("ack", "fr", Urgency.CRITICAL, VALUES)
    assert text == shipped.render("ack", "en", None, VALUES)
    (tmp_path / "ack.en.txt").write_text("desk $ref", encoding="utf-8")
    assert Templates(tmp_path).render("ack", "de", None, VALUES) == "desk T-000123"
    assert Templates(tmp_path).render("ack", "../../etc/passwd", None, VALUES) == "desk T-000123"


def test_user_can_add_a_language(tmp_path: Path) -> None:
    (tmp_path / "ack.fr.txt").write_text("Bonjour $name, ticket $ref.", encoding="utf-8")
    assert Templates(tmp_path).render("ack", "fr", Urgency.HIGH, VALUES) == "Bonjour Ann, ticket T-000123."


def test_missing_override_dir_is_fine(tmp_path: Path, shipped: Templates) -> None:
    templates = Templates(tmp_path / "does-not-exist")
    assert templates.render("ack", "en", None, VALUES) == shipped.render("ack", "en", None, VALUES)


def test_dollar_in_customer_name_is_not_substituted(shipped: Templates) -> None:
    text = shipped.render("ack", "en", None, {**VALUES, "name": "$ref ${response_time} $$"})
    assert text.startswith("Hi $ref ${response_time} $$,")


def test_customer_name_cannot_add_lines(shipped: Templates) -> None:
    text = shipped.render("ack", "en", None, {**VALUES, "name": "Ann\n\nVisit evil.example " + "x" * 200})
    first_line = text.splitlines()[0]
    assert first_line.startswith("Hi Ann Visit evil.example x")
    assert len(first_line) < 100


@pytest.mark.parametrize(
    ("delta", "en", "zh"),
    [
        (timedelta(minutes=15), "15 minutes", "15 分钟"),
        (timedelta(minutes=1), "1 minute", "1 分钟"),
        (timedelta(seconds=20), "1 minute", "1 分钟"),
        (timedelta(minutes=90), "90 minutes", "90 分钟"),
        (timedelta(hours=1), "1 hour", "1 小时"),
        (timedelta(hours=4), "4 hours", "4 小时"),
        (timedelta(hours=24), "1 day", "1 天"),
        (timedelta(hours=36), "36 hours", "36 小时"),
        (timedelta(days=2), "2 days", "2 天"),
    ],
)
def test_humanize_duration(delta: timedelta, en: str, zh: str) -> None:
    assert humanize_duration(delta, "en") == en
    assert humanize_duration(delta, "zh") == zh
    assert humanize_duration(delta, "de") == en


def test_auto_generated_is_not_acked() -> None:
    assert ack_block_reason(message(auto=True)) == "auto-generated"


@pytest.mark.parametrize(
    "address",
    [
        "MAILER-DAEMON@mx.example.com",
        "mailer-daemon",
        "postmaster@example.com",
        "no-reply@example.com",
        "noreply@example.com",
        "No_Reply@example.com",
        "do-not-reply@example.com",
        "DoNotReply@example.com",
        "no-reply-alerts@example.com",
        "bounce.noreply+123@example.com",
    ],
)
def test_no_reply_senders_are_not_acked(address: str) -> None:
    assert ack_block_reason(message(address=address)) is not None
    assert ack_block_reason(message(sender_id=address)) is not None


@pytest.mark.parametrize(
    "address",
    ["ann@example.com", "ann@noreply.example.com", "snoreplyx@example.com", "postmasters-club@x.io"],
)
def test_ordinary_senders_are_acked(address: str) -> None:
    assert ack_block_reason(message(sender_id=address, address=address)) is None
