"""Telegram updates -> Messages: which updates the bot takes, and how it reads them.

Pure functions over python-telegram-bot's parsed objects, so the rules can be
read and tested apart from the adapter's I/O (channels/telegram.py).

- Private chats: every message. Groups: only messages that mention the bot,
  reply to it, or address a command to it; everyone else's chatter there is
  not a support request.
- `/start` is a greeting, not a ticket: the adapter answers it with the
  welcome template.
- The chat is the thread key; `chat_id:message_id` is the external id. An
  edit is its own inbound record (`chat_id:message_id:edit:<update_id>`, so a
  redelivered edit is a duplicate and a second edit is not) that names the
  message it changes in `edit_of`.
- Photos, documents and other media are listed as attachments (file id or
  name, type, size); nothing is downloaded into the queue.
- A group upgraded to a supergroup gets a new chat id; `upgrade_in` finds
  the service message that says so, for the adapter to keep the old id as
  the thread key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from telegram import Message as TgMessage
from telegram import MessageEntity, Update
from telegram.constants import ChatType

from router.language import detect_language
from router.model import Attachment, Direction, Kind, Message, Party, new_id

ALLOWED_UPDATES = ("message", "edited_message")
"""What the bot asks Telegram for (getUpdates / setWebhook `allowed_updates`)."""

CHANNEL_TYPE = "telegram"

# Media with a file: attribute name, content type when Telegram gives none.
_MEDIA = (
    ("document", "application/octet-stream"),
    ("video", "video/mp4"),
    ("animation", "video/mp4"),
    ("audio", "audio/mpeg"),
    ("voice", "audio/ogg"),
    ("video_note", "video/mp4"),
)


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is (getMe): groups address it by id and @username."""

    id: int
    username: str


@dataclass(frozen=True, slots=True)
class Greeting:
    """A `/start`: answered with the welcome text in that chat, no ticket."""

    chat_id: int
    message_id: int
    name: str
    language: str


def read_update(update: Update, bot: BotIdentity, channel: str) -> Message | Greeting | None:
    """The message one update carries for the desk, a greeting, or None
    (not for us: another update kind, group chatter, a service message)."""
    post = update.message or update.edited_message
    if post is None or post.chat.type == ChatType.CHANNEL or not addressed(post, bot):
        return None
    text = post.text or post.caption or ""
    attachments = attachments_of(post)
    if not text.strip() and not attachments:
        return None
    user = post.from_user
    hint = user.language_code if user else None
    if update.message is not None and is_start(post, bot):
        name = user.first_name if user else ""
        return Greeting(post.chat.id, post.message_id, name, detect_language("", hint))
    key = f"{post.chat.id}:{post.message_id}"
    edited = update.message is None
    reply = post.reply_to_message
    return Message(
        id=new_id("m"),
        channel=channel,
        channel_type=CHANNEL_TYPE,
        direction=Direction.IN,
        kind=Kind.CUSTOMER,
        external_id=f"{key}:edit:{update.update_id}" if edited else key,
        edit_of=key if edited else None,
        sender=sender_of(post),
        text=text,
        quoted=(reply.text or reply.caption) if reply else None,
        attachments=attachments,
        received_at=_utc(post.edit_date if edited and post.edit_date else post.date),
        language=detect_language(text, hint),
        auto_generated=bool(user and user.is_bot),
        thread_key=str(post.chat.id),
        references=[f"{post.chat.id}:{reply.message_id}"] if reply else [],
    )


def upgrade_in(raw: dict[str, Any]) -> tuple[int, int] | None:
    """(old id, new id) when this raw update is the service message of a
    group's upgrade to a supergroup (sent in both chats). Read from the raw
    update so the adapter can note it before it reads the rest of a batch."""
    post = raw.get("message")
    chat = post.get("chat") if isinstance(post, dict) else None
    chat_id = chat.get("id") if isinstance(chat, dict) else None
    if type(chat_id) is not int or not isinstance(post, dict):
        return None
    if type(new := post.get("migrate_to_chat_id")) is int:
        return chat_id, new
    if type(old := post.get("migrate_from_chat_id")) is int:
        return old, chat_id
    return None


def addressed(post: TgMessage, bot: BotIdentity) -> bool:
    """Private chats always; in groups a mention, a reply to the bot, or a
    `/command@bot`."""
    if post.chat.type == ChatType.PRIVATE:
        return True
    reply = post.reply_to_message
    if reply is not None and reply.from_user is not None and reply.from_user.id == bot.id:
        return True
    handle = "@" + bot.username.lower()
    for entity, value in _entities(post):
        if entity.type == MessageEntity.MENTION and value.lower() == handle:
            return True
        if entity.type == MessageEntity.TEXT_MENTION and entity.user and entity.user.id == bot.id:
            return True
        if entity.type == MessageEntity.BOT_COMMAND and value.lower().endswith(handle):
            return True
    return False


def is_start(post: TgMessage, bot: BotIdentity) -> bool:
    """`/start`, `/start <payload>` (deep links) or `/start@bot`, as the
    command that opens the message."""
    for entity, value in _entities(post):
        if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
            command, _, target = value.partition("@")
            return command.lower() == "/start" and target.lower() in ("", bot.username.lower())
    return False


def sender_of(post: TgMessage) -> Party:
    """The user; for anonymous group admins and channels posting into a
    group, the chat they speak as."""
    user = post.from_user
    if post.sender_chat is not None or user is None:
        chat = post.sender_chat or post.chat
        return Party(id=str(chat.id), name=chat.title or chat.full_name, address=_handle(chat.username))
    return Party(id=str(user.id), name=user.full_name, address=_handle(user.username))


def attachments_of(post: TgMessage) -> list[Attachment]:
    """The largest size of a photo, and each other file once (Telegram sends
    a GIF both as `animation` and `document`)."""
    found: dict[str, Attachment] = {}
    if post.photo:
        largest = post.photo[-1]
        found[largest.file_unique_id] = Attachment(largest.file_id, "image/jpeg", largest.file_size or 0)
    for name, default_type in _MEDIA:
        media = getattr(post, name)
        if media is not None and media.file_unique_id not in found:
            filename = getattr(media, "file_name", None) or media.file_id
            content_type = getattr(media, "mime_type", None) or default_type
            found[media.file_unique_id] = Attachment(filename, content_type, media.file_size or 0)
    return list(found.values())


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` UTF-16 code units (the unit Telegram
    counts), cut at the last paragraph break, else line break, else space
    in the second half of the window, so words and emoji stay whole."""
    pieces: list[str] = []
    rest = text.strip()
    while _utf16(rest) > limit:
        window = _fitting(rest, limit)
        cut = next(
            (at for sep in ("\n\n", "\n", " ") if (at := window.rfind(sep)) > len(window) // 2),
            max(1, len(window)),
        )
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def _fitting(text: str, limit: int) -> str:
    """The longest prefix of `text` within `limit` UTF-16 code units."""
    used = 0
    for index, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > limit:
            return text[:index]
    return text


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _entities(post: TgMessage) -> list[tuple[MessageEntity, str]]:
    if post.text is not None:
        return list(post.parse_entities().items())
    if post.caption is not None:
        return list(post.parse_caption_entities().items())
    return []


def _handle(username: str | None) -> str | None:
    return f"@{username}" if username else None


def _utc(moment: datetime | None) -> datetime:
    if moment is None:
        return datetime.now(UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
