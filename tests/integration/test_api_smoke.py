"""The API as deployed: `uvicorn samseg.api:app` in its own process, over moto's SQS on loopback.

The route, auth and signature matrices run in-process against create_app(settings) in
tests/unit/test_api_security.py; this one test checks that the real server starts from the environment
alone, serves the open and protected routes, and puts an accepted job on the real jobs queue as plain JSON.
"""

from __future__ import annotations

import json

import httpx

from tests.support import AUTH


def test_uvicorn_serves_the_app_and_post_jobs_reaches_the_sqs_queue(make_stack):
    stack = make_stack()
    api = stack.start_api()  # waits for /healthz
    job = {"uuid": "smoke-1", "image_url": "https://example.com/a.png"}

    assert httpx.get(f"{api}/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{api}/openapi.json", timeout=10).status_code == 200
    refused = httpx.post(f"{api}/jobs", json=job, timeout=10)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")

    accepted = httpx.post(f"{api}/jobs", json=job, headers=AUTH, timeout=30)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status_url"] == f"{api}/jobs/smoke-1"
    status = httpx.get(f"{api}/jobs/smoke-1", headers=AUTH, timeout=10)
    assert status.status_code == 200 and status.json()["status"] == "queued"

    sqs = stack.sqs()
    url = sqs.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"]
    received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=5)["Messages"]
    assert [json.loads(m["Body"]) for m in received] == [job]  # the raw JSON the app server would send

    ready = httpx.get(f"{api}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
