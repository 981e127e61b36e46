"""Destinations: enriched events fanned out to PostHog, Mixpanel, Amplitude and a webhook."""
