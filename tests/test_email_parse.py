"""Real-world mail (tests/data/email, see SOURCES.md there) -> Message fields,
plus the quote splitter, loop detection and the mail we send."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from channels.email.parse import Identity, parse_email
from channels.email.quoting import split_quoted
from channels.email.smtp import build, reply_subject
from channels.email.text import decode_bytes, decode_words, html_to_text
from router.model import Conversation, Delivery, Direction, Kind, Message, Party

CORPUS = Path(__file__).parent / "data" / "email"
US = Identity("mail", "support.example.com", "loop-0123456789")


def parse(name: str, identity: Identity = US) -> Message:
    return parse_email((CORPUS / name).read_bytes(), identity)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.name)
def test_every_corpus_mail_parses_into_a_storable_message(path: Path) -> None:
    message = parse_email(path.read_bytes(), US)
    assert message.external_id.startswith("<") and message.external_id.endswith(">")
    assert message.sender.id
    assert message.received_at <= datetime.now(UTC)
    # What the store keeps: valid UTF-8 JSON, no surrogates from raw 8-bit bytes.
    json.dumps(message.to_dict(), ensure_ascii=False).encode("utf-8")
    assert "\r" not in message.text


@pytest.mark.parametrize(
    ("name", "subject", "text"),
    [
        ("koi8r_subject_and_base64_body.eml", "Алфавит", "Вопрос"),
        ("windows1251_subject_and_base64_body.eml", "Алфавит", "Вопрос"),
        ("gb2312_subject_base64_body_really_utf8.eml", "代开各地增值税发票", "你好！我公司可代开"),
        ("gb2312_label_gbk_bytes_ndr.eml", None, "次の受信者またはグループへの配信に失敗しました"),
        ("iso2022jp_subject_and_body.eml", "Re: TEST テストテスト", "Hello"),
        ("iso2022jp_alternative_qp.eml", "ЖД№41 от 28.09.2016", "toto"),
        (
            "bounce_exchange_iso2022jp_subject.eml",
            "Undeliverable: キジトラ・フラッシュ/ニャーン",
            "Delivery has failed",
        ),
        ("shift_jis_8bit_body.eml", "test", "あいうえお"),
        ("euc_kr_subject_and_base64_body.eml", "NOTE: 한국말로 하는 것", "우리는 하나님을 믿습니다"),
        ("hebrew_iso8859_8i_subject_attachment.eml", "מענה 'אני לא נמצא': Invoice 02722027", ""),
        ("utf7_subject_and_body.eml", "Die Hasen und die Frösche (Microsoft Outlook 00)", "mißliche Lage"),
        ("qp_utf8_encoded_headers.eml", "MIME UTF8 Test ¢ More Text", "Lorem ipsum"),
        ("raw_utf8_headers_rfc6532.eml", "Säying Hello", "body"),
        ("subject_raw_8bit_cp1252_from_encoded.eml", "Formação FrenetikPolis: Mega Campanha Final Verão", ""),
        (
            "subject_mixed_latin1_latin2_encoded_words.eml",
            "If you can read this you understand the example.",
            "",
        ),
        (
            "plain_qp_latin1_body.eml",
            "Die Hasen und die Frösche (Microsoft Outlook 00)",
            "über ihre mißliche",
        ),
        ("x_mac_cyrillic_alternative_qp.eml", "Scientific conferences, Bulgaria 2019", "ACADEMIC NEWSLETTER"),
        ("windows1251_alternative_qp_bad_date.eml", "[0]: XXXXXXX XXXXX XXXXX !", "MailScanner"),
        ("broken_report_without_boundary.eml", "Delivery Status Notification (Failure)", "without boundary"),
        ("bad_encoded_word_unknown_charset.eml", "TEST", "TEST"),
    ],
)
def test_charsets_and_encoded_words_come_out_readable(name: str, subject: str | None, text: str) -> None:
    message = parse(name)
    if subject is None:
        assert message.subject is None
    else:
        assert message.subject is not None and message.subject.startswith(subject)
    assert text in message.text


def test_names_and_addresses_in_every_encoding() -> None:
    assert parse("ks_c_5601_1987_headers.eml").sender.name == "김 현진"
    assert parse("gb2312_subject_base64_body_really_utf8.eml").sender.name == "张先生"
    raw_utf8 = parse("raw_utf8_headers_rfc6532.eml").sender
    assert (raw_utf8.name, raw_utf8.address) == ("Jöhn Doe", "jdöe@mächine.example")
    broken = parse("broken_8bit_headers_bad_boundary.eml").sender
    assert broken.name is not None and broken.name.startswith("Юникод запрещен")
    outlook = parse("autoreply_outlook_automatic_reply.eml").sender
    assert (outlook.id, outlook.name) == ("nekonyaan@example.org", "Neko, Nyaan")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("html_only_qp_latin1.eml", "Die Hasen klagten einst über ihre mißliche Lage"),
        ("html_only_related_inline_image.eml", "Test of HTML section"),
        ("html_only_long_links.eml", "http://www.longurlmaker.com/view/?id="),
        ("big5_html_empty_cte.eml", ""),
    ],
)
def test_html_only_mail_becomes_text_with_a_sanitized_copy(name: str, text: str) -> None:
    message = parse(name)
    assert text in message.text
    assert message.html is not None
    assert "<script" not in message.html.lower() and "<style" not in message.html.lower()
    assert "<" not in message.text.replace("<http", "")


@pytest.mark.parametrize(
    ("name", "attachments"),
    [
        ("attachment_pdf.eml", [("test.pdf", "application/pdf", 6940)]),
        ("attachment_nonascii_filename.eml", [("ciële.txt", "text/plain", 11)]),
        ("attachment_only_no_text_body.eml", [("favicon.jpg", "image/jpeg", 687)]),
        ("attachment_without_content_disposition.eml", [("Prostřeno_2014_poslední volné termíny.xls", None, None)]),  # noqa: E501
        ("attachment_png_outlook.eml", [("blueball.png", "image/png", 1325), ("greenball.png", None, None),
                                        ("redball.png", None, None)]),
        ("forwarded_message_rfc822_attachment.eml", [("ForwardedMessage.eml", "message/rfc822", None)]),
        ("tnef_winmail_dat.eml", [("winmail.dat", "application/ms-tnef", None)]),
        ("calendar_invite_text_calendar.eml", [(None, "text/calendar", None)]),
        ("broken_malformed_base64_attachment.eml", [("some.doc", "application/msword", None)]),
    ],
)  # fmt: skip
def test_attachments_are_listed_with_name_type_and_size(
    name: str, attachments: list[tuple[str | None, str | None, int | None]]
) -> None:
    found = parse(name).attachments
    assert len(found) == len(attachments)
    for attachment, (filename, content_type, size) in zip(found, attachments, strict=True):
        assert attachment.filename == filename
        assert content_type is None or attachment.content_type == content_type
        assert size is None or attachment.size == size
        assert attachment.size > 0


def test_rfc2231_continued_filenames_are_joined() -> None:
    names = [a.filename or "" for a in parse("attachment_rfc2231_continued_filename.eml").attachments]
    assert names[0].startswith("Buchungsbestätigung- Rechnung-Geschäftsbedingungen")
    assert names[2].startswith("02_A€àäąбيد@Z-0123456789")


@pytest.mark.parametrize(
    "name",
    [
        "autoreply_auto_submitted_qp_utf8.eml",
        "autoreply_icloud_auto_reply.eml",
        "autoreply_ooo_alternative_precedence_bulk.eml",
        "autoreply_ooo_away_until_may5.eml",
        "autoreply_outlook_automatic_reply.eml",
        "autoreply_outlook_cp1252_qp.eml",
        "autoreply_polish_cp1250_subject.eml",
        "bounce_dsn_delayed_warning.eml",
        "bounce_dsn_disk_quota.eml",
        "bounce_dsn_multi_recipient.eml",
        "bounce_dsn_postfix_mailbox_full.eml",
        "bounce_exchange_iso2022jp_subject.eml",
        "bounce_exim_plaintext.eml",
        "bounce_gmail_plaintext_no_dsn.eml",
        "bounce_google_dsn_html_image.eml",
        "bounce_office365_dsn.eml",
        "bounce_qmail_plaintext.eml",
        "bounce_yandex_russian_utf8.eml",
        "feedback_report_arf_aol.eml",
        "read_receipt_mdn.eml",
    ],
)
def test_machine_mail_is_auto_generated(name: str) -> None:
    assert parse(name).auto_generated


@pytest.mark.parametrize(
    "name",
    [
        "reply_with_in_reply_to_references.eml",
        "plain_qp_latin1_body.eml",
        "gb2312_subject_base64_body_really_utf8.eml",
        "attachment_pdf.eml",
        "html_only_qp_latin1.eml",
        "koi8r_subject_and_base64_body.eml",
    ],
)
def test_mail_from_people_is_not_auto_generated(name: str) -> None:
    assert not parse(name).auto_generated


@pytest.mark.parametrize(
    ("header", "auto"),
    [
        ("Auto-Submitted: auto-replied", True),
        ("Auto-Submitted: auto-generated", True),
        ("Auto-Submitted: no", False),
        ("Precedence: bulk", True),
        ("Precedence: junk", True),
        ("Precedence: list", True),
        ("List-Id: <news.example.org>", True),
        ("X-Auto-Response-Suppress: All", True),
        ("Return-Path: <>", True),
        ("Return-Path: <ann@example.org>", False),
        ("X-Support-Router-Loop: loop-0123456789", True),
        ("X-Support-Router-Loop: someone-elses-desk", False),
    ],
)
def test_each_loop_signal_on_its_own(header: str, auto: bool) -> None:
    raw = f"{header}\nFrom: Ann <ann@example.org>\nSubject: hello\nMessage-ID: <h@example.org>\n\nHi\n"
    assert parse_email(raw.encode(), US).auto_generated is auto


@pytest.mark.parametrize("sender", ["MAILER-DAEMON@example.org", "no-reply@example.org", "postmaster@x.org"])
def test_robot_senders_are_auto_generated(sender: str) -> None:
    raw = f"From: {sender}\nSubject: hello\nMessage-ID: <h@example.org>\n\nHi\n"
    assert parse_email(raw.encode(), US).auto_generated


def test_a_truncated_fetch_says_so() -> None:
    message = parse_email((CORPUS / "attachment_pdf.eml").read_bytes()[:2048], US, truncated_at=2048)
    assert "[This email is larger than 2048 bytes; only its start was fetched.]" in message.text


def test_threading_headers_nearest_last() -> None:
    message = parse("reply_with_in_reply_to_references.eml")
    assert message.references == ["<473FF3B8.9020707@xxx.org>", "<348F04F142D69C21-291E56D292BC@xxxx.net>"]
    assert message.in_reply_to == "<348F04F142D69C21-291E56D292BC@xxxx.net>"
    assert message.external_id == "<473FFE27.20003@xxx.org>"


def test_mail_without_message_id_gets_a_stable_one() -> None:
    first, again = parse("attachment_pdf.eml"), parse("attachment_pdf.eml")
    assert first.external_id == again.external_id
    assert first.external_id.endswith("@no-message-id.invalid>")


def _bounce_of_ours(name: str, original: bytes) -> Message:
    raw = (CORPUS / name).read_bytes().replace(original, b"<m_0123abcd@support.example.com>")
    return parse_email(raw, US)


def test_a_dsn_returning_our_reply_names_it_with_the_reason() -> None:
    message = _bounce_of_ours("bounce_dsn_postfix_mailbox_full.eml", b"<4E326A95.3010907@example.com>")
    assert message.bounce_of == "m_0123abcd"
    assert message.bounce_error == "552 5.2.2 E4.12 user MAILBOX FULL"
    assert "m_0123abcd" in message.references and message.auto_generated


def test_a_plain_text_bounce_from_the_mailer_daemon_counts_too() -> None:
    message = _bounce_of_ours("bounce_exim_plaintext.eml", b"<E1P1ce6-000Egt-GZ@e1.example.org>")
    assert message.bounce_of == "m_0123abcd"


def test_a_delay_warning_is_not_a_bounce() -> None:
    original = b"<15655788.13.1200472642578.JavaMail.Administrator@mail.ttttt.com.au>"
    message = _bounce_of_ours("bounce_dsn_delayed_warning.eml", original)
    assert message.bounce_of is None and message.auto_generated


def test_a_bounce_of_someone_elses_mail_marks_nothing() -> None:
    assert parse("bounce_office365_dsn.eml").bounce_of is None


# -- quoted history and signatures ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "new", "quoted_starts"),
    [
        (
            "Thanks, solved!\n\nOn Mon, 3 Jun 2024 at 10:00, Support <support@example.com> wrote:\n"
            "> My account was hacked\n",
            "Thanks, solved!",
            "On Mon",
        ),
        (
            "Still waiting.\n\nOn Mon, Jun 3, 2024 at 10:00 AM Example Support <\n"
            "support@example.com> wrote:\n> We are looking into it\n",
            "Still waiting.",
            "On Mon",
        ),
        (
            "好的，谢谢\n\n在 2024年6月3日 10:00，客服 <support@example.com> 写道：\n> 已收到\n",
            "好的，谢谢",
            "在 2024",
        ),
        (
            "See below.\n\n________________________________\nFrom: Support <support@example.com>\n"
            "Sent: Monday, June 3, 2024 10:00\nTo: Ann\nSubject: Re: stuck\n\nold text\n",
            "See below.",
            "____",
        ),
        (
            "Please check.\r\n\r\nFrom: Support <support@example.com>\r\n"
            "Sent: Monday\r\nTo: Ann\r\n\r\nold\r\n",
            "Please check.",
            "From: Support",
        ),
        ("My deposit is missing.\n\n-- \nAnn Lee\nCEO, Example Ltd\n", "My deposit is missing.", "-- "),
        ("Where is my BTC?\n\nSent from my iPhone", "Where is my BTC?", "Sent from my iPhone"),
        (
            "> old question\nnew answer\n> more old\nsecond answer",
            "new answer\nsecond answer",
            "> old question",
        ),
        (
            "-----Original Message-----\nFrom: x\nSent: y\n\nforwarded only",
            "-----Original Message-----",
            None,
        ),
        ("Only new text, no history.", "Only new text, no history.", None),
        ("On the deposit page I see an error.", "On the deposit page I see an error.", None),
    ],
)
def test_quoted_history_and_signatures_are_split_off(text: str, new: str, quoted_starts: str | None) -> None:
    fresh, quoted = split_quoted(text)
    assert fresh.startswith(new)
    if quoted_starts is None:
        assert quoted is None
    else:
        assert quoted is not None and quoted.startswith(quoted_starts)


def test_html_blockquotes_are_quoted_and_links_kept() -> None:
    text = html_to_text(
        "<html><head><style>p{}</style></head><body><p>Hello <b>team</b>,</p>"
        '<p>see <a href="https://example.com/tx/1">my transaction</a></p>'
        "<div>On Mon, Support wrote:<blockquote><p>old</p></blockquote></div>"
        "<script>alert(1)</script>&amp; thanks</body></html>"
    )
    assert text.splitlines() == [
        "Hello team,",
        "",
        "see my transaction (https://example.com/tx/1)",
        "",
        "On Mon, Support wrote:",
        "",
        "> old",
        "",
        "& thanks",
    ]
    assert split_quoted(text)[0] == "Hello team,\n\nsee my transaction (https://example.com/tx/1)"


def test_mislabelled_and_broken_bytes_never_raise() -> None:
    assert decode_bytes("中文".encode("gbk"), "gb2312") == "中文"
    assert decode_bytes("中文".encode(), "gb2312") == "中文"
    assert decode_bytes("繁體".encode("big5"), "big5") == "繁體"
    assert decode_bytes(b"caf\xe9", "no-such-charset") == "café"
    assert decode_bytes(b"\xff\xfe\xfd", "utf-8") == "ÿþý"
    assert decode_words("=?x-unknown?B?w6k=?= =?utf-8?Q?a_b?=") == "éa b"
    assert decode_words("=?utf-8?B?broken***?=") == "=?utf-8?B?broken***?="


# -- what we send --------------------------------------------------------------------


def _conversation() -> Conversation:
    now = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    return Conversation(
        id="c_1",
        channel="mail",
        customer=Party(id="ann@example.org", name="Ann Lee", address="ann@example.org"),
        thread_key="<root@example.org>",
        created_at=now,
        last_message_at=now,
        ref="T-000042",
        subject="Withdrawal stuck",
    )


def _outbound(kind: Kind, in_reply_to: str) -> Message:
    return Message(
        id=f"m_{kind.value}_1",
        channel="mail",
        channel_type="email",
        direction=Direction.OUT,
        kind=kind,
        external_id=f"m_{kind.value}_1",
        sender=Party(id="mail"),
        text="We got your message.\n\nYour ticket: T-000042",
        received_at=datetime(2024, 6, 3, 10, 1, tzinfo=UTC),
        conversation_id="c_1",
        recipient=Party(id="ann@example.org", name="Ann Lee", address="ann@example.org"),
        in_reply_to=in_reply_to,
        delivery=Delivery(),
    )


def test_an_ack_threads_under_the_customer_mail_and_says_it_is_automatic() -> None:
    mail = build(
        _outbound(Kind.ACK, "<second@example.org>"), _conversation(), "Support <support@example.com>", US
    )
    assert mail["Message-ID"] == "<m_ack_1@support.example.com>"
    assert mail["In-Reply-To"] == "<second@example.org>"
    assert mail["References"] == "<root@example.org> <second@example.org>"
    assert mail["Subject"] == "Re: Withdrawal stuck [T-000042]"
    assert mail["Auto-Submitted"] == "auto-replied"
    assert mail["X-Support-Router-Loop"] == US.loop_id
    assert mail["To"] == "Ann Lee <ann@example.org>"
    assert [part.get_content_type() for part in mail.iter_parts()] == ["text/plain", "text/html"]
    again = build(
        _outbound(Kind.ACK, "<second@example.org>"), _conversation(), "Support <support@example.com>", US
    )
    assert again["Message-ID"] == mail["Message-ID"]


def test_an_agent_reply_is_not_marked_automatic() -> None:
    mail = build(
        _outbound(Kind.AGENT, "<root@example.org>"), _conversation(), "Support <support@example.com>", US
    )
    assert mail["Auto-Submitted"] is None and mail["References"] == "<root@example.org>"


def test_our_own_mail_coming_back_is_recognised() -> None:
    mail = build(
        _outbound(Kind.AGENT, "<root@example.org>"), _conversation(), "Support <support@example.com>", US
    )
    echoed = parse_email(mail.as_bytes(), US)
    assert echoed.auto_generated
    answer = mail.as_bytes().replace(b"X-Support-Router-Loop", b"X-Other")
    assert not parse_email(answer, US).auto_generated


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Withdrawal stuck", "Re: Withdrawal stuck [T-000042]"),
        ("Re: Withdrawal stuck", "Re: Withdrawal stuck [T-000042]"),
        ("RE: Withdrawal stuck [T-000042]", "RE: Withdrawal stuck [T-000042]"),
        ("回复：提现", "回复：提现 [T-000042]"),
        (None, "Re: [T-000042]"),
    ],
)
def test_reply_subjects(subject: str | None, expected: str) -> None:
    assert reply_subject(subject, "T-000042") == expected
