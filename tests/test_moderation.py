import json

import pytest

from model.moderation import (
    DetoxifyBackend,
    Moderator,
    ProfanityBackend,
    Rule,
    RulesBackend,
    build_moderator,
    load_rules,
    moderator_from_env,
)
from model.moderation.__main__ import evaluate, read_rows


def test_rules_from_file_with_categories(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"category": "pii", "pattern": r"\b\d{3}-\d{2}-\d{4}\b"},
                                 {"category": "competitor", "words": ["AcmeGPT", "Brand X"]}]))
    mod = build_moderator("rules", rules_file=str(rules))
    assert mod.check("my ssn is 123-45-6789").category == "pii"
    assert mod.check("is brand x better?").category == "competitor"
    assert not mod.check("brand xylophone").flagged  # whole words only
    assert not mod.check("hello").flagged


def test_invalid_rules_file_is_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"category": "x", "pattern": "("}]')
    with pytest.raises(ValueError, match="rules file .* is invalid"):
        load_rules(bad)


def test_per_category_thresholds_and_templates():
    class Fixed:
        name = "fixed"

        def score(self, texts):
            return [{"toxicity": 0.6, "insult": 0.6} for _ in texts]

    mod = build_moderator("none", threshold=0.5, thresholds="toxicity=0.7,insult=0.55")
    mod.backends = [Fixed()]
    verdict = mod.check("text")
    assert verdict.flagged and verdict.category == "insult"
    assert verdict.thresholds == {"toxicity": 0.7, "insult": 0.55}
    mod.templates[("in", "insult")] = "Please keep it civil."
    assert mod.template("in", "insult") == "Please keep it civil."
    assert mod.template("in", "unknown-category") == mod.template("in", None)
    mod.thresholds = {"toxicity": 0.7, "insult": 0.9}
    assert not mod.check("text").flagged


def test_offline_default_flags_abuse_and_passes_questions():
    mod = build_moderator("auto")
    assert mod.backend_names == ["rules", "profanity"]
    for abuse in ["you are a fucking idiot", "shut up you stupid bitch", "go to hell, moron"]:
        assert mod.check(abuse).flagged, abuse
    for ok in ["What is the capital of France?", "How do I bake bread?", "Explain photosynthesis simply."]:
        assert not mod.check(ok).flagged, ok


def test_moderator_from_env_reads_the_apps_variables(tmp_path):
    from app.settings import Settings, settings_env

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"category": "competitor", "words": ["AcmeGPT"]}]))
    env = {"CHAT_MODERATION_BACKENDS": "rules", "CHAT_MODERATION_THRESHOLD": "0.3",
           "CHAT_MODERATION_THRESHOLDS": "insult=0.55", "CHAT_MODERATION_RULES_FILE": str(rules)}
    mod = moderator_from_env(env)
    assert mod.backend_names == ["rules"] and mod.default_threshold == 0.3
    assert mod.thresholds == {"insult": 0.55} and mod.check("try AcmeGPT").category == "competitor"
    # The app passes its settings the same way: the same moderator as the variables give.
    app_mod = moderator_from_env(settings_env(Settings(moderation_backends="rules", moderation_threshold=0.3,
                                                       moderation_thresholds="insult=0.55",
                                                       moderation_rules_file=str(rules))))
    assert (app_mod.backend_names, app_mod.default_threshold, app_mod.thresholds) == (["rules"], 0.3, {"insult": 0.55})
    assert moderator_from_env({}).backend_names == ["rules", "profanity"]  # unset: the defaults (auto, offline)
    with pytest.raises(ValueError, match="CHAT_MODERATION_THRESHOLD must be a number, not 'high'"):
        moderator_from_env({"CHAT_MODERATION_THRESHOLD": "high"})


def test_app_builds_its_moderator_from_its_settings(tmp_path):
    from app.main import build_service
    from app.settings import Settings
    from bench.inprocess import ScriptedEngine

    settings = Settings(data_dir=str(tmp_path), moderation_backends="profanity", moderation_thresholds="insult=0.4")
    moderator = build_service(settings, engine=ScriptedEngine()).moderator
    assert moderator.backend_names == ["profanity"] and moderator.thresholds == {"insult": 0.4}


def test_eval_reports_auc_on_labelled_rows(tmp_path):
    data = tmp_path / "eval.jsonl"
    rows = [{"text": "you stupid idiot", "label": "toxic"}, {"text": "fuck off", "label": "hate"},
            {"text": "nice weather today", "label": "neutral"}, {"text": "I like tea", "label": "neutral"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    texts, labels = read_rows(data)
    [result] = evaluate(Moderator([ProfanityBackend()]), texts, labels)
    assert result["auc"] == 1.0 and result["recall"] == 1.0 and result["fpr"] == 0.0


def _tiny_detoxify_checkpoint(tmp_path):
    """A checkpoint in Detoxify's format: {"config": {...}, "state_dict": ...} for a tiny BERT."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    hf_dir = tmp_path / "bert-tiny"
    hf_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice", "idiot", "hello"]
    (hf_dir / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizer(str(hf_dir / "vocab.txt")).save_pretrained(hf_dir)
    classes = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=len(classes))
    config.save_pretrained(hf_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    ckpt = tmp_path / "toxic_tiny.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": str(hf_dir), "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": len(classes)}},
                           "dataset": {"args": {"classes": classes}}},
                "state_dict": model.state_dict()}, ckpt)
    return ckpt, hf_dir


def test_detoxify_backend_loads_local_checkpoint(tmp_path):
    ckpt, hf_dir = _tiny_detoxify_checkpoint(tmp_path)
    backend = DetoxifyBackend(str(ckpt), str(hf_dir))
    scores = backend.score(["hello you are nice", "you idiot"])
    assert len(scores) == 2
    assert set(scores[0]) == {"toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"}
    assert all(0.0 <= v <= 1.0 for row in scores for v in row.values())
    mod = build_moderator("auto", detoxify_checkpoint=str(ckpt), detoxify_config_dir=str(hf_dir))
    assert mod.backend_names == ["rules", "detoxify"]


def test_detoxify_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        DetoxifyBackend(str(tmp_path / "none.ckpt"), str(tmp_path))


def test_rules_backend_scores_per_category():
    backend = RulesBackend([Rule("a", words=("foo",)), Rule("b", pattern=r"ba+r")])
    assert backend.score(["foo baaar", "nothing"]) == [{"a": 1.0, "b": 1.0}, {}]
