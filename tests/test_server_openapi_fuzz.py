"""Schemathesis over the server's own OpenAPI document, against a real `heinfer serve` on
127.0.0.1: generated valid and invalid requests for every operation, with a fixed seed and a
bounded budget (CI), 0 responses 5xx allowed, and the responses must match the document
(status codes, media types, bodies, `Allow` on 405).

The longer run (docs/SERVICE.md, "Fuzzing") is the same command with a larger budget:

    HEINFER_OPENAPI_FUZZ_EXAMPLES=2000 \
        .venv/bin/python -m pytest -q tests/test_server_openapi_fuzz.py -s
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from heinfer_client.keys import LocalKeys
from tests.test_server_support import ADMIN, http, new_session, running_server, spec_of, tiny_plan

EXAMPLES = int(os.environ.get("HEINFER_OPENAPI_FUZZ_EXAMPLES", "25"))  # per operation
SEED = int(os.environ.get("HEINFER_OPENAPI_FUZZ_SEED", "20261202"))
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,allow_header_conformance")


def realistic_values(d: Path, url: str) -> Path:
    """Half the cases would end at a 404 for a random model or session name: a real one for
    the routes that read it, so that their bodies reach the framing checks. (Not for the
    DELETE routes: they would remove what the others use.)"""
    admin = http(url, ADMIN)
    sid = new_session(admin, "tiny", LocalKeys(spec_of(admin, "tiny")))
    config = d / "schemathesis.toml"
    config.write_text(f"""
[[operations]]
include-name = "POST /v1/models/{{name}}/predict"
parameters = {{ "path.name" = "tiny", "query.session_id" = "{sid}" }}

[[operations]]
include-name = "GET /v1/sessions/{{session_id}}"
parameters = {{ "path.session_id" = "{sid}" }}

[[operations]]
include-name = "POST /v1/sessions"
parameters = {{ "query.model" = "tiny" }}
""")
    return config


def schemathesis_command(url: str, report: Path, config: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config),
            "run", f"{url}/openapi.json",
            "--checks", CHECKS, "--max-examples", str(EXAMPLES), "--seed", str(SEED),
            "--mode", "all", "--phases", "examples,coverage,fuzzing", "--workers", "1",
            "--header", f"Authorization: Bearer {ADMIN}", "--no-color",
            "--request-timeout", "30", "--generation-database", "none",
            "--report", "ndjson", "--report-ndjson-path", str(report)]


def count_cases(report: Path) -> int:
    """API calls schemathesis made, from its event stream."""
    n = 0
    for line in report.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" in event:
            n += len(event["ScenarioFinished"].get("recorder", {}).get("interactions", {}))
    return n


def server_errors(url: str) -> list[str]:
    metrics = http(url, ADMIN).get("/metrics").text
    return re.findall(r"heinfer_http_requests_total\{[^}]*status=\"5\d\d\"\} \S+", metrics)


def test_openapi_fuzzing_finds_no_5xx_and_no_mismatch(tmp_path):
    d = tmp_path
    # a real model, so that generated names sometimes meet it; limits high enough that the
    # fuzzer's own pace is not what it measures (the limits have tests of their own)
    with running_server(d, [tiny_plan(d / "plans")], rate_limit="100000/second",
                        bad_key_limit="100000/second", max_key_bytes=8 << 20,
                        max_plan_bytes=1 << 20) as srv:
        report = d / "events.ndjson"
        before = server_errors(srv.url)  # readiness polls answered 503 while starting
        config = realistic_values(d, srv.url)
        out = subprocess.run(schemathesis_command(srv.url, report, config), capture_output=True,
                             cwd=d, text=True, timeout=max(900, EXAMPLES * 20))
        summary = out.stdout[-6000:]
        assert out.returncode == 0, summary
        assert server_errors(srv.url) == before  # seen by the server, not only by the fuzzer
        assert "Traceback" not in srv.log(10_000_000)
    cases = count_cases(report)
    print(f"\nschemathesis: {cases} API calls, seed {SEED}, {EXAMPLES} examples per operation, "
          f"0 5xx\n{summary[-1500:]}")
    assert cases >= 100

