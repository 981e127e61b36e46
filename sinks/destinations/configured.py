"""The destinations the settings switch on: one whose key setting is set."""

from __future__ import annotations

from ingest.settings import Settings
from sinks.destinations.amplitude import Amplitude
from sinks.destinations.contract import Destination
from sinks.destinations.mixpanel import Mixpanel
from sinks.destinations.posthog import PostHog
from sinks.destinations.webhook import Webhook


def configured(settings: Settings) -> list[Destination]:
    """Every destination whose key setting is set, in a fixed order."""
    s = settings
    found: list[Destination] = []
    if s.posthog_api_key is not None:
        found.append(PostHog(s.posthog_api_key.get_secret_value(), s.posthog_host))
    if s.mixpanel_token is not None:
        secret = s.mixpanel_api_secret.get_secret_value() if s.mixpanel_api_secret else None
        found.append(Mixpanel(s.mixpanel_token.get_secret_value(), s.mixpanel_host, secret))
    if s.amplitude_api_key is not None:
        found.append(Amplitude(s.amplitude_api_key.get_secret_value(), s.amplitude_host))
    if s.tracking_webhook_url is not None:
        auth = s.tracking_webhook_auth
        secret = s.tracking_webhook_secret
        found.append(
            Webhook(
                s.tracking_webhook_url,
                auth.get_secret_value() if auth else None,
                secret.get_secret_value() if secret else None,
            )
        )
    return found
