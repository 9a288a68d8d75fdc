"""Every Redis key the farm uses, built here and nowhere else: `<prefix>:<kind>[:<id>]`."""

from __future__ import annotations

from dataclasses import dataclass

from renderfarm.jobs import JobState

DEFAULT_PREFIX = "rf"
CALIB_BUCKET_PX = 64  # calibration sizes round up to a multiple of this to form a bucket
WEBHOOK_GROUP = "webhooks"  # the consumer group on Keys.finished that webhook dispatchers share
CALIB_SEP = "|"  # joins calibration field parts; model, profile and node names never contain it (checked)

# One sorted set per state: "what is queued / running / done" is one cheap query, and a state change
# moves the id from one index to the next in the same transaction as the hash write.
_INDEX_NAMES = {
    JobState.QUEUED: "pending",  # scored by priority, then submit time
    JobState.LEASED: "leased",  # scored by lease deadline
    JobState.RUNNING: "running",  # scored by lease deadline
    JobState.DONE: "done",  # scored by finish time
    JobState.FAILED: "failed",  # scored by finish time
    JobState.CANCELLED: "cancelled",  # scored by finish time
    JobState.WAITING: "waiting",  # scored as in the queue: waiting for other jobs to finish (chains)
}


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or ":" in self.prefix or " " in self.prefix:
            raise ValueError(f"key prefix {self.prefix!r} must be non-empty, without ':' or spaces")

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job(self, job_id: str) -> str:
        return self._key("job", job_id)

    def result(self, job_id: str) -> str:
        return self._key("result", job_id)

    def input(self, sha256_hex: str) -> str:
        """An uploaded image input's record (JSON: size, mode, bytes, its blob's URL), by the SHA-256 of its
        normalised PNG; it expires with the input (renderfarm/inputs.py)."""
        return self._key("input", sha256_hex)

    def children(self, job_id: str) -> str:
        """The set of jobs that wait for `job_id` (renderfarm/chains.py): settled when it finishes."""
        return self._key("children", job_id)

    def batch(self, batch_id: str) -> str:
        return self._key("batch", batch_id)

    def node(self, name: str) -> str:
        return self._key("node", name)

    def index(self, state: JobState | str) -> str:
        return self._key(_INDEX_NAMES[JobState(state)])

    def metrics(self, name: str) -> str:
        return self._key("metrics", name)

    def api(self, *parts: str) -> str:
        """What the HTTP API keeps (renderfarm/api: e.g. A1111 options per team); the API holds no state itself."""
        return self._key("api", *parts)

    def histogram(self, name: str) -> str:
        """A histogram of job durations (`JOB_WAIT_HISTOGRAM`, `JOB_RENDER_HISTOGRAM`), for renderfarm/metrics.py:
        a hash with one field per bucket upper bound (HISTOGRAM_INF above the last) holding the observations in
        that bucket alone (the exporter makes them cumulative), and HISTOGRAM_SUM, HISTOGRAM_COUNT."""
        return self._key("metrics", "histogram", name)

    @property
    def pending(self) -> str:
        return self.index(JobState.QUEUED)

    @property
    def nodes(self) -> str:
        return self._key("nodes")

    @property
    def assets(self) -> str:
        """A hash: node name -> the JSON of the model files and LoRAs it holds, with their hashes (written when
        they change, not with every heartbeat: a studio's library runs to thousands of LoRAs)."""
        return self._key("assets")

    @property
    def events(self) -> str:
        return self._key("events")

    @property
    def finished(self) -> str:
        """A second stream with only the moves to a terminal state (done, failed, cancelled): what a client
        waiting for its jobs follows, so that it wakes once per finish rather than once per state change."""
        return self._key("finished")

    def queue(self, team: str, priority: int) -> str:
        """One team's queued jobs at one priority, scored by submit time: the scheduler reads the head of
        every such queue, so no team's or priority's jobs hide behind another's long queue."""
        return self._key("queue", team, str(int(priority)))

    @property
    def queues(self) -> str:
        """The set of non-empty per-(team, priority) queues."""
        return self._key("queues")

    @property
    def calib_peaks(self) -> str:
        return self._key("calib", "peaks")

    @property
    def calib_speeds(self) -> str:
        return self._key("calib", "speeds")

    @property
    def calib_version(self) -> str:
        return self._key("calib", "version")

    @property
    def etas(self) -> str:
        return self._key("etas")

    @property
    def samples(self) -> str:
        """A stream of farm-wide samples (queue depth, per-node totals) the scheduler writes every few
        seconds, capped in length: the dashboard's charts."""
        return self._key("samples")

    @property
    def fair_share(self) -> str:
        return self._key("fairshare")

    @property
    def tokens(self) -> str:
        """Team tokens: SHA-256 hex digest -> JSON {team, admin, created, label} (cluster/auth.py)."""
        return self._key("tokens")

    @property
    def webhook_secrets(self) -> str:
        """Per-team webhook signing secrets: team -> JSON {secret, created, previous, previous_until}, kept in
        clear because the farm signs with them (renderfarm/webhooks/secrets.py)."""
        return self._key("webhook", "secrets")

    def webhook_delivery(self, delivery_id: str) -> str:
        """One webhook delivery's record (JSON, expiring): its target, body, attempts and outcome."""
        return self._key("webhook", "delivery", delivery_id)

    @property
    def webhook_deliveries(self) -> str:
        """Every kept delivery's id, scored by creation time (capped): what `renderfarm webhooks deliveries` lists."""
        return self._key("webhook", "deliveries")

    @property
    def webhook_due(self) -> str:
        """Pending deliveries, scored by when their next attempt is due (a claimed one: by when its claim lapses)."""
        return self._key("webhook", "due")

    def batch_webhook(self, batch_id: str) -> str:
        """A batch's webhook (a hash: url, team, created, fired), written with the batch by the submit script."""
        return self._key("webhook", "batch", batch_id)

    def batch_open(self, batch_id: str) -> str:
        """The jobs of a batch with a webhook that have not been seen finished yet (a set)."""
        return self._key("webhook", "open", batch_id)

    @property
    def settings(self) -> str:
        """The farm-wide settings the head published (JSON), which joining machines take over."""
        return self._key("settings")

    @property
    def farm(self) -> str:
        """The farm's marker (JSON {id, created, started}), written by the head when it starts: a client told
        the wrong database number finds no marker there and says so, instead of showing an empty farm."""
        return self._key("farm")

    @property
    def quarantine(self) -> str:
        """Quarantined job id -> JSON {reason, at}: records that did not parse, taken out of circulation."""
        return self._key("quarantine")

    @property
    def leader(self) -> str:
        """Which scheduler dispatches (its owner id, with a TTL it renews): one at a time per farm."""
        return self._key("leader")

    @property
    def leader_epoch(self) -> str:
        """Counts leaderships: each new leader's number, the fencing token of what it writes."""
        return self._key("leader", "epoch")

    def quarantined(self, job_id: str) -> str:
        """Where a quarantined job's hash is kept for a human to look at."""
        return self._key("quarantined", job_id)

    def all_indexes(self) -> list[str]:
        return [self.index(state) for state in JobState]


# --- the job-duration histograms (Keys.histogram) --------------------------------------------------------

JOB_WAIT_HISTOGRAM = "job_wait_seconds"  # created -> started, observed when the job is done
JOB_RENDER_HISTOGRAM = "job_render_seconds"  # started -> finished (done)
HISTOGRAM_SUM, HISTOGRAM_COUNT, HISTOGRAM_INF = "sum", "count", "+Inf"
OBSERVED_FIELD = "observed"  # in a job's hash: its durations are in the histograms (counted once)


# --- fields of the calibration hashes (Keys.calib_peaks, Keys.calib_speeds) ----------------------------


def size_bucket(width: int, height: int) -> str:
    """The size bucket of `width` x `height`: each side rounded up to a multiple of CALIB_BUCKET_PX."""
    up = lambda v: -(-int(v) // CALIB_BUCKET_PX) * CALIB_BUCKET_PX  # noqa: E731
    return f"{up(width)}x{up(height)}"


def _join(*parts: object) -> str:
    text = [str(p) for p in parts]
    for part in text:
        if CALIB_SEP in part:
            raise ValueError(f"{part!r} cannot be part of a calibration key: it contains {CALIB_SEP!r}")
    return CALIB_SEP.join(text)


def peak_field(model: str, profile: str, width: int, height: int, batch: int) -> str:
    """The field of a measured peak in the farm's peak hash: a floor per (model, profile, size bucket, batch)."""
    return _join(model, profile, size_bucket(width, height), batch)


def speed_field(node: str, model: str, width: int, height: int, batch: int) -> str:
    """The field of a node's measured speed in the farm's speed hash (exact size: speed is not a floor)."""
    return _join(node, model, f"{width}x{height}", batch)
