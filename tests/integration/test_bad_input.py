"""Bad input at the boundary (issue 6): generated invalid and extreme job specs thrown at FarmClient.submit_batch
and at `renderfarm submit` (in-process), against a real Redis.

Every invalid spec must be refused with a message naming the spec and the field (SpecError from the client;
one `error:` line, or a JSON object with ok=false, from the CLI), nothing may be enqueued (the database is
unchanged: a batch is all or nothing), and nothing else may escape. Valid extremes must be accepted and come
back from Redis unchanged.

Each test runs its own hypothesis loop and asserts how many examples it ran; their quotas add up to at least
1,000 invalid specs, and the last test checks the totals the others recorded.
"""

from __future__ import annotations

import functools
import json
import math
import re
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from renderfarm.cli import main
from renderfarm.client import MAX_BATCH_JOBS, FarmClient, SpecError
from renderfarm.jobs import (
    MAX_IMAGES_PER_JOB,
    MAX_LORA_WEIGHT,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    MAX_TAGS,
    SEED_MAX,
    JobSpec,
)
from renderfarm.planning.catalog import default_catalog

pytestmark = pytest.mark.integration

CATALOG = default_catalog()
MODELS = [m for m in CATALOG.names() if not CATALOG.get(m).family.planning_only]  # the others are refused
FIELDS = set(JobSpec.model_fields)

# Invalid specs (examples) each test must run; together at least 1,000.
QUOTAS = {
    "client_one_spec": 600,
    "client_mixed_batch": 150,
    "client_batch_shape": 100,
    "cli_specs_file": 300,
    "cli_argv": 150,
}
assert sum(QUOTAS.values()) >= 1000
RAN: dict[str, int] = {}  # invalid examples each test actually ran


def fuzz(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
    )


# --- strategies: valid pieces ------------------------------------------------------------------------------

# Unicode that must survive the trip through Redis: emoji (astral, ZWJ sequences), right-to-left text and
# marks, combining characters, a byte order mark, the last code point, CJK, a line separator.
SPECIAL_TEXT = [
    "😀", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308", "שלום", "مرحبا",
    "\u202e", "\u200f", "e\u0301", "\ufeff", "\U0010ffff", "漢字", "\u2028", "\n", "\t", "\x7f", "Ω≈ç√",
]
any_char = st.characters(codec="utf-8", exclude_characters="\x00")  # no surrogates, no NUL
label_char = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])  # tags: no control characters
# Strings are built from a few drawn pieces (drawing thousands of characters one by one is slow); the longest
# ones repeat a piece up to the limit, in 1-char and astral (emoji) code points alike.
SOLID = ["x", "😀", "ש", "漢", "e\u0301"]


def _nonblank(text: str) -> bool:
    return bool(text.strip())


def _up_to(limit: int):
    return lambda head, piece: (head + piece * limit)[:limit]


prompts = st.one_of(
    st.builds(lambda a, special, b: a + special + b, st.text(any_char, max_size=12), st.sampled_from(SPECIAL_TEXT),
              st.text(any_char, max_size=12)).filter(_nonblank),
    st.builds(_up_to(MAX_PROMPT_CHARS), st.text(any_char, max_size=8), st.sampled_from(SOLID)),
)
negative_prompts = st.one_of(st.just(""), prompts)
tags = st.one_of(
    st.text(label_char, min_size=1, max_size=12).filter(_nonblank),
    st.builds(_up_to(64), st.text(label_char, max_size=4), st.sampled_from(SOLID + ["\u202e!"])),
)
TEAM_FIRST = string.ascii_letters + string.digits
teams = st.one_of(
    st.builds(lambda a, b: a + b, st.sampled_from(TEAM_FIRST), st.text(TEAM_FIRST + "_.-", max_size=10)),
    st.builds(lambda a, b: (a + b * 64)[:64], st.sampled_from(TEAM_FIRST), st.sampled_from(["-", "_", ".", "Z9"])),
)
guidances = st.one_of(st.floats(0.0, 50.0), st.integers(0, 50), st.sampled_from([0.0, 50.0, -0.0, 5e-324]))


def sizes_for(entry) -> st.SearchStrategy[int]:
    step = entry.family.size_multiple
    low, high = -(-entry.min_size // step), entry.max_size // step
    return st.one_of(st.sampled_from([low * step, high * step]), st.integers(low, high).map(lambda k: k * step))


@functools.lru_cache(maxsize=None)
def optional_fields(model: str) -> dict[str, st.SearchStrategy]:
    entry = CATALOG.get(model)
    return {
        "negative_prompt": negative_prompts, "width": sizes_for(entry), "height": sizes_for(entry),
        "steps": st.integers(1, MAX_STEPS), "guidance": guidances, "seed": st.integers(0, SEED_MAX),
        "num_images": st.integers(1, MAX_IMAGES_PER_JOB), "priority": st.integers(-100, 100), "team": teams,
        "tags": st.one_of(st.lists(tags, max_size=4),
                          st.lists(tags, min_size=1, max_size=3).map(lambda few: (few * MAX_TAGS)[:MAX_TAGS])),
        "sampler": st.sampled_from(["Euler"] if entry.family.flow_matching else ["Euler", "Euler a", "DPM++ 2M", "DDIM"]),
    }


@st.composite
def valid_specs(draw, every_field: bool = True) -> dict:
    model = draw(st.sampled_from(MODELS))
    spec = {"model": model, "prompt": draw(prompts)}
    for name, values in optional_fields(model).items():
        if every_field or draw(st.booleans()):
            spec[name] = draw(values)
    return spec


# --- strategies: invalid values, each with the field its message must name ---------------------------------

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
huge_ints = st.integers(2**64, 2**300) | st.integers(-(2**300), -(2**64))


def wrong_types(json_only: bool, number: bool = False, text: bool = False, allow_none: bool = False):
    """Values of the wrong type. JSON-only values are what a --specs file can hold."""
    options = [st.booleans(), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                    max_size=2)]
    if not allow_none:
        options.append(st.none())
    if not text:
        options.append(st.text(max_size=10))  # "512", "nan", ...
        options.append(st.integers(-1000, 1000).map(str))
    if not number:
        options += [st.integers(), st.floats(allow_nan=True, allow_infinity=True)]
    if not json_only:
        options += [st.binary(max_size=8), st.frozensets(st.integers(), max_size=2), st.tuples(st.integers())]
    return st.one_of(options)


def with_inserted(bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda a, b, c: a + b + c, st.text(any_char, max_size=20), bad, st.text(any_char, max_size=20))


too_long = st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "😀", " x", "ש"]), st.integers(4001, 100_000))


def bad_ints(low: int, high: int, json_only: bool, allow_none: bool = False):
    # Whole floats (512.0) are refused like any float: integer fields take integers only.
    return st.one_of(
        st.integers(max_value=low - 1), st.integers(min_value=high + 1), huge_ints,
        st.integers(low, high).map(float), st.sampled_from([math.nan, math.inf, -math.inf]),
        wrong_types(json_only, number=True, allow_none=allow_none),
    )


def bad_sizes(entry, json_only: bool):
    step = entry.family.size_multiple
    return st.one_of(
        bad_ints(entry.min_size, entry.max_size, json_only),
        st.integers(entry.min_size, entry.max_size).filter(lambda v: v % step),  # not a multiple of 8 / 16
    )


@functools.lru_cache(maxsize=None)
def bad_values(field: str, model: str, json_only: bool) -> st.SearchStrategy:
    """Values that make `field` invalid in a spec for `model` (built once per field, model and mode)."""
    entry = CATALOG.get(model)
    # An emoji as a UTF-16 pair is two lone surrogates in a Python string (invalid), but in a JSON file
    # "\ud83d\ude00" is how that emoji is written: it decodes to one valid character there.
    pair = [] if json_only else [with_inserted(st.just("\ud83d\ude00"))]
    texts = st.one_of(with_inserted(st.just("\x00")), with_inserted(surrogates), *pair)
    wrong_text = wrong_types(json_only, text=True)
    options = {
        "model": lambda: st.one_of(st.text(max_size=40).filter(lambda s: s not in CATALOG), st.just(""), texts,
                                   st.builds(lambda n: "m" * n, st.integers(201, 5000)), wrong_text),
        "prompt": lambda: st.one_of(st.just(""), st.text(" \t\n\r\u3000\u2003\x0b\x0c\x1c\x85", min_size=1,
                                                          max_size=50), too_long, texts, wrong_text),
        "negative_prompt": lambda: st.one_of(too_long, texts, wrong_text),
        "width": lambda: bad_sizes(entry, json_only),
        "height": lambda: bad_sizes(entry, json_only),
        "steps": lambda: bad_ints(1, MAX_STEPS, json_only),
        "num_images": lambda: bad_ints(1, MAX_IMAGES_PER_JOB, json_only),
        "priority": lambda: bad_ints(-100, 100, json_only),
        "seed": lambda: bad_ints(0, SEED_MAX, json_only, allow_none=True),
        "guidance": lambda: st.one_of(
            st.floats(max_value=-5e-324), st.floats(min_value=math.nextafter(50.0, math.inf)),
            st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(max_value=-1), st.integers(min_value=51),
            huge_ints, wrong_types(json_only, number=True),
        ),
        "team": lambda: st.one_of(st.just(""), st.text(max_size=70).filter(lambda s: not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", s)), texts, wrong_text),
        "tags": lambda: st.one_of(
            st.text(max_size=10), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
            st.integers(), st.none(), st.booleans(),
            st.builds(lambda tag, n: [tag] * n, tags, st.integers(MAX_TAGS + 1, 1000)),
            st.builds(lambda good, bad: good + bad, st.lists(tags, max_size=3), st.lists(st.one_of(
                st.just(""), st.text(" \t\u3000", min_size=1, max_size=3),
                st.builds(lambda n: "t" * n, st.integers(65, 1000)), texts,
                with_inserted(st.sampled_from(["\n", "\x01", "\x7f", "\x9f"])), wrong_text), min_size=1, max_size=3)),
            *([] if json_only else [st.frozensets(tags, min_size=1, max_size=2).map(set)]),
        ),
        # Loopback and private targets are refused here: this farm published no webhook_allow_private.
        "webhook": lambda: st.one_of(
            st.just(""), st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
            st.sampled_from(["ftp://example.com/", "https://u:p@example.com/", "http://127.0.0.1/", "http://localhost/",
                             "https://exa mple.com/", "http:///x", "example.com", "http://[::1/", "https://h:99999/"]),
            st.builds(lambda n: "https://example.com/" + "a" * n, st.integers(2030, 3000))),
        # Names no family takes (a combined "DPM++ 2M Karras" is split by the A1111 API only, not here).
        "sampler": lambda: st.one_of(
            st.just(""), st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
            st.sampled_from(["euler", "Euler  a", "DPM++ 2M Karras", "k_euler", "LMS", "DPM++ SDE"]),
            st.builds(lambda n: "E" * n, st.integers(41, 200))),
        "schedule": lambda: st.one_of(
            st.just(""), st.integers(), st.booleans(), st.sampled_from(["karras", "Simple", "Normal", "Uniform"])),
        "init_image": lambda: st.one_of(
            st.just(""), st.integers(), st.booleans(), st.sampled_from(["a.png", "sha256:xyz", "sha256:" + "A" * 64]),
            st.just("sha256:" + "a" * 64)),  # well-formed, but never uploaded: refused naming init_image
        "mask": lambda: st.one_of(st.just(""), st.integers(), st.just("sha256:" + "a" * 64)),  # without init_image
        "strength": lambda: st.one_of(st.booleans(), st.just(math.nan), st.floats(1.01, 10), st.just(0.5)),
        "mask_blur": lambda: st.one_of(st.booleans(), st.integers(65, 1000), st.integers(max_value=-1), st.just(4.0)),
        "resize_mode": lambda: st.one_of(st.just(""), st.integers(0, 3), st.sampled_from(["Resize", "just resize"])),
        "inpaint_area": lambda: st.one_of(st.just(""), st.integers(), st.sampled_from(["Masked", "only masked"])),
        "mask_padding": lambda: st.one_of(st.booleans(), st.integers(257, 1000), st.integers(max_value=-1), st.just(4.0)),
        # Chains: a malformed reference, too many or repeated (a reference past the batch, to itself or to a job
        # that does not exist is the batch's error, not the spec's: tests/unit/test_chains.py).
        "after": lambda: st.one_of(
            st.just("abc"), st.integers(), st.booleans(), st.just(["a b"]), st.just([""]), st.just(["x", "x"]),
            st.just([f"j{i}" for i in range(33)])),
        "init_from": lambda: st.one_of(st.just(""), st.integers(), st.sampled_from(["a:x", "a:1:2", "#x"])),
        "hires": lambda: st.one_of(
            st.just("2"), st.integers(), st.just({"scale": 1.0}), st.just({"scale": 4.5}), st.just({"strength": 2}),
            st.just({"steps": -1}), st.just({"scale": 2, "upscaler": "Latent"}), st.just({"scale": math.nan})),
        "model_fingerprint": lambda: st.one_of(
            st.just(""), st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
            st.text(max_size=8).filter(lambda t: not re.fullmatch(r"[0-9A-Za-z]+", t)),
            st.builds(lambda n: "a" * n, st.integers(81, 300))),
        # With no node reporting its LoRAs (as here) a well-formed name is kept unchecked: only the form is bad.
        "loras": lambda: st.one_of(
            st.text(max_size=5), st.integers(), st.none(), st.booleans(),
            st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
            st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none(), st.booleans()), min_size=1, max_size=3),
            st.builds(lambda w: [{"name": "style", "weight": w}], st.one_of(
                st.floats(min_value=math.nextafter(MAX_LORA_WEIGHT, math.inf), allow_infinity=not json_only),
                st.floats(max_value=-math.nextafter(MAX_LORA_WEIGHT, math.inf), allow_infinity=not json_only),
                st.booleans(), st.text(max_size=3), st.none(),
                *([] if json_only else [st.sampled_from([math.nan, math.inf])]))),
            st.builds(lambda n: [{"name": n}], st.one_of(
                st.just(""), st.text(max_size=5).map(lambda t: t + ":"), st.text(max_size=3).map(lambda t: "<" + t),
                st.integers(), st.none())),
            st.just([{"name": "style"}, {"name": "style", "weight": 0.5}]),
            st.just([{"name": f"l{i}"} for i in range(MAX_LORAS + 1)]),
            st.just([{"name": "style", "strength": 1.0}]),
            st.just([{"weight": 1.0}]),
        ),
    }
    return options[field]()


FIELD_ORDER = sorted(FIELDS)


@st.composite
def invalid_specs(draw, json_only: bool = False) -> tuple[object, str]:
    """(spec, what its error must say): a valid spec with one field made bad, an unknown field, or no
    mapping at all. The second item is the field name, or a phrase for specs that are not mappings."""
    spec = draw(valid_specs(every_field=draw(st.booleans())))
    kind = draw(st.sampled_from(["field"] * 10 + ["unknown", "not a mapping"]))
    if kind == "field":
        field = draw(st.sampled_from(FIELD_ORDER))
        spec[field] = draw(bad_values(field, spec["model"], json_only))
        if field == "model":  # the sizes stay multiples of 16, fine without the model's rules too
            spec.pop("width", None), spec.pop("height", None)
        return spec, field
    if kind == "unknown":
        key = draw(st.one_of(st.text(string.ascii_lowercase + "_", min_size=1, max_size=12),
                             st.sampled_from(["Width", "prompts", "size", "colour", "nsfw", "cfg_scale"])))
        assume(key not in FIELDS)
        spec[key] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
        return spec, key
    return draw(st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=2),
                          st.floats(), st.booleans())), "expected a mapping of job fields"


def names_field(message: str, index: int, field: str) -> bool:
    """Whether `message` says that spec `index` is wrong in `field` (`jobs[2]: width: ...`, `jobs[2] (line
    4): tags.0: ...`), or, for a spec that is no mapping, says so."""
    if " " in field:
        return re.search(rf"jobs\[{index}\]( \(line \d+\))?: {re.escape(field)}", message) is not None
    return re.search(rf"jobs\[{index}\]( \(line \d+\))?: ([^;]*; )*?{re.escape(field)}[:.]", message) is not None


def snapshot(redis, client) -> tuple[int, int]:
    return redis.dbsize(), redis.zcard(client.store.keys.pending)


def check_refusal(message: str) -> None:
    assert len(message.splitlines()) == 1, message
    assert len(message) < 4000, message[:300]
    assert "Traceback" not in message


# --- the Python client ---------------------------------------------------------------------------------------


@pytest.fixture
def client(redis_url, redis_client):
    return FarmClient(redis_url)


def test_client_refuses_each_invalid_spec_and_names_the_field(client, redis_client):
    ran = 0

    @fuzz(QUOTAS["client_one_spec"])
    @given(invalid_specs())
    def run(case):
        nonlocal ran
        spec, field = case
        before = snapshot(redis_client, client)
        with pytest.raises(SpecError) as info:
            client.submit_batch([spec])
        message = str(info.value)
        check_refusal(message)
        assert names_field(message, 0, field), (message, field)
        assert message.endswith("nothing was enqueued")
        assert snapshot(redis_client, client) == before
        with pytest.raises(SpecError):  # validate() alone: SpecError too, never anything else
            client.validate(spec)
        ran += 1

    run()
    RAN["client_one_spec"] = ran
    assert ran >= QUOTAS["client_one_spec"]


def test_client_batch_with_one_bad_spec_enqueues_nothing(client, redis_client):
    ran = 0

    @fuzz(QUOTAS["client_mixed_batch"])
    @given(st.lists(valid_specs(every_field=False), min_size=1, max_size=5),
           st.lists(invalid_specs(), min_size=1, max_size=3), st.randoms(use_true_random=False))
    def run(good, bad, random):
        nonlocal ran
        batch = [(spec, None) for spec in good] + bad
        random.shuffle(batch)
        first_bad = next(i for i, (_, field) in enumerate(batch) if field is not None)
        before = snapshot(redis_client, client)
        with pytest.raises(SpecError) as info:
            client.submit_batch([spec for spec, _ in batch])
        message = str(info.value)
        check_refusal(message)
        assert names_field(message, first_bad, batch[first_bad][1]), (message, first_bad)
        assert snapshot(redis_client, client) == before
        ran += 1

    run()
    RAN["client_mixed_batch"] = ran
    assert ran >= QUOTAS["client_mixed_batch"]


def _generator(specs):
    yield from specs


@st.composite
def bad_batches(draw) -> tuple[dict, str]:
    """submit_batch arguments that are wrong as a whole: (kwargs, what the message must name)."""
    good = draw(st.lists(valid_specs(every_field=False), min_size=1, max_size=3))
    kind = draw(st.sampled_from(["specs", "specs", "job_ids", "job_ids", "batch_id"]))
    if kind == "specs":
        specs = draw(st.one_of(
            st.none(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=5), st.just(good[0]),
            st.just(JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64)),
            st.just(set()), st.just(frozenset({1})), st.just(_generator(good)), st.just(iter(good)),
            st.just({i: s for i, s in enumerate(good)}), st.just([]),
        ))
        return {"specs": specs}, "submit_batch takes a list" if specs != [] else "the batch is empty"
    if kind == "job_ids":
        bad_id = st.one_of(
            st.just(""), st.text(max_size=70).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", s)),
            st.builds(lambda n: "j" * n, st.integers(65, 10_000)), st.none(), st.integers(), st.lists(st.integers()),
            st.binary(max_size=4), st.sampled_from(["a:b", "../x", "a b", "ä", "a\x00", "\ud800"]),
        )
        ids = [f"ok-{i}" for i in range(len(good))]
        variant = draw(st.sampled_from(["bad id", "wrong count", "duplicates", "not a list"]))
        if variant == "bad id":
            ids[draw(st.integers(0, len(ids) - 1))] = draw(bad_id)
            expected = "job_ids["
        elif variant == "wrong count":
            ids = ids + ["extra"] if draw(st.booleans()) or len(ids) == 1 else ids[:-1]
            expected = "job_ids has"
        elif variant == "duplicates":
            ids = ["same"] * len(good) if len(good) > 1 else ["same", "same"]
            expected = "job_ids" if len(good) > 1 else "job_ids has"
        else:
            ids = draw(st.one_of(st.text(min_size=1, max_size=5), st.integers(), st.just({"a": 1}),
                                 st.just(iter(["a"]))))
            expected = "job_ids: expected a list"
        return {"specs": good, "job_ids": ids}, expected
    batch_id = draw(st.one_of(
        st.just(""), st.sampled_from(["a:b", "x" * 65, "rf:pending", "a b", "\ud800", "é"]),
        st.integers(), st.lists(st.integers(), max_size=2), st.binary(max_size=3),
    ))
    return {"specs": good, "batch_id": batch_id}, "batch_id"


def test_client_refuses_bad_batches_job_ids_and_batch_ids(client, redis_client):
    ran = 0

    @fuzz(QUOTAS["client_batch_shape"])
    @given(bad_batches())
    def run(case):
        nonlocal ran
        kwargs, expected = case
        specs = kwargs.pop("specs")
        before = snapshot(redis_client, client)
        with pytest.raises(SpecError) as info:
            client.submit_batch(specs, **kwargs)
        check_refusal(str(info.value))
        assert expected in str(info.value), (str(info.value), expected)
        assert snapshot(redis_client, client) == before
        ran += 1

    run()
    RAN["client_batch_shape"] = ran
    assert ran >= QUOTAS["client_batch_shape"]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"width": True}, "width: Input should be a valid integer"),
        ({"prompt": 5}, "prompt: Input should be a valid string"),
        ({"prompt": b"a fox"}, "prompt: Input should be a valid string"),
        ({"guidance": "nan"}, "guidance: Input should be a valid number"),
        ({"guidance": "5"}, "guidance: Input should be a valid number"),
        ({"guidance": math.nan}, "guidance: guidance must be a finite number"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"seed": 2**70}, "seed: Input should be less than or equal to 4294967295"),
        ({"tags": "abc"}, "tags: tags must be a list of strings, not str"),
        ({"tags": {"a", "b"}}, "tags: tags must be a list of strings, not set"),
        ({"tags": ["ok", "a\nb"]}, "tags: tag 1 'a\\nb' contains a control character"),
        ({"width": 512.0}, "width: Input should be a valid integer"),
        ({"negative_prompt": "a\x00b"}, "negative_prompt: negative_prompt contains a NUL character at position 1"),
        ({"prompt": "a\ud800"}, "prompt: prompt contains a lone surrogate '\\ud800' at position 1"),
        ({"tags": ["\udfff"]}, "tags: tag 0 contains a lone surrogate"),
        ({"colour\n\u202e": 1}, "'colour\\n\\u202e': Extra inputs are not permitted"),
        ({"c" * 100_000: 1}, "'cccccccccccccccccccccccccccccccccccccccc'...: Extra inputs"),
    ],
)
def test_named_bad_inputs(client, redis_client, change, expected):
    before = snapshot(redis_client, client)
    with pytest.raises(SpecError) as info:
        client.submit_batch([{"model": "tiny-sd15", "prompt": "a fox", **change}])
    assert f"jobs[0]: {expected}" in str(info.value)
    check_refusal(str(info.value))
    assert snapshot(redis_client, client) == before


def test_many_unknown_fields_make_one_short_line(client):
    with pytest.raises(SpecError, match=r"and 995 more problems") as info:
        client.validate({"model": "tiny-sd15", "prompt": "x", **{f"f{i}": i for i in range(1000)}})
    check_refusal(str(info.value))


@pytest.mark.parametrize("batch", [None, [None], [[{"model": "tiny-sd15", "prompt": "x"}]], ["spec"]])
def test_specs_that_are_not_mappings(client, batch):
    with pytest.raises(SpecError):
        client.submit_batch(batch)


def test_largest_batch_is_accepted_and_one_more_is_refused(client, redis_client):
    spec = {"model": "tiny-sd15", "prompt": "a fox", "width": 32, "height": 32, "steps": 1, "seed": 1}
    with pytest.raises(SpecError, match=f"at most {MAX_BATCH_JOBS} per call"):
        client.submit_batch([spec] * (MAX_BATCH_JOBS + 1))
    assert redis_client.dbsize() == 0
    ids = client.submit_batch([spec] * MAX_BATCH_JOBS)
    assert len(set(ids)) == MAX_BATCH_JOBS == client.store.counts()["queued"]


def expected_spec(spec: dict) -> dict:
    """What a valid input spec must read back as: the model's defaults for what it leaves out."""
    entry = CATALOG.get(spec["model"])
    defaults = {"negative_prompt": "", "width": entry.default_size, "height": entry.default_size,
                "steps": entry.default_steps, "guidance": entry.default_guidance, "num_images": 1, "priority": 0,
                "team": "default", "tags": ()}
    return {**defaults, **spec, "tags": tuple(spec.get("tags", ())), "loras": (), "model_fingerprint": None,
            "webhook": spec.get("webhook"), "sampler": spec.get("sampler"), "schedule": spec.get("schedule"),
            "init_image": None, "mask": None, "strength": None, "mask_blur": 4, "resize_mode": "none",
            "inpaint_area": "whole", "mask_padding": 32, "after": (), "init_from": None, "hires": None}


def check_round_trip(client, ids: list[str], specs: list[dict]) -> None:
    stored = client.jobs(ids)  # read back from Redis, parsed from the stored hash
    for job, spec in zip(stored, specs):
        got = job.spec.model_dump()
        want = expected_spec(spec)
        if "seed" not in spec:
            assert 0 <= got.pop("seed") <= SEED_MAX
        assert got == want
        assert math.copysign(1, got["guidance"]) == math.copysign(1, want["guidance"])  # -0.0 stays -0.0


def test_valid_extreme_specs_round_trip_through_redis(client, redis_client):
    ran = 0

    @fuzz(120)
    @given(st.lists(st.one_of(valid_specs(every_field=True), valid_specs(every_field=False)), min_size=1, max_size=4))
    def run(specs):
        nonlocal ran
        try:
            ids = client.submit_batch(specs)
            assert client.store.counts()["queued"] == len(specs)
            check_round_trip(client, ids, specs)
        finally:
            redis_client.flushdb()
        ran += 1

    run()
    assert ran >= 120


# --- the CLI, in-process ----------------------------------------------------------------------------------


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits only for --help now; errors come back from main()
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def check_cli_refusal(code, out: str, err: str, as_json: bool) -> str:
    """The error message, after checking its form: exit 1, one JSON object or one `error:` line."""
    assert "Traceback" not in out + err
    assert code == 1, (code, out, err)
    if as_json:
        lines = out.splitlines()
        assert len(lines) == 1, out
        payload = json.loads(lines[0])
        assert payload["ok"] is False and isinstance(payload["error"], str)
        message = payload["error"]
    else:
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("renderfarm submit: error: "), err
        message = lines[0].removeprefix("renderfarm submit: error: ")
    check_refusal(message)
    return message


def to_json(value) -> str:
    return json.dumps(value)  # NaN and Infinity as Python writes them; lone surrogates escaped (\ud800)


@st.composite
def spec_files(draw) -> tuple[str, str]:
    """(file text, what the error must name): a JSON list or JSON Lines with valid and invalid specs, or
    content that is not a spec file at all."""
    kind = draw(st.sampled_from(["specs"] * 5 + ["garbage"]))
    if kind == "garbage":
        text = draw(st.one_of(
            st.text(max_size=40), st.just(""), st.text(" \n\t", max_size=5), st.sampled_from([
                "[]", "[", "{", "null", "5", '"x"', "[1, 2]", "{}", '{"model": "tiny-sd15"}', '[{"prompt": "x"}]',
                '{"model":"tiny-sd15","prompt":"a"}{"b":2}', '{"model":"tiny-sd15","prompt":"a","prompt":"b"}',
                "[" * 3000 + "]" * 3000, '{"width": 1' + "0" * 5000 + "}", '{"model":"tiny-sd15","prompt":"a",}',
                "\ufeff{}", "[null]", '[{"model":"tiny-sd15","prompt":"a"}, 5]',
            ]),
            st.builds(lambda spec, cut: to_json(spec)[:cut], valid_specs(), st.integers(0, 20)),
        ))
        return text, ""
    good = draw(st.lists(valid_specs(every_field=False), max_size=3))
    bad = draw(st.lists(invalid_specs(json_only=True), min_size=1, max_size=2))
    entries = [(spec, None) for spec in good] + bad
    entries = draw(st.permutations(entries))
    first_bad = next(i for i, (_, field) in enumerate(entries) if field is not None)
    field = entries[first_bad][1]
    if draw(st.booleans()):
        return "[\n" + ",\n".join(to_json(spec) for spec, _ in entries) + "\n]", f"jobs[{first_bad}]|{field}"
    lines, line_of = [], []
    for spec, _ in entries:
        lines += [""] * draw(st.integers(0, 2))  # blank lines are skipped, and still counted
        lines.append(to_json(spec))
        line_of.append(len(lines))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"])), \
        f"jobs[{first_bad}] (line {line_of[first_bad]})|{field}"


def test_cli_specs_file_refuses_invalid_specs_and_enqueues_nothing(redis_url, redis_client, capsys, tmp_path):
    ran = 0
    path = tmp_path / "specs.jsonl"
    client = FarmClient(redis_url)

    @fuzz(QUOTAS["cli_specs_file"])
    @given(spec_files(), st.booleans())
    def run(case, as_json):
        nonlocal ran
        text, expected = case
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        before = snapshot(redis_client, client)
        argv = ["submit", "--specs", str(path), "--redis", redis_url, "--no-wait"] + (["--json"] if as_json else [])
        message = check_cli_refusal(*run_cli(capsys, argv), as_json)
        assert str(path) in message
        if expected:
            label, field = expected.split("|")
            index = int(re.match(r"jobs\[(\d+)\]", label).group(1))
            assert label in message and names_field(message, index, field), (message, expected)
            assert message.endswith("nothing was enqueued")
        assert snapshot(redis_client, client) == before
        ran += 1

    run()
    RAN["cli_specs_file"] = ran
    assert ran >= QUOTAS["cli_specs_file"]


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _int_or_none(text: str) -> int | None:
    """The whole number a submit flag reads from `text`: ASCII digits with an optional sign."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[+-]?[0-9]{1,30}", text) else None


def _python_int(text: str) -> int | None:
    """What int() makes of `text` (--size uses it: it also takes " 64", "6_4" and other scripts' digits)."""
    try:
        return int(text)
    except ValueError:
        return None


def _bad_int_text(low: int, high: int):
    # Whole numbers out of range, and text that is no whole number at all ("nan", "1e9", "5.0", "٥", "1_0").
    numbers = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1), huge_ints).map(str)
    other = st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e9", "5.0", "0x10", "٥", "1_0",
                                                            "", " ", "+-5", "--5", "9" * 5000]))
    return st.one_of(numbers, other.filter(lambda t: (v := _int_or_none(t)) is None or not low <= v <= high))


def _bad_size_text():
    side = st.one_of(st.integers(max_value=31), st.integers(min_value=1025), st.integers(32, 1024).filter(
        lambda v: v % 8), huge_ints).map(str)
    sizes = st.one_of(st.builds(lambda a, b: f"{a}x{b}", side, st.sampled_from(["64", "-5", "x"])),
                      st.builds(lambda a, b: f"{a}X{b}", st.sampled_from(["64", "1e3"]), side))

    def unparsable(text: str) -> bool:
        parts = text.lower().split("x")
        if len(parts) != 2:
            return True
        sides = [_python_int(p) for p in parts]
        return any(v is None or not 32 <= v <= 1024 or v % 8 for v in sides)

    return st.one_of(sizes, st.text(max_size=12).filter(unparsable), st.sampled_from(["-5", "64", "64x", "x64",
                                                                                     "64x64x64", "nanxnan"]))


# For each flag: bad values, and the names one of which its message must carry.
ARGV_CASES = {
    "--steps": (_bad_int_text(1, MAX_STEPS), ("--steps", "steps:")),
    "--images": (_bad_int_text(1, MAX_IMAGES_PER_JOB), ("--images", "num_images:")),
    "--count": (_bad_int_text(1, MAX_BATCH_JOBS), ("--count",)),
    "--seed": (_bad_int_text(0, SEED_MAX), ("--seed", "seed:")),
    "--priority": (_bad_int_text(-100, 100), ("--priority", "priority:")),
    "--guidance": (st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-1e9", "1e999", "51", "-0.5"]))
                   .filter(lambda t: (v := _float_or_none(t)) is None or not 0 <= v <= 50 or not math.isfinite(v)),
                   ("--guidance", "guidance:")),
    "--timeout": (st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-1", "0", "-inf"])).filter(
        lambda t: (v := _float_or_none(t)) is None or not v > 0 or not math.isfinite(v)), ("--timeout",)),
    "--size": (_bad_size_text(), ("--size", "width:", "height:")),
    "--model": (st.text(max_size=30).filter(lambda s: s not in CATALOG), ("model:",)),
    "--team": (st.text(max_size=70).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", s)),
               ("team:",)),
    "--negative": (st.one_of(too_long, with_inserted(st.just("\x00")), with_inserted(surrogates)),
                   ("negative_prompt:",)),
    "PROMPT": (st.one_of(st.just(""), st.text(" \t\n\u3000", min_size=1, max_size=5), too_long,
                         with_inserted(st.just("\x00")), with_inserted(surrogates)), ("prompt:", "PROMPT")),
    "--specs": (st.sampled_from(["--model=tiny-sd15", "--size=64x64", "--count=1", "--team=a", "--seed=1",
                                 "--negative=", "--prompts=p.txt", "a prompt"]), ("--specs",)),
}


def test_cli_flags_refuse_bad_values_and_enqueue_nothing(redis_url, redis_client, capsys, tmp_path):
    ran = 0
    client = FarmClient(redis_url)
    specs_file = tmp_path / "one.jsonl"
    specs_file.write_text(to_json({"model": "tiny-sd15", "prompt": "a fox"}))

    @fuzz(QUOTAS["cli_argv"])
    @given(st.sampled_from(sorted(ARGV_CASES)).flatmap(lambda f: st.tuples(st.just(f), ARGV_CASES[f][0])),
           st.booleans())
    def run(case, as_json):
        nonlocal ran
        flag, value = case
        argv = ["submit", "--redis", redis_url, "--no-wait"] + (["--json"] if as_json else [])
        if flag == "PROMPT":
            argv += ["--", value]
        elif flag == "--specs":
            argv += ["--specs", str(specs_file), *(["--", value] if value == "a prompt" else [value])]
        else:
            argv += [f"{flag}={value}", "--", "a fox"]  # `=`: a value starting with '-' stays a value
        before = snapshot(redis_client, client)
        message = check_cli_refusal(*run_cli(capsys, argv), as_json)
        assert any(name in message for name in ARGV_CASES[flag][1]), (flag, value[:50], message)
        assert snapshot(redis_client, client) == before
        ran += 1

    run()
    RAN["cli_argv"] = ran
    assert ran >= QUOTAS["cli_argv"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--size", "-5", "7"], "--size '-5': expected WIDTHxHEIGHT"),  # "7" becomes the prompt
        (["a fox", "--steps", "nan"], "--steps 'nan': expected a whole number"),
        (["a fox", "--images", "1e9"], "--images '1e9': expected a whole number"),
        (["a fox", "--count", "1000000000000"], "at most 10000 jobs per submit"),
        (["a fox", "--guidance", "inf"], "--guidance 'inf': expected a finite number"),
        (["a fox", "--timeout", "nan"], "--timeout 'nan': expected a finite number"),
        (["x" * 100_000], "prompt: String should have at most 4000 characters"),
        (["a fox", "--size", "64x64", "--images", "17"], "num_images: Input should be less than or equal to 16"),
        ([], "give a PROMPT, --prompts FILE or --specs FILE"),
    ],
)
def test_cli_argv_examples(redis_url, redis_client, capsys, argv, expected):
    code, out, err = run_cli(capsys, ["submit", "--redis", redis_url, "--no-wait", "--json", *argv])
    assert expected in check_cli_refusal(code, out, err, as_json=True)
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("argv", [["a fox", "--size", "-5", "7"], ["a fox", "--guidance", "-1e9"], ["a", "--colour"]])
def test_cli_malformed_command_lines_are_argparse_errors(redis_url, redis_client, capsys, argv):
    # A command line argparse cannot split (an extra argument, a value that looks like a flag) is refused
    # before `submit` runs: exit 2 and one JSON object with --json; usage and one `error:` line without.
    code, out, err = run_cli(capsys, ["submit", "--redis", redis_url, "--no-wait", "--json", *argv])
    assert code == 2 and "Traceback" not in err
    payload = json.loads(out)
    assert payload["ok"] is False and payload["error"].startswith("renderfarm") and "error:" in payload["error"]
    code, out, err = run_cli(capsys, ["submit", "--redis", redis_url, "--no-wait", *argv])
    assert code == 2 and out == "" and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line][0].startswith("renderfarm")
    assert redis_client.dbsize() == 0


def test_cli_specs_file_errors_name_the_file_and_line(redis_url, redis_client, capsys, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"model": "tiny-sd15", "prompt": "ok"}\n\n{"model": "tiny-flux", "prompt": "x", "width": 72}\n')
    message = check_cli_refusal(*run_cli(capsys, ["submit", "--specs", str(path), "--redis", redis_url, "--json"]),
                                as_json=True)
    assert message == (f"--specs {path}: jobs[1] (line 3): width: width=72 must be a multiple of 16 for flux "
                       "models such as tiny-flux; nothing was enqueued")
    path.write_bytes(b'{"model": "tiny-sd15", "prompt": "ok"}\n\xff\n')
    message = check_cli_refusal(*run_cli(capsys, ["submit", "--specs", str(path), "--redis", redis_url]), False)
    assert message == f"--specs {path} line 2: not UTF-8 text (byte 0xff)"
    path.write_text(json.dumps([{"model": "tiny-sd15", "prompt": "x"}] * (MAX_BATCH_JOBS + 1)))
    message = check_cli_refusal(*run_cli(capsys, ["submit", "--specs", str(path), "--redis", redis_url]), False)
    assert message == f"--specs {path}: {MAX_BATCH_JOBS + 1} job specs; at most {MAX_BATCH_JOBS} per batch"
    message = check_cli_refusal(*run_cli(capsys, ["submit", "--specs", str(tmp_path / "nope.json"), "--redis",
                                                  redis_url]), False)
    assert message == f"--specs {tmp_path / 'nope.json'}: No such file or directory"
    message = check_cli_refusal(*run_cli(capsys, ["submit", "--specs", str(path), "--model", "sdxl", "--steps",
                                                  "4", "--redis", redis_url]), False)
    assert message.startswith("--specs takes every job field from its file; drop --model, --steps")
    assert redis_client.dbsize() == 0


def test_cli_specs_file_accepts_valid_extremes_and_they_round_trip(redis_url, redis_client, capsys, tmp_path):
    ran = 0
    path = tmp_path / "specs.json"
    client = FarmClient(redis_url)

    @fuzz(30)
    @given(st.lists(valid_specs(every_field=False), min_size=1, max_size=4), st.booleans())
    def run(specs, as_list):
        nonlocal ran
        text = json.dumps(specs, ensure_ascii=False) if as_list else "\n".join(json.dumps(s) for s in specs)
        path.write_text(text, encoding="utf-8")
        try:
            code, out, err = run_cli(capsys, ["submit", "--specs", str(path), "--redis", redis_url, "--no-wait",
                                              "--json"])
            assert code == 0, (out, err)
            ids = json.loads(out)["jobs"]
            assert len(ids) == len(specs) == client.store.counts()["queued"]
            check_round_trip(client, ids, specs)
        finally:
            redis_client.flushdb()
        ran += 1

    run()
    assert ran >= 30


def test_cli_prompt_flags_still_submit(redis_url, redis_client, capsys):
    code, out, _ = run_cli(capsys, ["submit", "a fox 😀", "--size", "64x32", "--steps", "3", "--guidance", "2.5",
                                    "--count", "2", "--seed", str(SEED_MAX - 1), "--priority", "-100", "--team",
                                    "t.1", "--images", "16", "--redis", redis_url, "--no-wait", "--json"])
    assert code == 0, out
    jobs = FarmClient(redis_url).jobs(json.loads(out)["jobs"])
    assert [(j.spec.seed, j.spec.width, j.spec.height, j.spec.prompt) for j in jobs] == [
        (SEED_MAX - 1, 64, 32, "a fox 😀"), (SEED_MAX, 64, 32, "a fox 😀")]


def test_at_least_1000_invalid_specs_were_generated():
    """Runs last (pytest keeps file order): the fuzz tests above must all have run, with their quotas."""
    if set(RAN) != set(QUOTAS):
        pytest.skip(f"only part of this module ran ({sorted(RAN)}); the count needs all of it")
    assert all(RAN[name] >= quota for name, quota in QUOTAS.items()), RAN
    assert sum(RAN.values()) >= 1000, RAN
