"""Bad input fails early and clearly, before anything starts; the public face is tidy."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import targets

import engine as engine_module
from engine import DuplicateCidError, Engine, EngineClosedError, InvocationError, UnknownNameError


def write_file(path: str) -> None:
    Path(path).write_text("ran")


def test_an_unknown_target_name_raises_with_close_names_and_starts_nothing(
        engine: Engine, tmp_path: Path) -> None:
    engine.register("image.resize", targets.echo)
    marker = tmp_path / "ran"
    with pytest.raises(UnknownNameError, match="did you mean 'image.resize'") as info:
        engine.invoke([(write_file, str(marker)), ("image.resise", 1)])
    assert info.value.kind == "target" and info.value.name == "image.resise"
    assert isinstance(info.value, InvocationError) and isinstance(info.value, LookupError)
    assert engine.stats().invocations_active == 0
    engine.wait(engine.invoke({targets.echo: 1}), timeout=30)  # the pool did run meanwhile
    assert not marker.exists()


def test_an_unknown_callback_name_raises_with_close_names(engine: Engine) -> None:
    engine.register("my.callback1", print)
    with pytest.raises(UnknownNameError, match="unknown callback 'my.callbak1'.*my.callback1"):
        engine.invoke({targets.echo: 1}, callbacks=["my.callbak1"])
    with pytest.raises(UnknownNameError, match="callback"):
        engine.fanout({targets.echo: 1}, on_final=["nothing"])


@pytest.mark.parametrize("path, message", [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("targets:dubble", "did you mean 'targets:double'"),
])
def test_a_bad_import_path_raises_with_the_reason(engine: Engine, path: str, message: str) -> None:
    with pytest.raises(UnknownNameError, match=message):
        engine.invoke({path: 1})


@pytest.mark.parametrize("bad", [42, "service1", b"x", None, [("a", 1, 2)], ["service1"]])
def test_targets_of_the_wrong_type_raise_type_error(engine: Engine, bad: object) -> None:
    with pytest.raises(TypeError):
        engine.invoke(bad)  # type: ignore[arg-type]


def test_non_callable_targets_and_callbacks_raise_type_error(engine: Engine) -> None:
    with pytest.raises(TypeError, match="must be a callable"):
        engine.invoke({42: 1})
    with pytest.raises(TypeError, match="must be a callable"):
        engine.invoke({targets.echo: 1}, callbacks=[42])
    with pytest.raises(TypeError, match="not a callable"):
        engine.invoke({"os:sep": 1})


def test_a_duplicate_active_cid_raises_and_a_finished_one_may_be_reused(engine: Engine) -> None:
    cid = engine.invoke({targets.sleep: 1.0}, cid="mine")
    with pytest.raises(DuplicateCidError, match="'mine'"):
        engine.invoke({targets.echo: 1}, cid="mine")
    assert engine.wait(cid, timeout=30)[targets.sleep].ok
    assert engine.invoke({targets.echo: 2}, cid="mine") == "mine"
    assert engine.wait("mine", timeout=30)[targets.echo].response == 2


@pytest.mark.parametrize("cid", ["", 12])
def test_a_cid_must_be_a_non_empty_string(engine: Engine, cid: object) -> None:
    with pytest.raises(TypeError):
        engine.invoke({targets.echo: 1}, cid=cid)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, "1"])
def test_a_timeout_must_be_positive(engine: Engine, timeout: object) -> None:
    with pytest.raises(ValueError):
        engine.invoke({targets.echo: 1}, timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("settings", [{"workers": 0}, {"callback_workers": 0}, {"history": -1},
                                      {"max_tasks_per_worker": 0}, {"timeout": -1}])
def test_bad_engine_settings_raise_before_any_process_starts(settings: dict) -> None:
    with pytest.raises(ValueError):
        Engine(**settings)


def test_invoke_after_shutdown_raises(engine: Engine) -> None:
    engine.shutdown()
    with pytest.raises(EngineClosedError):
        engine.invoke({targets.echo: 1})


def test_registering_a_different_service_under_a_taken_name_raises(engine: Engine) -> None:
    engine.register("svc", targets.echo)
    engine.register("svc", targets.echo)  # the same again is harmless
    with pytest.raises(ValueError, match="already registered"):
        engine.register("svc", targets.double)


def test_bad_targets_from_a_lazy_iterator_fail_alone(engine: Engine) -> None:
    cid = engine.invoke(iter([(targets.double, 1), ("no.such.service", 2), "garbage",
                              (targets.double, 3)]))
    results = engine.wait(cid, timeout=30)
    assert [r.ok for r in results] == [True, False, False, True]
    assert isinstance(results[1].exception, UnknownNameError)
    assert isinstance(results[2].exception, TypeError)


ERRORS = [
    engine_module.UnknownNameError("target", "x", ["y"], "why"),
    engine_module.DuplicateCidError("c"),
    engine_module.WorkerCrashedError("t", 12, -11),
    engine_module.WorkerStartError("t", "because"),
    engine_module.TargetTimeoutError("t", 1.5, 12),
    engine_module.MemoryLimitError("t", 100, 200, 12),
    engine_module.EngineBrokenError("t", "why"),
    engine_module.TargetCancelledError("t", running=True),
    engine_module.SerializationError("t", "request", "detail"),
    engine_module.RemoteError("pkg.Error", "message", "Traceback..."),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_and_print_as_engine_names(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert type(error).__module__ == "engine"
    assert repr(error).startswith(type(error).__name__)


def test_all_is_sorted_and_complete() -> None:
    public = {name for name in dir(engine_module) if not name.startswith("_")}
    assert engine_module.__all__ == sorted(engine_module.__all__)
    assert public == set(engine_module.__all__)


def test_a_lazy_iterator_that_raises_ends_the_input_with_a_failed_result(engine: Engine) -> None:
    def records():
        yield targets.double, 1
        raise RuntimeError("the source broke")

    seen: list[dict] = []
    cid = engine.fanout(records(), on_final=[seen.append])
    good, broken = engine.wait(cid, timeout=30)
    assert good.ok and good.response == 2
    assert isinstance(broken.exception, RuntimeError) and broken.target == "<targets iterator>"
    assert len(seen) == 1 and len(seen[0]["data"]) == 2
    assert engine.wait(engine.invoke({targets.double: 3}), timeout=30)[targets.double].ok
