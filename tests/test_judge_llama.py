"""The judge and the LLM policy extraction against the real bundled llama.cpp server.

llama-cpp-python's server refuses ``response_format: json_schema`` (pinned in test_local_model.py) and
takes ``json_object`` with a schema instead; these tests show both callers get schema-shaped answers
from it. What the 135M model says is not judged here, only that the answers parse.
"""

from __future__ import annotations

from detector_service.contract.profile import JudgeConfig
from detector_service.llm.extraction import Extractor
from detector_service.llm.judge import Judge, make_client
from proxy.local_model.model import LocalModel
from tests.turns import unconfirmed_cancel


def _config(server: LocalModel) -> JudgeConfig:
    return JudgeConfig(enabled=True, base_url=server.base_url, model=server.options.alias, timeout_s=120)


async def test_judge_gets_a_schema_shaped_answer_from_llama_cpp(llama_server: LocalModel) -> None:
    config = _config(llama_server)
    judge = Judge(config, make_client(config, None), min_confidence=0.0)
    turn = unconfirmed_cancel()
    try:
        found = await judge.findings(turn)
    finally:
        await judge.aclose()
    assert judge._caller.schema_as_json_object
    assert all(f.detector == "llm_judge" and 0.0 <= float(f.evidence["confidence"]) <= 1.0 for f in found)


async def test_policy_extraction_gets_a_schema_shaped_answer_from_llama_cpp(llama_server: LocalModel) -> None:
    config = _config(llama_server)
    extractor = Extractor(config, make_client(config, None), timeout_s=120)
    try:
        extraction = await extractor.extract(
            "Before cancelling a reservation, list the details and get an explicit yes.", ["cancel_reservation"]
        )
    finally:
        await extractor.aclose()
    assert extractor._caller.schema_as_json_object
    assert extraction.model == llama_server.options.alias
    assert all(set(rule.tools) <= {"cancel_reservation"} for rule in extraction.rules)
