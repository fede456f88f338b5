"""REST fuzzing (issue 7): schemathesis against the service's own OpenAPI document, served by
a real in-process node, with an admin token; no response may be a 5xx.

Driven programmatically (one hypothesis run per operation and generation mode) rather than
through schemathesis' pytest plugin: the plugin's collection does not mix with the anyio
fixtures this suite uses for the server, and programmatic runs keep every example bounded."""

from __future__ import annotations

import asyncio

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.integration.harness import Node

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Per operation: generated data, generated data aimed at an existing device, invalid data.
EXAMPLES = {"positive": 20, "existing": 10, "negative": 10}


def fuzz(node: Node) -> tuple[int, list[str]]:
    """Run every operation of /openapi.json; return (requests sent, failure descriptions)."""
    schema = schemathesis.openapi.from_url(f"{node.http_url}/openapi.json")
    headers = {"Authorization": f"Bearer {node.token('fuzzer', 'admin')}"}
    sent: list[int] = []
    failures: list[str] = []
    http = requests.Session()  # keep-alive: one connection for the whole run

    def run(run_name: str, examples: int, strategy: SearchStrategy[schemathesis.Case]) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def one(case: schemathesis.Case) -> None:
            sent.append(1)
            response = case.call(base_url=node.http_url, session=http, headers=headers, timeout=10)
            try:
                case.validate_response(response, checks=[not_a_server_error], headers=headers)
            except (AssertionError, BaseExceptionGroup):  # a Failure or a FailureGroup
                failures.append(
                    f"{case.operation.label} [{run_name}] -> {response.status_code}: "
                    f"{case.as_curl_command(headers=headers)}"
                )

        one()

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        has_input = bool(operation.path_parameters or operation.query or operation.body)
        takes_device = any(p.name == "device_id" for p in operation.path_parameters)
        run("positive", EXAMPLES["positive"], operation.as_strategy())
        if takes_device:
            existing = operation.as_strategy(path_parameters={"device_id": "d1"})
            run("existing", EXAMPLES["existing"], existing)
        if has_input:
            invalid = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            run("negative", EXAMPLES["negative"], invalid)
    http.close()
    return len(sent), failures


async def test_openapi_fuzzing_finds_no_server_error(node: Node) -> None:
    """Every operation of the app's OpenAPI document, with an admin token, gets up to 20
    generated requests, 10 more aimed at an existing device where the path names one, and 10
    invalid ones where it has parameters or a body: no response is a 5xx
    (`not_a_server_error`), and the node is still ready afterwards."""
    await node.register("d1", "d2")
    loop = asyncio.get_running_loop()
    sent, failures = await asyncio.wait_for(loop.run_in_executor(None, fuzz, node), 100)
    assert failures == []
    assert sent > 250
    async with node.rest() as rest:
        assert (await rest.get("/devices")).status_code == 200
