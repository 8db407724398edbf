"""The reward model trains on prompt groups (training/reward_groups.py): fewer forward passes, same loss."""

from itertools import combinations


def _ranked_rows(prompt: str, replies: list[str]) -> list[dict]:
    """Every pair a ranking best-first gives, as the snapshot writes preference rows."""
    as_reply = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    return [{"prompt": [{"role": "user", "content": prompt}], "chosen": as_reply(a), "rejected": as_reply(b)}
            for a, b in combinations(replies, 2)]


def test_group_dataset_holds_each_ranked_candidate_once(tiny_model_dir):
    """Four ranked candidates (six pairs) become one example with four sequences and six index
    pairs pointing at the right replies; a second prompt is its own example."""
    from transformers import AutoTokenizer

    from training.reward_groups import group_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    replies = ["First best.", "Second.", "Third one.", "Worst."]
    rows = _ranked_rows("Name a colour", replies) + _ranked_rows("Say hi", ["Hi!", "No."])
    data, cut, pairs = group_dataset(tok, rows, 256)
    assert (len(data), cut, pairs) == (2, 0, 7)
    first = data[0]
    assert len(first["reply_ids"]) == 4 and len(first["wins"]) == 6
    decoded = [tok.decode(first["reply_ids"][c]) for c, _ in first["wins"]]
    assert [d.count("First best.") for d in decoded] == [1, 1, 1, 0, 0, 0]  # the best reply wins its three pairs
    assert all(c != r for c, r in first["wins"])
    by_pair, _, _ = group_dataset(tok, rows, 256, by_prompt=False)  # rm_group_by_prompt off
    assert len(by_pair) == 7 and all(len(r["reply_ids"]) == 2 and r["wins"] == [[0, 1]] for r in by_pair)


def test_groups_per_step_keeps_about_the_pairs_per_step():
    """Ranked data (six pairs a prompt) takes one prompt a step for 4 pairs; one pair a prompt takes four."""
    from training.reward_groups import groups_per_step

    assert groups_per_step(pairs=204, groups=34, pairs_per_step=4) == 1
    assert groups_per_step(pairs=200, groups=200, pairs_per_step=4) == 4
    assert groups_per_step(pairs=0, groups=0, pairs_per_step=4) == 1


def test_grouped_loss_equals_trls_pairwise_loss(tmp_path, tiny_model_dir):
    """On the same pairs, the grouped trainer's loss (each reply scored once) equals TRL's
    RewardTrainer loss (both replies of every pair scored): the objective did not change."""
    import torch
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from training.common import base_trainer_args
    from training.reward import conversation_text, load_reward_model
    from training.reward_groups import GroupCollator, group_dataset, grouped_reward_trainer

    model, tok = load_reward_model(tiny_model_dir)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a head that tells replies apart, so the loss is not log 2
    rows = _ranked_rows("Name a colour", ["Blue.", "Red, I think.", "Green!", "No idea."]) + \
        _ranked_rows("Say hi", ["Hi there!", "Go away."])
    data, _, _ = group_dataset(tok, rows, 256)
    args = RewardConfig(max_length=None, **base_trainer_args(tmp_path / "t", 0))
    grouped = grouped_reward_trainer(model=model, args=args, train_dataset=data, processing_class=tok)

    def ids(conv):
        return tok(conversation_text(tok, conv), add_special_tokens=False).input_ids

    pairs = [{"chosen_ids": ids(r["prompt"] + r["chosen"]), "rejected_ids": ids(r["prompt"] + r["rejected"])}
             for r in rows]
    from datasets import Dataset

    trl = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    model.eval()
    with torch.no_grad():
        group_loss = grouped.compute_loss(model, GroupCollator(tok.pad_token_id)([data[0], data[1]]))
        pair_loss = trl.compute_loss(model, DataCollatorForPreference(tok.pad_token_id)(pairs))
    assert abs(float(pair_loss) - 0.6931) > 1e-3
    assert torch.allclose(group_loss, pair_loss, atol=1e-5)
