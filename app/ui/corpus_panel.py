"""Admin > Data > Corpus: upload your own documents, clean them for continued pretraining, read
the report (training/corpus.py does the work; this is the thin handler around it)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import gradio as gr

from app.ui.guard import ADMIN, denied
from training.corpus import SUFFIXES, CorpusConfig, CorpusError, build_corpus


def report_md(report: dict, out_dir: Path) -> str:
    """The per-upload report: documents and tokens in and out, each filter with examples, the
    snapshot id, and the command that pretrains on the result."""
    lines = [f"**{report['documents_in']} documents ({report['tokens_in']} {report['token_unit']}) in, "
             f"{report['documents_out']} ({report['tokens_out']}) out** · data snapshot "
             f"{report.get('snapshot_id', '—')} · files: " + ", ".join(f"{k} ({v})" for k, v in report["files"].items()),
             "", "| removed by | documents | examples |", "| --- | --- | --- |"]
    for reason, r in report["removed"].items():
        examples = " · ".join(e.replace("|", "\\|").replace("\n", " ")[:80] for e in r["examples"][:2])
        lines.append(f"| {reason.replace('_', ' ')} | {r['documents']} | {examples} |")
    scrubbed = ", ".join(f"{what}: {n}" for what, n in report["scrubbed_documents"].items() if n) or "none"
    lines += ["", f"**Scrubbed** (documents): {scrubbed}", "",
              f"Written to `{out_dir / 'corpus.jsonl'}`. Pretrain on it: `python -m training.pretrain --model "
              f"data/models/<model> --corpus {out_dir / 'corpus.jsonl'} --out data/runs/pretrain --register`"]
    return "\n".join(lines)


def build_corpus_panel(service) -> None:
    gr.Markdown("**A corpus of your own documents** (plain text, Markdown, JSONL of `{\"text\"}`): cleaned for "
                "continued pretraining: Unicode and whitespace, boilerplate, e-mails, phone numbers and keys "
                "scrubbed, fragments, duplicates and near-duplicates, and what moderation flags, removed. One bad "
                "file refuses the whole upload.")
    with gr.Row():
        files = gr.File(label="Corpus files", file_count="multiple", file_types=list(SUFFIXES), elem_id="corpus-files")
        clean_btn = gr.Button("Clean corpus", elem_id="corpus-clean")
    report = gr.Markdown(elem_id="corpus-report")

    def do_clean(paths, request: gr.Request, progress=gr.Progress()):
        if (msg := denied(service, request, ADMIN, "clean corpus")) is not None:
            return msg
        paths = [p for p in (paths or []) if p]
        if not paths:
            return "Choose one or more files first."
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"  # two uploads in one second
        out_dir = Path(service.settings.data_dir).resolve() / "corpora" / f"corpus-{stamp}"
        progress(0.1, desc="Reading and cleaning…")
        try:
            result = build_corpus(paths, out_dir, CorpusConfig(), moderator=service.moderator,
                                  session_factory=service.session_factory)
        except CorpusError as exc:
            return f"⚠ Nothing cleaned: {exc}"
        return report_md(result, out_dir)

    clean_btn.click(do_clean, [files], report, api_name="clean_corpus")
