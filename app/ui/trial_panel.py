"""Admin > Trials: put a version on blind A/B trial in the chat, watch the picks, promote or stop.

Every handler checks the admin role on the server; starting, stopping and promoting are audited
(TrainingControl). The leaderboard scores every version from all pairwise judgements
(feedback.leaderboard): A/B picks and annotator rankings across versions.
"""

from __future__ import annotations

import gradio as gr

from app.auth import PermissionDenied, caller_name
from app.ui.guard import ADMIN, denied
from feedback import trial_repo
from feedback.db import session_scope
from feedback.leaderboard import AB_OUTCOME, leaderboard, preference_share
from feedback.repository import NotFoundError, ValidationError

LEADERBOARD_HEADERS = ["version", "score (Elo, 95%)", "comparisons", "wins (ties half)"]
TRIAL_HEADERS = ["trial", "status", "candidate", "share", "picks", "candidate preferred (95%)", "by", "started"]


def trial_summary(session, trial) -> tuple[str, list]:
    """(plain words, table row) for one trial, from its turns."""
    turns = trial_repo.trial_turns(session=session, trial_id=trial.id)
    outcomes = [AB_OUTCOME[t.pick] for t in turns if t.pick in AB_OUTCOME]
    share, lo, hi, n = preference_share(outcomes)
    bad = sum(t.pick == "both_bad" for t in turns)
    open_or_none = sum(t.pick in (None, "none") for t in turns)
    name = turns[0].candidate_version if turns else f"version {trial.candidate_version_id}"
    if n:
        words = (f"candidate preferred in {share:.0%} ± {(hi - lo) / 2:.0%} of {n} picks (a tie counts half)"
                 f"{'; better than the serving version' if lo > 0.5 else '; worse' if hi < 0.5 else '; no clear difference yet'}")
    else:
        words = "no picks yet"
    words += f" · {bad} both bad · {open_or_none} without a pick"
    row = [trial.id, trial.status, name, f"{trial.share:.0%}", n,
           f"{share:.2f} [{lo:.2f}, {hi:.2f}]" if n else "", trial.started_by or "",
           trial.started_at.strftime("%Y-%m-%d %H:%M")]
    return words, row


def build_trial_panel(service, control):
    gr.Markdown("Put a registered version **on trial**: a share of chat turns show its reply next to the serving "
                "version's, unlabelled and in random order, and the user picks. Picks become preference pairs "
                "for training and scores below.")
    status = gr.Markdown(elem_id="trial-status")
    with gr.Row():
        version_id = gr.Number(label="Version id to try", precision=0, elem_id="trial-version")
        share = gr.Slider(0.01, 1.0, value=0.1, step=0.01, label="Share of chat turns", elem_id="trial-share")
    with gr.Row():
        start = gr.Button("Start trial", variant="primary", elem_id="trial-start")
        stop = gr.Button("Stop trial", elem_id="trial-stop")
        promote = gr.Button("Promote the candidate", elem_id="trial-promote")
    note = gr.Markdown(elem_id="trial-note")
    board = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, label="Version leaderboard",
                         elem_id="leaderboard")
    trials = gr.Dataframe(headers=TRIAL_HEADERS, interactive=False, label="Trials")

    def refresh(request: gr.Request):
        if (msg := denied(service, request, ADMIN, "view trials", view=True)) is not None:
            return msg, [], []
        with session_scope(service.session_factory) as s:
            rows, running_words = [], "No trial is running."
            for trial in trial_repo.list_trials(session=s):
                words, row = trial_summary(s, trial)
                rows.append(row)
                if trial.status == "running":
                    running_words = f"**Trial {trial.id} is running** on {trial.share:.0%} of turns: {words}."
            ratings = leaderboard(s, anchor=service.engine.version)
        board_rows = [[r.version, f"{r.score:.0f} [{r.lo:.0f}, {r.hi:.0f}]", r.comparisons, r.wins] for r in ratings]
        return running_words, board_rows, rows

    def running_id():
        with session_scope(service.session_factory) as s:
            trial = trial_repo.running_trial(session=s)
            return trial.id if trial else None

    def act(fn, request, done: str):
        try:
            result = fn(caller_name(request))
        except PermissionDenied as exc:
            return f"Denied: {exc}"
        except (ValidationError, NotFoundError, OSError) as exc:
            return f"⚠ {exc}"
        return done.format(result=result)

    def on_start(vid, fraction, request: gr.Request):
        return act(lambda user: control.start_trial(user, vid, fraction), request,
                   "Trial {result} started. Picks show up below as users make them.")

    def on_stop(request: gr.Request):
        tid = running_id()
        if tid is None:
            return denied(service, request, ADMIN, "stop trial") or "No trial is running."
        return act(lambda user: control.stop_trial(user, tid), request, f"Trial {tid} stopped.")

    def on_promote(request: gr.Request):
        tid = running_id()
        if tid is None:
            return denied(service, request, ADMIN, "promote trial") or "No trial is running."
        return act(lambda user: control.promote_trial(user, tid), request,
                   "Now serving **{result}**; the trial ended as promoted.")

    outputs = [status, board, trials]
    start.click(on_start, [version_id, share], note, api_name="start_trial")
    stop.click(on_stop, None, note, api_name="stop_trial")
    promote.click(on_promote, None, note, api_name="promote_trial")
    return refresh, outputs
