"""Every Redis stream name, consumer-group name and key prefix the project uses."""

TURNS_STREAM = "fama:turns"
TURNS_DEAD_STREAM = "fama:turns:dead"
DETECTOR_GROUP = "detectors"
INTERVENTIONS_STREAM = "fama:interventions"
REPLY_STREAM_PREFIX = "fama:replies:"
SESSION_PREFIX = "fama:session:"
SESSION_STATE_PREFIX = "fama:state:"  # per-session supervision state carried across turns
SESSION_OUTCOME_PREFIX = "fama:outcome:"  # a session's reported outcome, set once
EXTRACTION_PREFIX = "fama:extract:"  # cached per-policy-text extractions (DCE)
EXTRACTION_LOCK_PREFIX = "fama:extract-lock:"  # held while one replica asks the LLM for an extraction
LATE_VERDICTS_STREAM = "fama:verdicts:late"


def reply_stream(instance: str) -> str:
    return f"{REPLY_STREAM_PREFIX}{instance}"


def session_key(tenant: str, session_id: str) -> str:
    return f"{SESSION_PREFIX}{tenant}:{session_id}"


def session_pattern(tenant: str | None) -> str:
    """A SCAN pattern for the session records of ``tenant`` (of every tenant when None)."""
    if tenant is None:
        return f"{SESSION_PREFIX}*"
    escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in tenant)
    return f"{SESSION_PREFIX}{escaped}:*"


def session_of_key(key: str) -> tuple[str, str]:
    """``(tenant, session_id)`` of a session record's key. Tenants hold no ``:``; session ids may."""
    tenant, _, session_id = key.removeprefix(SESSION_PREFIX).partition(":")
    return tenant, session_id


def extraction_key(policy_hash: str) -> str:
    return f"{EXTRACTION_PREFIX}{policy_hash}"


def extraction_lock_key(policy_hash: str) -> str:
    return f"{EXTRACTION_LOCK_PREFIX}{policy_hash}"


def session_state_key(tenant: str, session_id: str) -> str:
    return f"{SESSION_STATE_PREFIX}{tenant}:{session_id}"


def session_outcome_key(tenant: str, session_id: str) -> str:
    return f"{SESSION_OUTCOME_PREFIX}{tenant}:{session_id}"


RESPONSE_PREFIX = "fama:response:"  # a Responses API response, its input and its conversation, with a TTL


def response_key(tenant: str, response_id: str) -> str:
    return f"{RESPONSE_PREFIX}{tenant}:{response_id}"


# The pushed profile (a hash: ``version``, a counter raised by each push, ``document``, ``sha256``, ``pushed_ms``);
# no key: no profile was pushed, every process runs its file's.
PROFILE_KEY = "fama:profile"
