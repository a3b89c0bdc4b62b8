"""Channel adapters, one file each, listed explicitly (no discovery)."""

from channels.base import Channel
from channels.email import EmailChannel
from channels.telegram import TelegramChannel
from channels.webhook import WebhookChannel

REGISTRY: dict[str, type[Channel]] = {
    EmailChannel.type: EmailChannel,
    TelegramChannel.type: TelegramChannel,
    WebhookChannel.type: WebhookChannel,
}
