"""Admin: Retrain button, live progress and plots, Cancel, runs and versions side by side,
Promote and Roll back. Every action is checked for the admin role on the server."""

from __future__ import annotations

import dataclasses

import gradio as gr
import pandas as pd

from app.auth import PermissionDenied, caller_name, role_of
from app.ui.guard import ADMIN, denied, unless_admin_skip
from feedback import training_repo
from feedback.db import session_scope
from feedback.repository import NotFoundError, ValidationError
from feedback.stats import data_counts
from training.config import RetrainConfig, corpus_names

NO_PRETRAIN = "none"
VERSION_HEADERS = ["id", "name", "stage", "serving", "parent", "remote model id", "verdict", "win rate (95%)", "judge", "held-out pairs (95%)",
                   "judge acc on unseen pairs (95%)", "RM acc (95%)",
                   "RM reward new/cur (optimised)", "KL/token", "len new/cur", "repetition new/cur",
                   "stuck in a loop new/cur", "ppl new/cur",
                   "BLEU new/cur", "chrF new/cur",
                   "flag rate new/cur", "refuses flagged prompts new/cur", "refuses everyday new/cur", "created"]
RUN_HEADERS = ["run", "status", "stage", "step", "by", "version", "error", "started"]
PLOT_STAGES = {"reward": ("loss", "accuracy"), "ppo": ("reward", "kl")}


def _fmt(x, nd=2):
    return "" if x is None or x != x else f"{x:.{nd}f}"


def _pair(e: dict, key: str, nd: int = 2) -> str:
    return f"{_fmt(e.get(key + '_new'), nd)} / {_fmt(e.get(key + '_current'), nd)}" if e else ""


def _interval(d: dict, key: str) -> str:
    if d.get(key) is None:
        return ""
    return f"{_fmt(d.get(key))} [{_fmt(d.get(key + '_lo'))}, {_fmt(d.get(key + '_hi'))}]"


def _version_rows(s) -> list[list]:
    rows = []
    names = {v.id: v.name for v in training_repo.list_versions(session=s)}
    for v in training_repo.list_versions(session=s):
        m, e = v.metrics or {}, (v.metrics or {}).get("eval", {})
        verdict = f"{e.get('verdict', '')}: {e.get('verdict_text', '')}" if e.get("verdict") else ""
        rows.append([v.id, v.name, v.stage, "yes" if v.is_active else "", names.get(v.parent_id, ""), v.remote_model or "", verdict,
                     _interval(e, "win_rate"), e.get("win_rate_judge", ""), _interval(e, "heldout_pref_acc"),
                     _interval(m, "judge_accuracy"), _interval({"acc": m.get("rm_heldout_accuracy"),
                                                         "acc_lo": m.get("rm_heldout_accuracy_lo"),
                                                         "acc_hi": m.get("rm_heldout_accuracy_hi")}, "acc"),
                     f"{_fmt(e.get('reward_new'))} / {_fmt(e.get('reward_current'))}" if e else "",
                     _fmt(e.get("kl_to_current"), 3), _pair(e, "length", 1), _pair(e, "repetition"),
                     _pair(e, "degenerate"), _pair(e, "ppl", 1), _pair(e, "bleu", 1), _pair(e, "chrf", 1), _pair(e, "flag_rate"),
                     _pair(e, "refusal_harmful"), _pair(e, "refusal_ordinary"), v.created_at.strftime("%Y-%m-%d %H:%M")])
    return rows


def _progress_md(run) -> str:
    if run is None:
        return "No training run yet. Press **Retrain** to start one."
    eta = f" · about {run.eta_s / 60:.1f} min left in this stage" if run.eta_s else ""
    text = (f"**Run {run.id}: {run.status}** · stage {run.stage or '—'} · step {run.step} of {run.total}{eta}")
    if run.error:
        text += f"  \n{run.error}"
    for note in ("ppo_skipped", "ppo_loop_guard_note"):
        if (run.metrics or {}).get(note):
            text += f"  \n{run.metrics[note]}"
    if run.status == "done" and run.metrics.get("timings_s"):
        text += "  \nStage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in run.metrics["timings_s"].items())
    return text


def _plot_frame(run, stage: str) -> pd.DataFrame:
    keys = PLOT_STAGES[stage]
    points = [{"step": h["step"], "metric": k, "value": h[k]} for h in (run.history if run else [])
              if stage in h.get("stage", "") for k in keys if k in h]
    return pd.DataFrame(points or [{"step": 0, "metric": keys[0], "value": 0.0}])


def _plot_update(run, stage: str):
    """The stage's plot, hidden until it has a point (an empty one drew "0.000000" axes)."""
    frame = _plot_frame(run, stage)
    return gr.update(value=frame, visible=bool(run and any(stage in h.get("stage", "") for h in run.history or [])))


def _help(name: str) -> str:
    """The RetrainConfig field's help string (one source for the CLI, the docs and this panel)."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(RetrainConfig) if f.name == name)


def build_training_panel(service, control) -> tuple:
    data_md = gr.Markdown(elem_id="train-data")
    with gr.Row():
        rm_epochs = gr.Number(value=RetrainConfig.rm_epochs, label="Reward-model epochs", info=_help("rm_epochs"))
        rm_lr = gr.Number(value=RetrainConfig.rm_learning_rate, label="Reward-model learning rate",
                          info=_help("rm_learning_rate"))
        episodes = gr.Number(value=RetrainConfig.ppo_episodes, label="PPO episodes", precision=0,
                             info=_help("ppo_episodes"))
        ppo_lr = gr.Number(value=RetrainConfig.ppo_learning_rate, label="PPO learning rate",
                           info=_help("ppo_learning_rate"))
        kl = gr.Number(value=RetrainConfig.kl_coef, label="KL coefficient", info=_help("kl_coef"))
        gate = gr.Number(value=RetrainConfig.accuracy_gate, label="Accuracy gate", info=_help("accuracy_gate"))
        lora = gr.Checkbox(value=RetrainConfig.use_lora, label="LoRA", info=_help("use_lora"))
        # Checked on the server (a name under data/corpora), so a typed value is fine here.
        corpus = gr.Dropdown([NO_PRETRAIN, *corpus_names(service.settings.data_dir)], value=NO_PRETRAIN,
                             allow_custom_value=True, label="Pretrain first on a corpus",
                             info=_help("pretrain_corpus"), elem_id="pretrain-corpus")
        pref_dpo = gr.Checkbox(value=RetrainConfig.pref_dpo, label="Preference DPO", info=_help("pref_dpo"),
                               elem_id="pref-dpo")
    with gr.Row():
        retrain = gr.Button("Retrain", variant="primary", elem_id="retrain-btn")
        cancel = gr.Button("Cancel run", variant="stop", elem_id="cancel-btn", interactive=False)  # while a run runs
    progress = gr.Markdown(elem_id="train-progress")
    with gr.Row():
        rm_plot = gr.LinePlot(x="step", y="value", color="metric", title="Reward model: loss and accuracy", height=250,
                              visible=False, elem_id="rm-plot")
        ppo_plot = gr.LinePlot(x="step", y="value", color="metric", title="PPO: reward and KL", height=250,
                               visible=False)
    versions = gr.Dataframe(headers=VERSION_HEADERS, interactive=False, label="Model versions (new vs current)",
                            elem_id="versions-table")
    with gr.Row():
        # Empty until a row is clicked: a default of 0 only ever answered "version 0 does not exist".
        version_id = gr.Number(value=None, label="Version id (click a row above)", precision=0)
        promote = gr.Button("Promote", elem_id="promote-btn")
        rollback = gr.Button("Roll back to this version", elem_id="rollback-btn")
    with gr.Row():
        remote_id = gr.Textbox(label="Remote model id", max_lines=1, elem_id="remote-model-id",
                               info="CHAT_ENGINE=openai: the id the engine servers serve this version as (empty: "
                                    "CHAT_REMOTE_MODEL, else the version's name)")
        map_remote = gr.Button("Map version to remote id", elem_id="map-remote-btn")
    note = gr.Markdown(elem_id="train-note")
    runs = gr.Dataframe(headers=RUN_HEADERS, interactive=False, label="Training runs")
    timer = gr.Timer(2.0)

    def refresh(request: gr.Request):
        if (msg := denied(service, request, ADMIN, "view training", view=True)) is not None:
            return msg, msg, gr.update(), gr.update(), [], [], gr.update()
        with session_scope(service.session_factory) as s:
            c = data_counts(session=s)
            recent = training_repo.list_runs(session=s)
            latest = recent[0] if recent else None
            sources = ", ".join(f"{k}: {v}" for k, v in c["pairs_by_source"].items()) or "none"
            data = (f"**Data available:** {c['pairs']} preference pairs ({sources}) · "
                    f"{c['demonstrations']} demonstrations · {c['prompts']} prompts · serving "
                    f"**{service.engine.version}**")
            run_rows = [[r.id, r.status, r.stage or "", f"{r.step}/{r.total}", r.requested_by or "",
                         r.version_id or "", (r.error or "")[:120], r.started_at.strftime("%Y-%m-%d %H:%M")]
                        for r in recent]
            running = latest is not None and latest.status in training_repo.ACTIVE_STATUSES
            return (data, _progress_md(latest), _plot_update(latest, "reward"), _plot_update(latest, "ppo"),
                    _version_rows(s), run_rows, gr.update(interactive=running))

    def on_retrain(rm_ep, rm_rate, eps, ppo_rate, kl_c, gate_v, use_lora, corpus_name, use_pref_dpo,
                   request: gr.Request):
        # The role first (refused and audited), then the settings: a non-admin's junk is still audited.
        # view=True audits only a refusal: control.start audits the admin's allowed start itself.
        if (msg := denied(service, request, ADMIN, "start retrain", view=True)) is not None:
            return msg
        try:
            config = dict(rm_epochs=float(rm_ep), rm_learning_rate=float(rm_rate), ppo_episodes=int(eps),
                          ppo_learning_rate=float(ppo_rate), kl_coef=float(kl_c), accuracy_gate=float(gate_v),
                          use_lora=bool(use_lora), pref_dpo=use_pref_dpo is True)  # a hostile "false" is not True
        except (TypeError, ValueError):
            return "⚠ Every training setting needs a number."
        if corpus_name and corpus_name != NO_PRETRAIN:
            config["pretrain_corpus"] = str(corpus_name)  # control.start checks it is a cleaned corpus
        try:
            run_id = control.start(caller_name(request), config)
        except PermissionDenied as exc:
            return f"Denied: {exc}"
        except (ValueError, ValidationError) as exc:
            return f"⚠ {exc}"
        return f"Run {run_id} started. Chat keeps answering while it trains."

    def on_cancel(request: gr.Request):
        with session_scope(service.session_factory) as s:
            run = training_repo.active_run(session=s)
            run_id = run.id if run else None
        if run_id is None:
            if (msg := denied(service, request, ADMIN, "cancel retrain")) is not None:
                return msg
            return "No run is in progress."
        try:
            control.cancel(caller_name(request), run_id)
        except PermissionDenied as exc:
            return f"Denied: {exc}"
        except (ValidationError, NotFoundError) as exc:
            return f"⚠ {exc}"
        return f"Cancelling run {run_id}…"

    def on_switch(vid, rollback_: bool, request: gr.Request):
        try:
            fn = control.rollback if rollback_ else control.promote
            name = fn(caller_name(request), vid)  # checked after the role check, inside
        except PermissionDenied as exc:
            return f"Denied: {exc}"
        except (ValidationError, NotFoundError, OSError) as exc:
            return f"⚠ {exc}"
        note = f"Now serving **{name}**. Replies already streaming finish on the previous version."
        if not rollback_:
            with session_scope(service.session_factory) as s:
                ev = (training_repo.get_version(session=s, version_id=int(vid)).metrics or {}).get("eval", {})
            if ev.get("verdict") and ev["verdict"] != "better":
                note += f"  \n⚠ Its evaluation did not find it better ({ev['verdict']}: {ev.get('verdict_text', '')})."
        return note

    def on_promote(vid, request: gr.Request):
        return on_switch(vid, False, request)

    def on_rollback(vid, request: gr.Request):
        return on_switch(vid, True, request)

    def on_map_remote(vid, model_id, request: gr.Request):
        try:
            mapped = control.map_remote_model(caller_name(request), vid, model_id)  # role first, inside
        except PermissionDenied as exc:
            return f"Denied: {exc}"
        except (ValidationError, NotFoundError, OSError, ValueError) as exc:
            return f"⚠ {exc}"
        target = f"**{mapped}**" if mapped else "CHAT_REMOTE_MODEL, else its own name"
        return f"Version {int(vid)} is asked for as {target} on remote engine servers."

    def pick_version(evt: gr.SelectData):
        return evt.row_value[0] if evt.row_value else None

    outputs = [data_md, progress, rm_plot, ppo_plot, versions, runs, cancel]
    retrain.click(on_retrain, [rm_epochs, rm_lr, episodes, ppo_lr, kl, gate, lora, corpus, pref_dpo], note,
                  api_name="retrain")
    # The corpora cleaned since the page opened (the list is read when it is opened).
    def corpus_choices(request: gr.Request):
        if role_of(service.session_factory, caller_name(request)) != "admin":
            return gr.skip()  # the page's own event, not an attempt: no audit row (see unless_admin_skip)
        return gr.update(choices=[NO_PRETRAIN, *corpus_names(service.settings.data_dir)])

    corpus.focus(corpus_choices, None, corpus, queue=False, api_visibility="private")
    cancel.click(on_cancel, None, note, api_name="cancel_retrain")
    promote.click(on_promote, [version_id], note, api_name="promote")
    rollback.click(on_rollback, [version_id], note, api_name="rollback")
    map_remote.click(on_map_remote, [version_id, remote_id], note, api_name="map_remote_model")
    versions.select(pick_version, None, version_id, api_visibility="private")
    timer.tick(unless_admin_skip(service, refresh, len(outputs)), None, outputs, api_visibility="private",
               show_progress="hidden")
    return refresh, outputs
