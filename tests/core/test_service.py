"""The service core without a transport: both servicers' operations driven directly,
with the caller, session and deadline a servicer would pass."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorwire.wire.codec import Handle, Ref
from tensorwire.wire.protocol import SESSION_KEY
from tensorwire_server.core.loading import ModelControl, load_all
from tensorwire_server.core.service import Caller, Service
from tensorwire_server.engine.engine import Engine
from tensorwire_server.engine.programs import PlanStep, ProgramPlan
from tensorwire_server.settings import Settings

SETTINGS = Settings(device="cpu", session_quota_bytes=1 << 16, max_sessions=2)
X = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(torch.device("cpu"))
    assert load_all(engine, SETTINGS) == []
    return engine


@pytest.fixture
def service(engine: Engine) -> Iterator[Service]:
    service = Service(SETTINGS)
    service.ready(engine, ModelControl(engine, SETTINGS))
    yield service
    service.sessions.stop()


@pytest.fixture
def alice(service: Service) -> Caller:
    return Caller("alice", service.open_session(Caller("alice")).id)


def test_the_engine_is_unavailable_until_the_models_are_loaded(engine: Engine) -> None:
    service = Service(SETTINGS)
    with pytest.raises(UnavailableError, match="models are loading"):
        service.info()
    with pytest.raises(UnavailableError):
        service.infer(Caller(), "identity", [("", X)])
    service.ready(engine)
    assert service.infer(Caller(), "identity", [("", X)]).outputs[0][0] == "output"


def test_limits_and_sessions_come_from_the_settings(service: Service) -> None:
    assert service.limits.max_request_bytes == SETTINGS.max_request_bytes
    assert service.limits.max_stream_seconds == SETTINGS.max_stream_seconds
    summary = service.info().sessions
    assert (summary.quota, summary.ttl, summary.max_sessions) == (1 << 16, 600.0, 2)
    assert "mse" in summary.losses and "adam" in summary.optimizers


def test_metric_labels_name_only_what_the_server_knows(service: Service) -> None:
    assert service.label("mlp") == "mlp"
    assert service.label("add") == "add"
    assert service.label("add", functions=False) == "unknown"
    assert service.label("no-such-model") == "unknown"
    assert service.label("") == ""


def test_info_lists_models_and_functions_by_name(service: Service) -> None:
    info = service.info()
    names = [entry.config.name for entry in info.models]
    assert names == sorted(names) and {"identity", "echo", "mlp", "mlp64"} <= set(names)
    assert [n for n, _ in info.functions] == sorted(n for n, _ in info.functions)
    assert info.device.name == "cpu"


def test_infer_statistics_and_readiness(service: Service) -> None:
    before = {s.version: s.requests for s in service.statistics("mlp")}
    deadline = time.monotonic() + 30
    inference = service.infer(Caller(deadline=deadline), "mlp", [("input", X)])
    assert inference.version == 1 and inference.outputs[0][1].shape == (3, 4)
    (after,) = service.statistics("mlp", 1)
    assert after.requests == before[1] + 1
    assert {s.model for s in service.statistics()} >= {"identity", "mlp"}
    with pytest.raises(NotFoundError, match="model 'nope' not found"):
        service.statistics("nope")
    with pytest.raises(NotFoundError, match="model 'mlp' has no version 7"):
        service.statistics("mlp", 7)
    assert service.model_ready("mlp") and service.model_ready("mlp", 1)
    assert not service.model_ready("mlp", 2) and not service.model_ready("nope")
    with service.described("mlp") as (entry, served):
        assert list(entry.versions) == [1] and served.version == 1
    assert service.repository_models() == []


def test_model_control_is_refused_as_the_settings_say(engine: Engine) -> None:
    service = Service(SETTINGS, engine)
    with pytest.raises(FailedPreconditionError, match="cannot load or unload"):
        service.load("mlp")
    service.ready(engine, ModelControl(engine, SETTINGS))
    with pytest.raises(FailedPreconditionError, match="model-control explicit"):
        service.unload("mlp")


def test_calls_needing_a_session_say_how_to_open_one(service: Service) -> None:
    with pytest.raises(FailedPreconditionError, match=SESSION_KEY):
        service.workspace(Caller())
    with pytest.raises(FailedPreconditionError, match="OpenSession"):
        service.infer(Caller(), "identity", [("", X)], keep=True)
    with pytest.raises(NotFoundError, match="session not found"):
        service.workspace(Caller("alice", "made-up"))


def test_put_get_free_within_the_quota(service: Service, alice: Caller) -> None:
    workspace = service.workspace(alice)
    handle = workspace.put(X)
    assert (handle.dtype, handle.shape) == ("float32", (3, 16))
    np.testing.assert_array_equal(service.workspace(alice).get(handle.id), X)
    with pytest.raises(NotFoundError):  # a session belongs to its owner
        service.workspace(Caller("bob", alice.session))
    with pytest.raises(ResourceExhaustedError, match="quota of 65536 bytes"):
        workspace.put(np.zeros(1 << 14, np.float32))
    assert workspace.free([handle.id]) == X.nbytes
    with pytest.raises(NotFoundError, match="not in this session"):
        workspace.get(handle.id)
    assert service.close_session(alice) == 0


def test_handles_resolve_and_results_stay_as_handles(service: Service, alice: Caller) -> None:
    kept = service.workspace(alice).put(X)
    tensor = service.resolver(alice)(kept, "input")
    inference = service.infer(alice, "mlp", [("input", tensor)], keep=True)
    ((name, output),) = inference.outputs
    assert name == "output"
    assert isinstance(output, Handle) and output.shape == (3, 4)
    direct = service.infer(Caller(), "mlp", [("input", X)]).outputs[0][1]
    np.testing.assert_allclose(service.workspace(alice).get(output.id), direct, rtol=1e-6)
    (_, doubled), *_ = service.call(alice, "mul", [tensor, 2.0], {}, keep=True)
    np.testing.assert_array_equal(service.workspace(alice).get(doubled.id), 2 * X)
    summary = service.workspace(alice).summary()
    assert [h.id for h in summary.handles] == [kept.id, output.id, doubled.id]
    assert service.close_session(alice) == summary.bytes > 0


def test_refs_are_only_valid_inside_a_program(service: Service) -> None:
    with pytest.raises(InvalidArgumentError, match="only valid inside a Run program"):
        service.call(Caller(), "add", [Ref("x"), 1.0], {})


def test_a_program_runs_and_differentiates(service: Service) -> None:
    x = np.array([1.0, 2.0, 3.0])
    plan = ProgramPlan(
        inputs=[("x", x)],
        steps=[
            PlanStep("sq", function="mul", args=[Ref("x"), Ref("x")]),
            PlanStep("total", function="sum", args=[Ref("sq")]),
        ],
        loss="total",
    )
    outcome = service.run(Caller(), plan)
    assert outcome.outputs[0][0] == "total" and float(outcome.outputs[0][1]) == 14.0
    np.testing.assert_array_equal(dict(outcome.grads)["x"], 2 * x)


def test_a_trainer_steps_and_counts_against_the_quota(service: Service, alice: Caller) -> None:
    workspace = service.workspace(alice)
    trainer = workspace.create_trainer("mlp", 0, "", {"lr": 0.1}, "mse", {})
    specs = {s.name: s for s in trainer.specs()}
    assert specs["layers.0.weight"].dtype == "float32"
    assert specs["layers.0.weight"].shape == (32, 16)
    held = workspace.summary()
    assert held.trainers == [trainer.id] and held.bytes == trainer.bytes
    again = service.workspace(alice).trainer(trainer.id)
    target = np.zeros((3, 4), np.float32)
    first, steps = again.step([("input", X)], target)
    second, steps = again.step([("input", X)], target)
    assert steps == 2 and second < first
    weights = dict(again.parameters())
    assert weights["layers.0.weight"].shape == (32, 16)
    kept = dict(again.parameters(keep=True))
    assert isinstance(kept["layers.0.bias"], Handle)
    with pytest.raises(NotFoundError, match="is not in this session"):
        workspace.trainer(kept["layers.0.bias"].id)
    with pytest.raises(InvalidArgumentError, match="only valid inside a Run program"):
        workspace.create_trainer("mlp", 0, "sgd", {"lr": Ref("x")}, "mse", {})


def test_a_program_keeps_refs_besides_the_outputs_it_returns(
    service: Service, alice: Caller
) -> None:
    x = np.array([1.0, 2.0, 3.0])
    steps = [
        PlanStep("sq", function="mul", args=[Ref("x"), Ref("x")]),
        PlanStep("total", function="sum", args=[Ref("sq")]),
    ]

    def plan(kept: list[str], inputs: list[tuple[str, object]] | None = None) -> ProgramPlan:
        return ProgramPlan(inputs or [("x", x)], steps, ["total"], loss="total", kept=kept)

    outcome = service.run(alice, plan(["sq", "total"]))
    assert float(dict(outcome.outputs)["total"]) == 14.0  # data, as keep=False says
    np.testing.assert_array_equal(dict(outcome.grads)["x"], 2 * x)
    kept = dict(outcome.kept)
    assert list(kept) == ["sq", "total"] and all(isinstance(h, Handle) for h in kept.values())
    workspace = service.workspace(alice)
    np.testing.assert_array_equal(workspace.get(kept["sq"].id), x * x)
    assert float(workspace.get(kept["total"].id)) == 14.0
    held = [h.id for h in workspace.summary().handles]
    assert held == [kept["sq"].id, kept["total"].id]

    both = service.run(alice, plan(["sq"]), keep=True)  # keep and kept together
    assert all(isinstance(h, Handle) for _, h in [*both.outputs, *both.grads, *both.kept])

    for refs, message in [(["ghost"], "kept: ref 'ghost'"), (["sq", "sq"], "'sq' twice")]:
        with pytest.raises(InvalidArgumentError, match=message):
            service.run(alice, plan(refs))
    with pytest.raises(FailedPreconditionError, match="OpenSession"):
        service.run(Caller(), plan(["sq"]))
    # Past the quota nothing of the call stays: the handle made before it is freed.
    before = workspace.summary()
    big = np.ones(6000)  # 48 KB; its square and the kept sum exceed the 64 KiB quota
    with pytest.raises(ResourceExhaustedError, match="quota"):
        service.run(alice, plan(["total", "sq"], [("x", big)]), keep=True)
    assert workspace.summary() == before
    assert not service.run(Caller(), plan([])).kept  # no kept, no session needed
    # What the client let go of is freed first; ids the session lacks are ignored.
    held = [h.id for h in workspace.summary().handles]
    service.run(alice, plan([]), free=[kept["sq"].id, "h-gone"])
    assert [h.id for h in workspace.summary().handles] == [i for i in held if i != kept["sq"].id]
