"""The admin's training actions: roles, a killed run, promote and roll back while serving."""

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.auth import PermissionDenied
from app.service import ChatService
from app.training_control import TrainingControl
from feedback import repository
from feedback import training_repo
from feedback.models import AuditLog, Message, ModelVersion, TrainingRun
from tests.fakes import ScriptedEngine
from tests.test_training import FAST
from tests.tiny_model import build_tiny_model
from tests.training_data import seed_preferences


def _service(session_factory, settings, engine=None):
    return ChatService(engine or ScriptedEngine(version="tiny-base"), session_factory, settings)


def test_non_admin_cannot_start_and_nothing_starts(session_factory, settings, tiny_model_dir):
    seed_preferences(session_factory, tiny_model_dir)
    with session_factory.begin() as s:
        repository.get_or_create_user(session=s, name="bob", role="annotator")
    control = TrainingControl(_service(session_factory, settings))
    with pytest.raises(PermissionDenied, match="needs the admin role"):
        control.start("bob", FAST)
    for action in (lambda: control.cancel("bob", 1), lambda: control.promote("bob", 1),
                   lambda: control.rollback("bob", 1)):
        with pytest.raises(PermissionDenied):
            action()
    with session_factory() as s:
        assert s.scalar(select(func.count(TrainingRun.id))) == 0
        denied = s.scalars(select(AuditLog).where(AuditLog.allowed.is_(False))).all()
        assert [a.action for a in denied] == ["start retrain", "cancel retrain", "promote model", "roll back model"]


def test_non_admin_with_invalid_settings_is_denied_and_audited(session_factory, settings):
    """The role is checked before the settings: a bad config does not hide a non-admin's attempt."""
    with session_factory.begin() as s:
        repository.get_or_create_user(session=s, name="bob", role="annotator")
    control = TrainingControl(_service(session_factory, settings))
    for bad in ({"kl_coef": -1.0}, {"no_such_setting": 1}):
        with pytest.raises(PermissionDenied, match="needs the admin role"):
            control.start("bob", bad)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        control.start("local", {"kl_coef": -1.0})  # an admin's bad settings still fail before anything starts
    with pytest.raises(ValueError, match="No cleaned corpus named 'handbook'"):
        control.start("local", {"pretrain_corpus": "handbook"})  # a corpus that is not there: no run either
    with session_factory() as s:
        assert s.scalar(select(func.count(TrainingRun.id))) == 0
        rows = s.scalars(select(AuditLog).where(AuditLog.action == "start retrain").order_by(AuditLog.id)).all()
        assert [(a.user_name, a.allowed) for a in rows] == [("bob", False), ("bob", False), ("local", True),
                                                            ("local", True)]
        assert '"kl_coef": -1.0' in rows[0].detail and "no_such_setting" in rows[1].detail


def test_killed_run_is_marked_failed_and_changes_nothing(session_factory, settings, tiny_model_dir):
    seed_preferences(session_factory, tiny_model_dir)
    control = TrainingControl(_service(session_factory, settings))
    run_id = control.start("local", {**FAST, "ppo_episodes": 4000, "ppo_batch_size": 4})
    with pytest.raises(training_repo.ValidationError, match=rf"Training run {run_id} is still \w+; wait for it or cancel it"):
        control.start("local", FAST)  # only one run at a time
    deadline = time.time() + 240
    while True:
        with session_factory() as s:
            run = s.get(TrainingRun, run_id)
            if run.stage and "ppo" in run.stage and run.step >= 2:
                pid = run.pid
                break
            assert run.status in ("queued", "running"), (run.status, run.error, Path(run.log_path).read_text()[-2000:])
        assert time.time() < deadline, "PPO never started"
        time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    control._procs[run_id].wait(timeout=30)
    assert control.recover() == [run_id]
    with session_factory() as s:
        run = s.get(TrainingRun, run_id)
        assert run.status == "failed" and "killed" in run.error
        assert [v.name for v in s.scalars(select(ModelVersion))] == ["tiny-base"]
        assert training_repo.active_version(session=s).name == "tiny-base"
    versions = Path(settings.data_dir) / "versions"
    visible = [p for p in versions.iterdir() if not p.name.startswith(".")] if versions.exists() else []
    assert visible == []


def _thread_niceness(pid: int) -> set[int]:
    """The nice value of every thread of ``pid`` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    out = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()
        out.add(int(fields[16]))  # after "pid (comm)": state is field 3, nice is field 19
    return out


def test_cancel_stops_a_run_and_every_thread_of_the_run_is_niced(session_factory, settings, tiny_model_dir):
    """A run in PPO is cancelled; while it runs, every one of its threads (torch's too) has the
    niceness CHAT_RETRAIN_NICE gives it (19 by default), so chat keeps the cores."""
    assert settings.retrain_nice == 19
    seed_preferences(session_factory, tiny_model_dir)
    control = TrainingControl(_service(session_factory, settings))
    run_id = control.start("local", {**FAST, "ppo_episodes": 4000})
    deadline = time.time() + 240
    while True:
        with session_factory() as s:
            if (s.get(TrainingRun, run_id).stage or "").endswith("ppo"):
                break
        assert time.time() < deadline
        time.sleep(0.3)
    if Path("/proc").is_dir():
        assert _thread_niceness(control._procs[run_id].pid) == {19}
    control.cancel("local", run_id)
    control._procs[run_id].wait(timeout=60)
    with session_factory() as s:
        run = s.get(TrainingRun, run_id)
        assert run.status == "cancelled" and s.scalar(select(func.count(ModelVersion.id))) == 1


def test_promote_and_roll_back_swap_the_serving_engine(session_factory, settings, tiny_model_dir, tmp_path):
    from model.engine import Engine

    seed_preferences(session_factory, tiny_model_dir)
    new_dir = build_tiny_model(tmp_path / "v2", seed=7)
    with session_factory.begin() as s:
        base = training_repo.active_version(session=s)
        new = training_repo.add_version(session=s, name="run1-ppo", path=str(new_dir), parent_id=base.id, stage="ppo",
                                metrics={}, config={}, snapshot_id=None, training_run_id=None)
        base_id, new_id = base.id, new.id
    service = _service(session_factory, settings, Engine.from_path(tiny_model_dir, "tiny-base", device="cpu"))
    control = TrainingControl(service)
    in_flight = service.send("alice", "Hello before the swap")
    next(in_flight)  # a reply has started on the old engine
    assert control.promote("local", new_id) == "run1-ppo"
    old_reply = list(in_flight)[-1]
    new_reply = list(service.send("alice", "Hello after the swap"))[-1]
    assert control.rollback("local", base_id) == "tiny-base"
    back = list(service.send("alice", "Hello after the roll back"))[-1]
    with session_factory() as s:
        versions = [s.get(Message, r.assistant_message_id).model_version for r in (old_reply, new_reply, back)]
        assert versions == ["tiny-base", "run1-ppo", "tiny-base"]
        assert training_repo.active_version(session=s).id == base_id


def test_the_training_panel_explains_each_setting_and_starts_with_no_version_id(session_factory, settings):
    """Each Retrain setting in Admin > Training shows its RetrainConfig help string, and the version
    id box starts empty (a default of 0 could only fail with "version 0 does not exist")."""
    import dataclasses

    import gradio as gr

    from app.ui.demo import build_demo
    from training.config import RetrainConfig

    demo = build_demo(ChatService(ScriptedEngine("ok"), session_factory, settings))
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(RetrainConfig)}
    by_label = {b.label: b for b in demo.blocks.values() if isinstance(b, (gr.Number, gr.Checkbox))}
    for label, name in (("Reward-model epochs", "rm_epochs"), ("PPO episodes", "ppo_episodes"),
                        ("KL coefficient", "kl_coef"), ("Accuracy gate", "accuracy_gate"), ("LoRA", "use_lora"),
                        ("Preference DPO", "pref_dpo")):
        assert by_label[label].info == helps[name] != ""
    assert by_label["Version id (click a row above)"].value is None


def test_the_preference_dpo_box_reaches_the_settings_the_retrain_starts_with(session_factory, settings, monkeypatch):
    """Admin > Training's "Preference DPO" box is sent with the other settings: ticked, the run
    starts with pref_dpo on; left as it is, off (the RetrainConfig default)."""
    from app.ui.demo import build_demo
    from app.ui.training_panel import NO_PRETRAIN

    started = []
    monkeypatch.setattr(TrainingControl, "start", lambda self, user, config: started.append((user, config)) or 7)
    demo = build_demo(ChatService(ScriptedEngine("ok"), session_factory, settings))
    block = next(b for b in demo.fns.values() if b.api_name == "retrain")
    assert [getattr(c, "label", None) for c in block.inputs][-1] == "Preference DPO"  # the box is wired in last
    retrain = block.fn
    for ticked in (True, False):
        note = retrain(1.0, 1e-4, 80, 4e-5, 0.05, 0.6, False, NO_PRETRAIN, ticked, None)
        assert note.startswith("Run 7 started")
    assert [(user, config["pref_dpo"]) for user, config in started] == [("local", True), ("local", False)]


def test_a_version_mapped_to_a_remote_model_id_is_asked_for_by_that_id(session_factory, settings, tiny_model_dir):
    """CHAT_ENGINE=openai: the admin maps a version to the id the engine servers know it by; the
    served engine asks for it at once, after a restart too; clearing it falls back to
    CHAT_REMOTE_MODEL. Bad ids and non-admins change nothing and are refused (audited)."""
    import dataclasses

    from app.main import load_engine
    from model.remote import RemoteEngine

    settings = dataclasses.replace(settings, engine="openai", remote_urls="http://127.0.0.1:9/v1",
                                   remote_model="fallback-id", model=str(tiny_model_dir))
    with session_factory.begin() as s:
        vid = training_repo.ensure_base_version(session=s, name="tiny-base", path=str(tiny_model_dir)).id
        repository.get_or_create_user(session=s, name="bob", role="annotator")
    service = _service(session_factory, settings)
    control = TrainingControl(service)
    assert control.map_remote_model("local", vid, " org/model-a:q8 ") == "org/model-a:q8"
    assert isinstance(service.engine, RemoteEngine) and service.engine.model == "org/model-a:q8"
    restarted = load_engine(settings, session_factory)
    assert restarted.model == "org/model-a:q8" and restarted.version == "tiny-base"
    for bad in ("two words", "x" * 201, "<script>", "-flag", "a\nb"):
        with pytest.raises(training_repo.ValidationError, match="remote model id"):
            control.map_remote_model("local", vid, bad)
    with pytest.raises(PermissionDenied, match="needs the admin role"):
        control.map_remote_model("bob", vid, "org/evil")
    with session_factory() as s:
        assert s.get(ModelVersion, vid).remote_model == "org/model-a:q8"  # nothing bad was written
        denied = s.scalars(select(AuditLog).where(AuditLog.action == "map remote model",
                                                  AuditLog.allowed.is_(False))).all()
        assert [a.user_name for a in denied] == ["bob"]
    assert control.map_remote_model("local", vid, "") == ""
    assert service.engine.model == "fallback-id"
    with pytest.raises(training_repo.NotFoundError):
        control.map_remote_model("local", 999, "org/model-b")


def test_what_the_page_polls_shows_non_admins_nothing_and_writes_no_audit_rows(session_factory, settings):
    """The admin tab's page-load refresh and its timers (training every 2 s, live counts every
    5 s) run in every browser. For a non-admin they change no output and write no audit row
    (before: three denied rows per page load, one more every 2 s); for the admin they fill the
    panels, the template editor with the template in use."""
    from types import SimpleNamespace

    import gradio as gr

    from app.ui.demo import build_demo

    with session_factory.begin() as s:
        repository.get_or_create_user(session=s, name="bob", role="annotator")
    from model.moderation import build_moderator

    service = ChatService(ScriptedEngine("ok"), session_factory, settings, moderator=build_moderator("rules"))
    demo = build_demo(service)
    polled = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "guarded"]
    assert len(polled) == 3  # the page load's admin refresh, the training timer, the live counts timer
    for fn in polled:
        out = fn(SimpleNamespace(username="bob"))
        assert out and all(isinstance(o, type(gr.skip())) for o in out)
        shown = fn(SimpleNamespace(username=None))  # the single-user owner is the admin
        assert any(isinstance(o, str) and ("Data available" in o or "| prompts |" in o) for o in shown)
    # The admin's page load fills the template editor with the reply in use (it opened empty).
    shown = [o for fn in polled for o in fn(SimpleNamespace(username=None))]
    assert any(isinstance(o, str) and o == service.moderator.template("in", None) for o in shown)
    with session_factory() as s:
        assert s.scalar(select(func.count(AuditLog.id)).where(AuditLog.user_name == "bob")) == 0


def test_a_trial_engine_yields_to_whichever_engine_serves_now(session_factory, settings, monkeypatch):
    """The app builds a version on A/B trial with ``yields_to`` reading the serving engine's
    users waiting for a first token, looked up at each call (Promote swaps the serving engine);
    with CHAT_TRIAL_YIELDS off it builds it without; the serving engine itself never yields.
    The trial engine runs CHAT_TRIAL_NICE lower in CPU priority; the serving engine at its own."""
    import model.loader
    from app.training_control import _default_loader

    built = []
    monkeypatch.setattr(model.loader, "build_engine", lambda path, name, **kw: built.append(kw) or object())

    class Waiting(ScriptedEngine):
        def __init__(self, n):
            super().__init__(version="v")
            self.n = n

        def first_tokens_pending(self):
            return self.n

    service = _service(session_factory, settings, engine=Waiting(3))
    _default_loader(service, trial=True)("some/path", "cand", 0.25)
    yields_to = built[-1]["yields_to"]
    assert yields_to() == 3 and built[-1]["nice"] == settings.trial_nice == 10
    service.swap_engine(Waiting(0))
    assert yields_to() == 0
    service.swap_engine(ScriptedEngine(version="no counter"))  # an engine without the count never holds it up
    assert yields_to() == 0
    _default_loader(service)("some/path", "served")
    assert "yields_to" not in built[-1] and built[-1].get("nice", 0) == 0
    settings.trial_yields = False
    _default_loader(service, trial=True)("some/path", "cand", 0.25)
    assert built[-1]["yields_to"] is None
