"""Provider presets: how each provider's SMTP submission is reached, as data.

One row per provider; docs/providers.md shows the same table with the source of every value.
TLS is implicit (port 465) where the provider offers it, else STARTTLS on 587, which relayd
never lets fall back to plaintext. A preset also fills the provider's published pacing limits
(rate, daily quota, what it counts and over which day), which relayd.pacing enforces. Any key
of an `upstreams:` entry overrides its preset; `none` (or null, "") says "no limit" for rate
and daily.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from relayd.errors import ConfigError

_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")


@dataclass(frozen=True, slots=True)
class Limits:
    """What the provider publishes; 0 or "" where it does not (or where it depends on a plan).

    rate, daily, daily_counts and daily_window fill the upstream's rate, daily, daily_unit and
    daily_window; recipients_per_message and connections are shown in docs/providers.md
    (max_connections is the preset's own field).
    """

    rate: str = ""  # "30/minute"
    daily: int = 0
    daily_counts: str = "messages"  # messages | recipients: what the provider counts
    daily_window: str = "rolling"  # rolling (24 h) | calendar (the UTC day)
    recipients_per_message: int = 0
    connections: int = 0


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    host: str
    port: int
    tls: str
    max_connections: int = 4
    username: str = ""  # a fixed user name the provider wants (SendGrid: "apikey")
    username_hint: str = ""
    auth_hint: str = ""
    limits: Limits = field(default_factory=Limits)


_GOOGLE_AUTH = (
    "Google wants an app password (Google account > Security > 2-Step Verification > "
    "App passwords) or OAuth, never the account password"
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "gmail",
            "smtp.gmail.com",
            465,
            "implicit",
            username_hint="the full Gmail address",
            auth_hint=_GOOGLE_AUTH,
            limits=Limits(daily=500),
        ),
        Preset(
            "google-workspace",
            "smtp.gmail.com",
            465,
            "implicit",
            username_hint="the full Workspace address",
            auth_hint=_GOOGLE_AUTH + "; the admin may have to allow them",
            limits=Limits(daily=2000, recipients_per_message=100),
        ),
        Preset(
            "google-relay",
            "smtp-relay.gmail.com",
            465,
            "implicit",
            username_hint="a Workspace address, or no username when the relay allows your IP",
            auth_hint="the SMTP relay service must allow SMTP AUTH (Admin console > Gmail > "
            "Routing > SMTP relay service), and the login is an app password",
            limits=Limits(daily=10000, daily_counts="recipients"),
        ),
        Preset(
            "m365",
            "smtp.office365.com",
            587,
            "starttls",
            max_connections=3,
            username_hint="the mailbox's full address",
            auth_hint="SMTP AUTH must be enabled for the mailbox (it is off by default), and "
            "Basic authentication is being retired: use auth: oauth2",
            limits=Limits(
                rate="30/minute",
                daily=10000,
                daily_counts="recipients",
                recipients_per_message=500,
                connections=3,
            ),
        ),
        Preset(
            "sendgrid",
            "smtp.sendgrid.net",
            465,
            "implicit",
            username="apikey",
            username_hint='literally "apikey"',
            auth_hint="SendGrid expects username 'apikey' and an API key with Mail Send "
            "permission as the password",
        ),
        Preset(
            "mailgun",
            "smtp.mailgun.org",
            465,
            "implicit",
            username_hint="the domain's SMTP login, e.g. postmaster@mg.example.com",
            auth_hint="Mailgun expects the sending domain's SMTP credentials, not the account "
            "login; an EU domain needs preset mailgun-eu",
        ),
        Preset(
            "mailgun-eu",
            "smtp.eu.mailgun.org",
            465,
            "implicit",
            username_hint="the domain's SMTP login, e.g. postmaster@mg.example.com",
            auth_hint="Mailgun expects the sending domain's SMTP credentials, not the account "
            "login; a US domain needs preset mailgun",
        ),
        Preset(
            "ses",
            "email-smtp.{region}.amazonaws.com",
            465,
            "implicit",
            username_hint="the SES SMTP user name (not an IAM access key id)",
            auth_hint="SES wants SMTP credentials created for the region of the endpoint "
            "(SES console > SMTP settings); IAM access keys do not work as they are",
            # The sandbox, which SES counts in recipients; production is per account.
            limits=Limits(rate="1/second", daily=200, daily_counts="recipients"),
        ),
        Preset(
            "postmark",
            "smtp.postmarkapp.com",
            587,
            "starttls",
            username_hint="the Server API token (also the password), or an SMTP token's key",
            auth_hint="Postmark expects the Server API token as both username and password "
            "(or an SMTP token's access and secret key), with SMTP enabled for the server",
            limits=Limits(recipients_per_message=50),
        ),
        Preset(
            "brevo",
            "smtp-relay.brevo.com",
            465,
            "implicit",
            username_hint="the SMTP login shown under SMTP & API",
            auth_hint="Brevo expects an SMTP key as the password, not the v3 API key",
        ),
        Preset(
            "mailjet",
            "in-v3.mailjet.com",
            465,
            "implicit",
            username_hint="the API key",
            auth_hint="Mailjet expects the API key as username and the secret key as password",
        ),
        Preset(
            "zoho",
            "smtp.zoho.com",
            465,
            "implicit",
            username_hint="the full Zoho address",
            auth_hint="Zoho wants an application-specific password when two-factor "
            "authentication is on; EU accounts use host smtp.zoho.eu",
        ),
        Preset(
            "fastmail",
            "smtp.fastmail.com",
            465,
            "implicit",
            username_hint="the full Fastmail address",
            auth_hint="Fastmail only accepts an app password (Settings > Privacy & Security)",
        ),
        Preset(
            "icloud",
            "smtp.mail.me.com",
            587,
            "starttls",
            username_hint="the full iCloud address",
            auth_hint="iCloud only accepts an app-specific password (account.apple.com > "
            "Sign-In and Security)",
            limits=Limits(daily=1000, recipients_per_message=500),
        ),
    )
}


def get(name: str, key: str = "preset") -> Preset:
    """The preset called name, or a ConfigError naming key and the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(key, f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def host(preset: Preset, region: str, key: str = "region") -> str:
    """The preset's host, with the region filled in where the provider has regions (SES)."""
    if "{region}" not in preset.host:
        return preset.host
    if not region:
        raise ConfigError(key, f"required with preset {preset.name} (e.g. eu-west-1)")
    if not _REGION.match(region):
        raise ConfigError(key, f"not a region name: {region!r} (e.g. eu-west-1)")
    return preset.host.format(region=region)


def apply(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A config entry (raw mapping) with its preset's values under it; the entry's keys win.

    Also where `rate: none` and `daily: none` (the explicit "no limit" that overrides a
    preset's) become the "" and 0 the config records hold, with or without a preset.
    """
    entry = _no_limits(entry)
    name = entry.get("preset")
    if not name:
        return entry
    preset = get(str(name), f"{key}.preset")
    base: dict[str, Any] = {
        "port": preset.port,
        "tls": preset.tls,
        "max_connections": preset.max_connections,
        **_pacing(preset.limits),
    }
    if "host" not in entry:
        base["host"] = host(preset, str(entry.get("region") or ""), f"{key}.region")
    if preset.username:
        base["username"] = preset.username
    return {**base, **entry}


def _pacing(limits: Limits) -> dict[str, Any]:
    """The upstream keys a preset's published limits fill (none where it publishes none)."""
    keys: dict[str, Any] = {}
    if limits.rate:
        keys["rate"] = limits.rate
    if limits.daily:
        keys |= {
            "daily": limits.daily,
            "daily_unit": limits.daily_counts,
            "daily_window": limits.daily_window,
        }
    return keys


def _no_limits(entry: dict[str, Any]) -> dict[str, Any]:
    none = {"rate": "", "daily": 0}
    said = {k: v for k, v in none.items() if k in entry and _is_none(entry[k])}
    return {**entry, **said} if said else entry


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def auth_hint(preset_name: str) -> str:
    """The preset's advice for a refused login ("" when there is no preset)."""
    preset = PRESETS.get(preset_name)
    return preset.auth_hint if preset else ""
