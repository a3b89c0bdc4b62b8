"""Files uuencoded into a text/plain body (old clients, fax and ticketing
gateways): listed as attachments, taken out of the text the customer's
words are read from, and never at the cost of those words."""

from __future__ import annotations

import binascii
import json
import random
from email.message import EmailMessage
from email.policy import SMTP, default
from pathlib import Path

import pytest

from channels.email import parse as parse_module
from channels.email.parse import Identity, parse_email
from channels.email.uuencode import split_uuencoded
from router.model import Attachment, Message

CORPUS = Path(__file__).parent / "data" / "email"
US = Identity("mail", "support.example.com", "loop-0123456789")

# Zero bytes make blank padding and trailing spaces, 1289 is no multiple of 3 or 45.
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 5
PNG = b"\x89PNG\r\n\x1a\n" + bytes(82)  # 90 bytes: two full lines, no short one
BEFORE = "Hello, the invoice you asked for is below."
AFTER = "Kind regards, Ann"


def uuencode(name: str, data: bytes, *, backtick: bool = False) -> str:
    """A block as `uuencode` writes it: 45 bytes a line, a zero-length line, `end`."""
    lines = [f"begin 644 {name}"]
    lines += [
        binascii.b2a_uu(data[at : at + 45], backtick=backtick).decode("ascii").rstrip("\n")
        for at in range(0, len(data), 45)
    ]
    lines += [binascii.b2a_uu(b"", backtick=backtick).decode("ascii").rstrip("\n"), "end"]
    return "\n".join(lines)


def mail(body: str, *, crlf: bool = False, attachment: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Ann Customer <ann@example.com>"
    msg["To"] = "support@support.example.com"
    msg["Subject"] = "Invoice"
    msg["Message-ID"] = "<uu-1@example.com>"
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="mime.pdf")
    return msg.as_bytes(policy=SMTP if crlf else default)


def parsed(body: str, **options: bool) -> Message:
    return parse_email(mail(body, **options), US)


def encoded_lines(block: str) -> list[str]:
    """The data lines of a block, which must not reach the text."""
    return [line for line in block.split("\n")[1:-2] if len(line) > 8]


def test_one_uuencoded_file_becomes_an_attachment_and_leaves_the_text() -> None:
    block = uuencode("invoice.pdf", PDF)
    message = parsed(f"{BEFORE}\n\n{block}\n\n{AFTER}\n")
    assert message.attachments == [Attachment("invoice.pdf", "application/pdf", len(PDF))]
    assert message.text == f"{BEFORE}\n\n{AFTER}"
    assert "begin 644" not in message.text and "\nend" not in message.text
    assert not any(line in message.text for line in encoded_lines(block))


def test_two_uuencoded_files_keep_the_words_around_and_between_them() -> None:
    first, second = uuencode("invoice.pdf", PDF), uuencode("scan.png", PNG, backtick=True)
    message = parsed(f"{BEFORE}\n{first}\nAnd the scan of the receipt:\n{second}\n{AFTER}")
    assert message.attachments == [
        Attachment("invoice.pdf", "application/pdf", len(PDF)),
        Attachment("scan.png", "image/png", len(PNG)),
    ]
    assert message.text == f"{BEFORE}\nAnd the scan of the receipt:\n{AFTER}"
    assert not any(line in message.text for line in encoded_lines(first) + encoded_lines(second))


def test_a_uuencoded_file_sits_next_to_a_mime_attachment() -> None:
    message = parse_email(mail(f"{BEFORE}\n{uuencode('a.pdf', PDF)}\n{AFTER}", attachment=b"%PDF x"), US)
    assert [(a.filename, a.size) for a in message.attachments] == [("a.pdf", len(PDF)), ("mime.pdf", 6)]
    assert message.text == f"{BEFORE}\n{AFTER}"


def test_a_crlf_body_works() -> None:
    raw = mail(f"{BEFORE}\n\n{uuencode('invoice.pdf', PDF)}\n\n{AFTER}\n", crlf=True)
    assert b"\r\nbegin 644 invoice.pdf\r\nM" in raw and b"\r\n`\r\n" not in raw  # spaces, not backticks
    message = parse_email(raw, US)
    assert message.attachments == [Attachment("invoice.pdf", "application/pdf", len(PDF))]
    assert message.text == f"{BEFORE}\n\n{AFTER}"


def test_a_fake_begin_line_followed_by_prose_stays_in_the_text() -> None:
    body = f"{BEFORE}\nbegin 644 foo\nthen I tried again and it failed.\nend\n{AFTER}"
    message = parsed(body)
    assert message.attachments == []
    assert message.text == body


@pytest.mark.parametrize(
    "inside",
    [
        "THANK YOU FOR YOUR HELP\nBYE\n",  # capitals pass the alphabet check, not the line lengths
        "",  # "begin" and "end" with nothing between: not even an empty file's zero-length line
        "M" + "A" * 70 + "\n",  # longer than any padding: not uuencode
    ],
)
def test_prose_that_fits_the_uuencode_alphabet_stays_in_the_text(inside: str) -> None:
    body = f"{BEFORE}\nbegin 644 notes.txt\n{inside}end\n{AFTER}"
    assert parsed(body).text == body
    assert split_uuencoded(body) == (body, [])


def test_a_block_with_a_line_that_does_not_decode_stays_untouched() -> None:
    lines = uuencode("invoice.pdf", PDF).split("\n")
    lines[5] = lines[5][:20] + "lowercase is not uuencode" + lines[5][45:]
    body = f"{BEFORE}\n" + "\n".join(lines) + f"\n{AFTER}"
    message = parsed(body)
    assert message.attachments == []
    assert message.text == body


def test_a_length_character_outside_the_alphabet_is_not_uuencode() -> None:
    # binascii.a2b_uu reads "}" as "=" (29 bytes) instead of refusing it.
    lines = uuencode("invoice.pdf", PDF).split("\n")
    assert lines[-3].startswith("=")
    lines[-3] = "}" + lines[-3][1:]
    assert len(binascii.a2b_uu(lines[-3])) == 29
    body = f"{BEFORE}\n" + "\n".join(lines) + f"\n{AFTER}"
    assert split_uuencoded(body) == (body, [])


def test_a_block_without_end_in_the_middle_of_the_text_stays_untouched() -> None:
    block = uuencode("invoice.pdf", PDF).removesuffix("\nend")
    body = f"{BEFORE}\n{block}\n{AFTER}"
    assert split_uuencoded(body) == (body, [])


def test_lines_with_garbage_padding_decode_the_way_uu_did() -> None:
    # b2a_uu(b"ab") is '"86( ' - the padding of the last group blank; some
    # encoders fill it with anything, which a2b_uu rejects as trailing garbage.
    last = binascii.b2a_uu(b"ab").decode("ascii").rstrip("\n")
    broken = last[:3] + "XX"
    with pytest.raises(binascii.Error):
        binascii.a2b_uu(broken)
    block = uuencode("x.bin", PDF[:45]).replace("\n \nend", f"\n{broken}\n \nend")
    text, found = split_uuencoded(f"{BEFORE}\n{block}\n{AFTER}")
    assert text == f"{BEFORE}\n{AFTER}"
    assert found == [Attachment("x.bin", "application/octet-stream", 47)]


def test_trailing_spaces_stripped_by_a_mailer_do_not_change_the_size() -> None:
    block = "\n".join(line.rstrip(" ") for line in uuencode("invoice.pdf", PDF).split("\n"))
    assert block != uuencode("invoice.pdf", PDF)
    message = parsed(f"{BEFORE}\n{block}\n{AFTER}")
    assert message.attachments == [Attachment("invoice.pdf", "application/pdf", len(PDF))]
    assert message.text == f"{BEFORE}\n{AFTER}"


def test_the_begin_base64_variant() -> None:
    encoded = binascii.b2a_base64(PDF, newline=False).decode("ascii")
    lines = [encoded[at : at + 60] for at in range(0, len(encoded), 60)]
    block = "\n".join(["begin-base64 600 report.pdf", *lines, "===="])
    message = parsed(f"{BEFORE}\n{block}\n{AFTER}")
    assert message.attachments == [Attachment("report.pdf", "application/pdf", len(PDF))]
    assert message.text == f"{BEFORE}\n{AFTER}"


def test_a_file_cut_off_by_a_truncated_fetch_is_listed_with_what_arrived() -> None:
    lines = uuencode("invoice.pdf", PDF).split("\n")[:11]  # begin + 10 full lines, the last cut short
    lines[-1] = lines[-1][:30]
    text, found = split_uuencoded(f"{BEFORE}\n" + "\n".join(lines))
    assert text == BEFORE
    assert found == [Attachment("invoice.pdf", "application/pdf", 450)]
    # One line is not enough to tell a file from words at the end of a mail.
    assert split_uuencoded(f"{BEFORE}\nbegin 644 a\n#86)C") == (f"{BEFORE}\nbegin 644 a\n#86)C", [])


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("notes.txt", "text/plain"),
        ("data.unknownext", "application/octet-stream"),
        ("NO_EXTENSION", "application/octet-stream"),
        ("backup.tar.gz", "application/octet-stream"),  # gzip, not a tar to read
        ("my scan 2.png", "image/png"),
        ("C:\\tmp\\x.pdf", "application/pdf"),
    ],
)
def test_the_type_is_guessed_from_the_name(name: str, content_type: str) -> None:
    _, found = split_uuencoded(uuencode(name, b"abc"))
    assert found == [Attachment(name, content_type, 3)]


def test_an_empty_file_is_its_zero_length_line() -> None:
    assert split_uuencoded(f"{BEFORE}\n{uuencode('empty.txt', b'')}") == (
        BEFORE,
        [Attachment("empty.txt", "text/plain", 0)],
    )


def test_the_content_is_never_kept() -> None:
    message = parsed(f"{BEFORE}\n{uuencode('invoice.pdf', PDF * 40)}\n{AFTER}")
    assert message.attachments[0].size == len(PDF) * 40
    assert len(json.dumps(message.to_dict())) < 2000


def test_mangled_blocks_never_raise_and_never_lose_the_words_around_them() -> None:
    block = uuencode("invoice.pdf", PDF[:400])
    alphabet = " `!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_abcz\r\n\x00é"
    for seed in range(300):
        rng = random.Random(seed)
        mangled = list(block)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(mangled))
            if rng.random() < 0.3:
                del mangled[at]
            else:
                mangled[at] = rng.choice(alphabet)
        body = f"{BEFORE}\n{''.join(mangled)}\n{AFTER}"
        text, found = split_uuencoded(body)
        assert text == body or (len(found) == 1 and text == f"{BEFORE}\n{AFTER}"), seed


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.name)
def test_no_corpus_mail_changes(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real mail without uuencoded text reads exactly as before."""
    raw = path.read_bytes()
    with_it = parse_email(raw, US)
    monkeypatch.setattr(parse_module, "split_uuencoded", lambda text: (text, []))
    without = parse_email(raw, US)
    assert with_it.text == without.text and with_it.quoted == without.quoted
    assert with_it.attachments == without.attachments


def test_the_corpus_uuencoded_parts_decode_to_the_sizes_the_library_finds() -> None:
    """uuencoded_attachment.eml (Netscape 4.7) sends its images as MIME parts
    with `Content-Transfer-Encoding: x-uuencode`, which the library decodes:
    they stay MIME attachments, and our decoder agrees with it byte for byte."""
    raw = (CORPUS / "uuencoded_attachment.eml").read_bytes()
    message = parse_email(raw, US)
    assert [(a.filename, a.content_type, a.size) for a in message.attachments] == [
        ("redball.png", "image/png", 1453),
        ("greenball.png", "image/png", 1298),
        ("blueball.png", "image/png", 1325),
    ]
    assert message.text.endswith("Slow but steady wins the race.")
    parts = [part for part in parse_module._parse_mime(raw).walk() if part.get_content_type() == "image/png"]
    for part, attachment in zip(parts, message.attachments, strict=True):
        text, found = split_uuencoded(str(part.get_payload()))
        assert text.strip() == ""
        assert found == [attachment]
