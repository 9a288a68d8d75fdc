"""Webhooks: when a job (or a whole batch) finishes, the farm POSTs a signed JSON body to the URL it carries.

A job asks for one with `JobSpec.webhook`; a batch with `FarmClient.submit_batch(..., webhook=URL)` (one POST
once every job of the batch is done, failed or cancelled). Both URLs are checked at submit (http or https, a
host, no credentials, at most 2048 characters; a literal loopback or private address or `localhost` only when
the farm's `webhook_allow_private` is set) and again at delivery, against every address the host resolves to.

For a process that talks to the farm's Redis (the farm head starts one in `Farm.start`; the HTTP API starts
its own), delivering is one object:

    from renderfarm.webhooks import WebhookDispatcher
    dispatcher = WebhookDispatcher(redis_client, keys, settings).start()   # daemon threads, never blocks
    ...
    dispatcher.stop()                                                      # joins them

    WebhookDispatcher(redis_client: redis.Redis, keys: Keys | None = None, settings: Settings | None = None, *,
                      senders=4, consumer=None, poll_s=0.5, claim_idle_s=60.0, follow_published=True)
    WebhookDispatcher.for_settings(store: Store, settings: Settings | None = None, **options)   # on a Store

Several dispatchers on one farm share the work through a Redis consumer group: each finish is handled by one,
each delivery created once and attempted by one at a time (dispatcher.py). For whoever shows deliveries:
`deliveries(store, job=None, state=None, limit=50, *, batch=None, team=None)` (records.py) lists them, newest
first, without their bodies or full URLs. For whoever receives them: `verify(secret, headers, body,
tolerance_s=300)` (signing.py; docs/webhooks.md has a receiver). Per-team secrets: secrets.py.
"""

from renderfarm.webhooks.dispatcher import WebhookDispatcher, retry_delay
from renderfarm.webhooks.records import DELIVERY_STATES, deliveries, public
from renderfarm.webhooks.secrets import TeamSecret, rotate_secret, team_secret
from renderfarm.webhooks.sender import Attempt, post, redact_url
from renderfarm.webhooks.signing import SignatureError, sign, signed_headers, verify

__all__ = [
    "DELIVERY_STATES", "Attempt", "SignatureError", "TeamSecret", "WebhookDispatcher", "deliveries", "post", "public",
    "redact_url", "retry_delay", "rotate_secret", "sign", "signed_headers", "team_secret", "verify",
]
