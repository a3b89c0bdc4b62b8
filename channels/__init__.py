"""Channel adapters, one file each, listed explicitly (no discovery)."""

from channels.base import Channel
from channels.webhook import WebhookChannel

REGISTRY: dict[str, type[Channel]] = {
    WebhookChannel.type: WebhookChannel,
}
