"""The API fuzzed from its own OpenAPI schema (Schemathesis), against a real uvicorn server on
loopback with a random-weight tiny model: every operation, with inputs valid and invalid by the
schema (multipart forms whose file is a real MIDI file, another file or bytes, and whose fields
are typed values, malformed ones, unknown ones, missing ones). No answer may be a 5xx, and
every answer must match what the schema declares for its operation (status, content type,
body). The run is bounded (a few examples per operation); experiments/serve/fuzz.py runs the
same for longer and records its counts."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[dev]')")

import serve_fuzzing  # noqa: E402
from conftest import synthetic_score  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from serve_helpers import serve_in_thread  # noqa: E402

from mmm.generation.api import MMM  # noqa: E402
from mmm.serve.app import Settings, create_app  # noqa: E402
from mmm.serve.music import example_midi  # noqa: E402

pytestmark = pytest.mark.subprocess  # the server's worker processes

# Real MIDI files for the `file` parts the schema declares as audio/midi (the other content
# type it declares, application/octet-stream, gets Schemathesis' own bytes).
MIDI = [synthetic_score(seed=0, num_bars=4).dumps_midi(), example_midi("waltz")]
serve_fuzzing.register(MIDI)
# Small limits keep each generation short; the schema states them, so valid inputs respect them.
FUZZ_SETTINGS = {"max_new_bars": 2, "max_variations": 2, "queue_size": 64}


def served_schema() -> dict:
    """The OpenAPI schema of the fuzzed server, built without starting it (Schemathesis' lazy
    loading from a fixture does not run on this pytest); `server_url` checks it is the one served."""
    app = create_app(None, Settings(**FUZZ_SETTINGS))  # the schema depends on the settings only
    app.state.server.close()
    return app.openapi()


SPEC = served_schema()
# Every check, valid and invalid inputs. A request valid by the schema may still be refused for
# what a schema cannot say (the bytes of the MIDI file: 400; a bar past the end of that piece,
# a control value the model never saw: 422), so those join the statuses valid data may get.
CONFIG = {
    "generation": {"mode": "all"},
    # The coverage phase's valid cases (every boundary of every field, each a generation) would
    # make this the slowest test of the suite: it keeps the invalid ones, and valid inputs come
    # from the examples and the fuzzing phase; experiments/serve/fuzz.py runs them all.
    "phases": {"coverage": {"generation": {"mode": "negative"}}},
    "checks": {
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422", "429"]}
    },
}
schema = schemathesis.openapi.from_dict(SPEC, config=schemathesis.config.SchemathesisConfig.from_dict(CONFIG))


@pytest.fixture(scope="module")
def server_url(serve_mmm):
    import httpx

    # The served model with the smallest budget per bar: every generation is short.
    model = MMM(serve_mmm.model, serve_mmm.tokenizer, max_bar_tokens=4, num_threads=1)
    with serve_in_thread(create_app(model, Settings(**FUZZ_SETTINGS))) as url:
        assert httpx.get(f"{url}/openapi.json").json() == SPEC
        yield url


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_answers_by_its_schema(case, server_url):
    case.call_and_validate(base_url=server_url)


@pytest.mark.parametrize("task", ["infill", "add_track", "generate"])
def test_what_the_server_accepts_the_schema_allows(server_url, task):
    """Found by the fuzz run: `controls=null` (no controls) was accepted but not declared."""
    import httpx
    import jsonschema_rs

    form = SPEC["paths"][f"/v1/{task}"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = {"infill": {"track": "0", "bars": "[0,1]"}, "add_track": {"program": "0"}}.get(
        task, {"programs": "[0]", "num_bars": "1"}
    )
    files = None if task == "generate" else {"file": ("song.mid", MIDI[0])}
    for name in ("controls", "track_controls", "seed", "top_k", "top_p"):
        r = httpx.post(f"{server_url}/v1/{task}", data={**fields, name: "null"}, files=files, timeout=120)
        assert r.status_code == 200, (name, r.text)
        assert jsonschema_rs.validator_for(form["properties"][name]).is_valid(None), name
