"""The HTTP API (renderfarm/api) over a real farm: uvicorn on a free loopback port, a real redis-server, a private
Ray and the stand-in models. Native endpoints, Server-Sent Events, team tokens, A1111 compatibility (its hires
fix included) through the unmodified `webuiapi` client from PyPI."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest

from tests.helpers import ApiServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SPEC = {"model": "tiny-sd15", "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def api(farm):
    with ApiServer(farm.redis_url, a1111_timeout_s=300) as server:
        yield server


@pytest.fixture
def http(api):
    with httpx.Client(base_url=api.url, timeout=120) as client:
        yield client


@pytest.fixture
def tokens(farm):
    """An admin token and two team tokens; the farm is back in open mode afterwards."""
    from renderfarm.cluster import auth
    from renderfarm.cluster.keys import Keys
    from renderfarm.cluster.redis_server import connect

    redis = connect(farm.redis_url)
    keys = Keys()
    made = {"admin": auth.create_token(redis, keys, "ops", admin=True)[0],
            "red": auth.create_token(redis, keys, "red")[0], "blue": auth.create_token(redis, keys, "blue")[0]}
    try:
        yield made
    finally:
        redis.delete(keys.tokens)
        redis.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sse_states(http: httpx.Client, path: str, headers=None) -> list[dict]:
    """Every `state` event of a stream that ends by itself (one following given jobs)."""
    events = []
    with http.stream("GET", path, headers=headers, timeout=300) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        data = None
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
            elif line == "" and data is not None:
                events.append(data)
                data = None
    return events


def test_health_and_docs(http):
    assert http.get("/v1/health").json() == {"ok": True, "redis": "ok"}
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json").json()
    for path in ("/v1/batches", "/v1/jobs/{job_id}", "/v1/events", "/sdapi/v1/txt2img", "/sdapi/v1/sd-models"):
        assert path in schema["paths"], path


def test_submit_follow_and_fetch(http, farm):
    from PIL import Image

    submitted = http.post("/v1/batches", json={"jobs": [{**SPEC, "seed": 1}, {**SPEC, "seed": 2, "num_images": 2}]})
    assert submitted.status_code == 201, submitted.text
    body = submitted.json()
    batch, ids = body["batch_id"], body["job_ids"]
    assert len(ids) == 2
    events = sse_states(http, f"/v1/events?batch={batch}")
    finished = {e["job"]: e["state"] for e in events if e["state"] in ("done", "failed", "cancelled")}
    assert finished == dict.fromkeys(ids, "done"), events
    assert all(e["batch_id"] == batch for e in events)
    view = http.get(f"/v1/batches/{batch}").json()
    assert view["finished"] is True and view["counts"] == {"done": 2}
    job = http.get(f"/v1/jobs/{ids[1]}").json()
    assert job["state"] == "done" and job["images"] == 2 and len(job["images_url"]) == 2
    png = http.get(job["images_url"][1])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 64) and "Seed: 3" in image.info["parameters"]  # the job's second image: seed + 1
    result = http.get(f"/v1/jobs/{ids[0]}/result").json()
    assert base64.b64decode(result["images"][0]) == farm.client().result(ids[0]).png[0]
    assert result["parameters"][0].startswith("a lighthouse at dusk")
    assert http.get(f"/v1/jobs/{ids[0]}/images/5").status_code == 409
    assert http.get("/v1/jobs/no-such-job").status_code == 404
    assert http.get("/v1/batches/no-such-batch").status_code == 404


def test_bad_batch_is_refused_whole(http, farm):
    before = farm.client().store.counts()
    reply = http.post("/v1/batches", json={"jobs": [SPEC, {**SPEC, "width": -5}, {**SPEC, "model": "nope"}]})
    assert reply.status_code == 422
    body = reply.json()
    assert body["enqueued"] == 0 and "nothing was enqueued" in body["detail"]
    assert any(e.startswith("jobs[1]: width") for e in body["errors"]), body
    assert any(e.startswith("jobs[2]: model") for e in body["errors"]), body
    assert farm.client().store.counts() == before
    for bad in ({"jobs": []}, {"jobs": "x"}, {"jobs": [SPEC], "extra": 1}, [1, 2]):
        assert http.post("/v1/batches", json=bad).status_code == 422, bad
    assert http.post("/v1/batches", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert farm.client().store.counts() == before


def test_team_tokens(http, tokens):
    assert http.get("/v1/jobs").status_code == 401  # token mode: no token, nothing
    assert http.get("/v1/jobs", headers=bearer("rft_not-a-token")).status_code == 401
    assert http.get("/v1/health").status_code == 200  # liveness needs none
    red = http.post("/v1/jobs", json=SPEC, headers=bearer(tokens["red"])).json()["job_ids"][0]
    blue = http.post("/v1/jobs", json=SPEC, headers=bearer(tokens["blue"])).json()["job_ids"][0]
    assert http.get(f"/v1/jobs/{red}", headers=bearer(tokens["red"])).json()["spec"]["team"] == "red"
    assert http.get(f"/v1/jobs/{blue}", headers=bearer(tokens["red"])).status_code == 403
    assert http.post(f"/v1/jobs/{blue}/cancel", headers=bearer(tokens["red"])).json() == {
        blue: "not cancelled: belongs to team blue"}
    listed = http.get("/v1/jobs?limit=1000", headers=bearer(tokens["red"])).json()["jobs"]
    assert {j["spec"]["team"] for j in listed} == {"red"}
    assert http.get("/v1/jobs?team=blue", headers=bearer(tokens["red"])).status_code == 403
    seen = {j["id"] for j in http.get("/v1/jobs?limit=1000", headers=bearer(tokens["admin"])).json()["jobs"]}
    assert {red, blue} <= seen
    other_team = {**SPEC, "team": "blue"}
    refused = http.post("/v1/batches", json={"jobs": [other_team]}, headers=bearer(tokens["red"]))
    assert refused.status_code == 422 and "team" in refused.json()["detail"]
    # HTTP Basic auth with the token as the password (what A1111 clients send)
    basic = httpx.BasicAuth("anyone", tokens["red"])
    assert http.get(f"/v1/jobs/{red}", auth=basic).status_code == 200
    for job_id, token in ((red, tokens["red"]), (blue, tokens["blue"])):  # both finish before the tokens go
        states = sse_states(http, f"/v1/events?job={job_id}", headers=bearer(token))
        assert states[-1]["state"] == "done"


def test_api_refuses_open_binding(farm, tokens):
    from renderfarm.cli.api import InsecureApi, check_binding
    from renderfarm.cluster.keys import Keys
    from renderfarm.cluster.redis_server import connect

    redis = connect(farm.redis_url)
    try:
        check_binding("0.0.0.0", redis, Keys())  # token mode: allowed
        saved = redis.dump(Keys().tokens)
        redis.delete(Keys().tokens)
        try:
            check_binding("127.0.0.1", redis, Keys())
            with pytest.raises(InsecureApi, match="token create"):
                check_binding("0.0.0.0", redis, Keys())
        finally:
            redis.restore(Keys().tokens, 0, saved)
    finally:
        redis.close()


def test_webuiapi_client(api, farm):
    """The unmodified `webuiapi` package, as studio scripts use it."""
    import webuiapi

    host, port = api.url.removeprefix("http://").split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Default")
    assert {m["title"] for m in client.get_sd_models()} >= {"tiny-sd15"}
    client.set_options({"sd_model_checkpoint": "tiny-sd15"})
    assert client.get_options()["sd_model_checkpoint"] == "tiny-sd15"
    result = client.txt2img(prompt="a red kite over hills", negative_prompt="blurry", width=64, height=64, steps=2,
                            seed=1234, batch_size=2, n_iter=2, cfg_scale=6.0)
    assert len(result.images) == 4 and all(img.size == (64, 64) for img in result.images)
    assert result.info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert result.info["sd_model_name"] == "tiny-sd15"
    assert "Seed: 1236" in result.info["infotexts"][2] and "CFG scale: 6.0" in result.info["infotexts"][0]
    assert len(set(result.info["renderfarm"]["job_ids"])) == 2  # n_iter jobs of batch_size images each
    with pytest.raises(RuntimeError) as refused:
        client.txt2img(prompt="x", width=64, height=64, steps=2, restore_faces=True)
    assert refused.value.args[0] == 422 and "restore_faces" in refused.value.args[1]
    default = webuiapi.WebUIApi(host=host, port=int(port))  # webuiapi's own default sampler: "Euler a"
    ancestral = default.txt2img(prompt="a red kite over hills", width=64, height=64, steps=2, seed=1234)
    assert "Sampler: Euler a" in ancestral.info["infotexts"][0]
    assert ancestral.images[0].tobytes() != result.images[0].tobytes()  # another sampler, another image
    karras = default.txt2img(prompt="x", width=64, height=64, steps=2, seed=1, sampler_name="DPM++ 2M Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in karras.info["infotexts"][0]
    with pytest.raises(RuntimeError) as flux:
        default.txt2img(prompt="x", width=64, height=64, steps=2, override_settings={"sd_model_checkpoint": "tiny-flux"})
    assert flux.value.args[0] == 422 and "sampler" in flux.value.args[1] and "Euler" in flux.value.args[1]
    assert client.get_progress()["state"]["job_count"] == 0
    assert isinstance(client.get_loras(), list)


def test_a1111_hires_fix(http):
    """`enable_hr` through the farm: each iteration a first pass and a hires pass; the answer is the hires passes'
    images at the final size, `info` and the infotexts as A1111 reports a hires fix."""
    from PIL import Image

    from renderfarm.infotext import parse_a1111_parameters

    body = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 77, "batch_size": 2,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, "enable_hr": True, "hr_scale": 2,
            "hr_second_pass_steps": 2, "hr_upscaler": "Lanczos", "denoising_strength": 0.5}
    answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in reply["images"]]
    assert [image.size for image in images] == [(128, 128)] * 2
    info = json.loads(reply["info"])
    assert (info["width"], info["height"], info["steps"], info["denoising_strength"]) == (64, 64, 2, 0.5)
    assert info["extra_generation_params"] == {"Denoising strength": 0.5, "Hires upscale": 2.0, "Hires steps": 2,
                                               "Hires upscaler": "Lanczos"}
    assert info["all_seeds"] == [77, 78]
    assert [image.info["parameters"] for image in images] == info["infotexts"]
    for k, text in enumerate(info["infotexts"]):
        params = parse_a1111_parameters(text)
        assert (params["Size"], params["Steps"], params["Seed"]) == ("64x64", "2", str(77 + k))
        assert (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"]) == ("2.0", "2", "Lanczos")
        assert params["Denoising strength"] == "0.5"
    farm = info["renderfarm"]
    assert farm["first_pass_job_ids"] == [farm["job_ids"][0] + "-base"] and len(farm["first_pass_nodes"]) == 1


def test_webuiapi_hires_fix(api):
    """webuiapi's txt2img with enable_hr: its default upscaler ("Latent") is refused naming hr_upscaler;
    "Lanczos" renders the hires pass."""
    import webuiapi

    host, port = api.url.removeprefix("http://").split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Default")
    model = {"sd_model_checkpoint": "tiny-sd15"}
    result = client.txt2img(prompt="a red kite over hills", width=64, height=64, steps=2, seed=9, enable_hr=True,
                            hr_scale=2, hr_second_pass_steps=2, hr_upscaler=webuiapi.HiResUpscaler.Lanczos,
                            override_settings=model)
    assert [image.size for image in result.images] == [(128, 128)]
    assert "Hires upscale: 2.0, Hires steps: 2, Hires upscaler: Lanczos" in result.info["infotexts"][0]
    assert "Denoising strength: 0.7" in result.info["infotexts"][0]  # webuiapi's default, A1111's UI's
    with pytest.raises(RuntimeError) as latent:
        client.txt2img(prompt="x", width=64, height=64, steps=2, enable_hr=True, override_settings=model)
    assert latent.value.args[0] == 422 and "hr_upscaler" in latent.value.args[1]


def test_a1111_fields_map_or_are_refused(http):
    unknown = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "controlnet_units": []})
    assert unknown.status_code == 422 and "controlnet_units" in unknown.text
    override = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert override.status_code == 422 and "CLIP_stop_at_last_layers" in override.text
    bad = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": "wide"})
    assert bad.status_code == 422 and "width" in bad.text
    too_many = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 1000})
    assert too_many.status_code == 422 and "batch_size" in too_many.text
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
    assert http.post("/sdapi/v1/options", json={"sd_vae": "auto"}).status_code == 422
    no_image = http.post("/sdapi/v1/img2img", json={})  # img2img takes init_images[0] (tests/integration/test_inputs_api.py)
    assert no_image.status_code == 422 and "init_images" in no_image.text
    latent = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "hr_upscaler": "Latent"})
    assert latent.status_code == 422 and latent.json()["detail"]["field"] == "hr_upscaler"  # test_a1111_hires.py


def test_metrics_scraped(http, farm):
    """/metrics parses as Prometheus text and counts what the farm did (the jobs the tests above finished)."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    done = farm.client().store.counts()["done"]
    jobs = {s.labels["state"]: s.value for s in families["renderfarm_jobs"].samples}
    assert jobs["done"] == done > 0
    images = sum(s.value for s in families["renderfarm_node_images"].samples if s.name.endswith("_total"))
    assert images >= done
