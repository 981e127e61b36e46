"""The destinations the settings switch on: one whose key setting is set."""

from __future__ import annotations

from ingest.settings import Settings
from sinks.destinations.amplitude import Amplitude, AmplitudeDeletion
from sinks.destinations.contract import Deletion, Destination
from sinks.destinations.mixpanel import Mixpanel, MixpanelDeletion
from sinks.destinations.posthog import PostHog, PostHogDeletion
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


def deletions(settings: Settings) -> list[Deletion]:
    """The deletion APIs forgets are forwarded to: a destination's, when its deletion
    credentials are set too."""
    s = settings
    found: list[Deletion] = []
    if s.posthog_api_key and s.posthog_personal_api_key and s.posthog_project_id:
        key = s.posthog_personal_api_key.get_secret_value()
        found.append(PostHogDeletion(key, s.posthog_project_id, s.posthog_app_host))
    if s.mixpanel_token and s.mixpanel_gdpr_token:
        token, gdpr = s.mixpanel_token.get_secret_value(), s.mixpanel_gdpr_token.get_secret_value()
        found.append(MixpanelDeletion(token, gdpr, s.mixpanel_app_host))
    if s.amplitude_api_key and s.amplitude_secret_key:
        key, secret = (
            s.amplitude_api_key.get_secret_value(),
            s.amplitude_secret_key.get_secret_value(),
        )
        found.append(AmplitudeDeletion(key, secret, s.amplitude_app_host))
    return found
