"""sapo.scoring: how pairs are scored (head, packed or separate layout, remembered reference scores), through the
trainer that uses it and, for the placement of remembered scores, directly."""

import shutil

import helpers
import pytest
import torch
from helpers import ScriptedSampler

from sapo import SAPOTrainer
from sapo.buffer import ReplayBuffer, ReplayEntry
from sapo.recipes import pad_pairs
from sapo.scoring import PairScoring


@pytest.mark.parametrize("recipe", ["sapo-dpo", "sapo-orpo"])
def test_shared_prefix_and_separate_scoring_train_alike(tmp_path, tokenizer, suite, recipe):
    from sapo.tiny import build_model

    runs = {}
    for scoring in ("shared_prefix", "separate"):
        trainer = SAPOTrainer(model=build_model(tokenizer, hidden_size=32, seed=0),
                              args=config(tmp_path / scoring, recipe=recipe, max_steps=3, pair_scoring=scoring),
                              train_dataset=suite["train"], processing_class=tokenizer,
                              sampler=ScriptedSampler([[40, 41, 42, 43, 44, 45], [50, 51, tokenizer.eos_token_id]]))
        assert trainer.scoring.shared_prefix == (scoring == "shared_prefix")
        trainer.train()
        runs[scoring] = helpers.loss_rows(tmp_path / scoring / "out")
    keys = ["loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"]
    for shared, separate in zip(runs["shared_prefix"], runs["separate"], strict=True):
        for key in keys:
            assert shared[key] == pytest.approx(separate[key], abs=1e-5), key
    assert runs["shared_prefix"][-1]["rewards/margins"] != 0  # the steps trained on real differences


def config(tmp_path, **overrides):
    return helpers.config(tmp_path / "out", **{"token_generate_length": 6, "ref_update_mode": "fixed", **overrides})


def test_a_model_that_cannot_pack_pairs_is_scored_separately(tmp_path, tokenizer, suite, caplog):
    from transformers import LlamaForCausalLM

    from sapo.tiny import build_model

    class IgnoresPositionIds(LlamaForCausalLM):
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = IgnoresPositionIds(build_model(tokenizer, hidden_size=32, seed=0).config)
    with caplog.at_level("INFO", logger="sapo.scoring"):
        trainer = SAPOTrainer(model=model, args=config(tmp_path, max_steps=1), train_dataset=suite["train"],
                              processing_class=tokenizer)
    assert not trainer.scoring.shared_prefix
    assert "do not reproduce the separate rows' log-probs" in caplog.text


def reference_rows_counted(trainer):
    """Rows of every reference forward the trainer runs (each call scores real rows then rejected rows)."""
    rows, forward = [], trainer.copies.reference_forward

    def counting(score, model):
        out = forward(score, model)
        rows.append(out.shape[0] // 2)
        return out

    trainer.copies.reference_forward = counting
    return rows


@pytest.mark.parametrize("ref_update_mode", ["fixed", "ema"])
def test_remembered_reference_scores_train_like_fresh_ones_with_fewer_reference_rows(tmp_path, tokenizer, suite,
                                                                                       ref_update_mode):
    """A small buffer is drawn from again and again: most pairs were scored before. With the reference refreshed
    every 2 steps (ema), remembered scores must be dropped at each refresh or the losses would drift."""
    from sapo.tiny import build_model

    runs, rows, refreshes = {}, {}, []
    for cache in (True, False):
        out = tmp_path / str(cache)
        trainer = SAPOTrainer(model=build_model(tokenizer, hidden_size=32, seed=0),
                              args=config(out, max_steps=6, cache_reference_logps=cache, generation_batch_size=4,
                                          ref_update_mode=ref_update_mode, ref_update_steps=2, ema_beta=0.5),
                              train_dataset=suite["train"], processing_class=tokenizer)
        rows[cache] = reference_rows_counted(trainer)
        refresh = trainer.copies.refresh_reference
        trainer.copies.refresh_reference = lambda source, refresh=refresh: refreshes.append(source) or refresh(source)
        trainer.train()
        runs[cache] = helpers.loss_rows(out / "out")
        if cache:
            scored = [e for e in trainer.recipe.buffer.entries() if e.reference_logps is not None]
            if ref_update_mode == "fixed":
                assert scored and all(e.reference_logps[0].shape == (len(e.real),) for e in scored)
            else:  # step 6 refreshed the reference: nothing it scored before is kept
                assert not scored
    for cached, fresh in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert cached[key] == pytest.approx(fresh[key], abs=1e-5), key
    assert sum(rows[False]) == 6 * 4  # every drawn pair, every step
    assert sum(rows[True]) < sum(rows[False])
    assert max(r["ref/cached_fraction"] for r in runs[True]) > 0
    if ref_update_mode == "ema":
        assert refreshes == ["ema"] * 6  # steps 2, 4 and 6 of both runs: the reference did move
        assert runs[True][-1]["rewards/margins"] != 0


def test_remembered_reference_scores_are_checkpointed_and_resume_exactly(tmp_path, tokenizer, suite):
    from sapo.tiny import build_model

    def run(out, max_steps, resume=None):
        trainer = SAPOTrainer(model=build_model(tokenizer, hidden_size=32, seed=0),
                              args=config(out, max_steps=max_steps, generation_batch_size=4, save_steps=3,
                                          save_strategy="steps"),
                              train_dataset=suite["train"], processing_class=tokenizer)
        rows = reference_rows_counted(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, rows

    run(tmp_path / "whole", 6)
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-3"
    shutil.copytree(tmp_path / "whole" / "out" / "checkpoint-3", checkpoint)
    saved = ReplayBuffer.load(checkpoint / "sapo_state" / "replay_buffer_rank0.safetensors").entries()
    assert any(e.reference_logps is not None for e in saved)
    _, rows = run(tmp_path / "resumed", 6, resume=str(checkpoint))
    keys = ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected", "ref/cached_fraction")
    resumed, whole = (helpers.loss_rows(tmp_path / name / "out")[-3:] for name in ("resumed", "whole"))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]  # bit for bit
    assert sum(rows) < 3 * 4  # the resumed steps reused the checkpointed scores


def test_remembered_scores_land_where_the_loss_mask_reads_their_tokens():
    """Scores are placed from host-side lengths; they must sit exactly where `loss_mask` puts each response."""
    entries = [ReplayEntry([1, 2], [3, 4, 5], [6], 0, 1), ReplayEntry([7], [8], [9, 10], 0, 2),
               ReplayEntry([11, 12, 13], [14], [15, 16, 17], 0, 3)]
    batch = pad_pairs(entries, pad_token_id=0)
    batch["pair_lengths"] = [(len(e.prompt), len(e.real), len(e.rejected)) for e in entries]
    scores = [(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0])), None,
              (torch.tensor([-5.0]), torch.tensor([-6.0, -7.0, -8.0]))]
    out = PairScoring._place_remembered(batch, scores)
    mask = batch["loss_mask"][:, 1:]
    assert out.shape == mask.shape
    assert out[0][mask[0]].tolist() == [-1, -2, -3] and out[3][mask[3]].tolist() == [-4]
    assert out[2][mask[2]].tolist() == [-5] and out[5][mask[5]].tolist() == [-6, -7, -8]
    assert not out[~mask].any() and not out[1].any() and not out[4].any()  # nothing outside; pair 1 unknown


class CountingCopies:
    """`ModelCopies` as `PairScoring` uses it, replicated (not sharded), its reference forward a collective one
    through the policy."""

    reference_forward_is_collective, sharded, reference_module = True, False, None

    def __init__(self):
        self.rows = []

    def reference_forward(self, score, model):
        out = score(model)
        self.rows.append(out.shape[0] // 2)
        return out


def test_a_rank_with_every_score_remembered_still_joins_a_collective_reference_forward(monkeypatch, tokenizer,
                                                                                       tmp_path):
    """Under a sharded engine every rank must run the same forwards. Here this rank remembers all its pairs while
    another rank (simulated through `any_rank`) needs a forward: this rank runs one row, and its scores stay right."""
    from types import SimpleNamespace

    import sapo.scoring
    from sapo.recipes import SelfAugmented, StepServices
    from sapo.tiny import build_model

    model = build_model(tokenizer, hidden_size=32, seed=0).eval()
    settings = config(tmp_path)
    args = SimpleNamespace(**vars(settings), world_size=2, device=torch.device("cpu"))  # as rank 0 of two
    services = StepServices(generate=None, refresh_reference_from_policy=None, any_rank=None,
                            record=lambda name, value: None, pad_token_id=tokenizer.pad_token_id,
                            eos_token_ids={tokenizer.eos_token_id})
    recipe = SelfAugmented(args, services, seed=0)
    recipe.buffer.extend([ReplayEntry([1, 5, 6], [7, 8, 9], [7, 10], 1, 1), ReplayEntry([1, 11], [12, 13], [14], 0, 1)])
    copies = CountingCopies()
    scoring = PairScoring(args, model, copies, recipe, tokenizer.pad_token_id, tokenizer.eos_token_id,
                          autocast=lambda: torch.autocast("cpu", enabled=False), record=lambda name, value: None,
                          checks_reference=False)
    assert scoring.use_hidden_states and scoring.shared_prefix  # the constructor's probes, on this model
    asked = []
    monkeypatch.setattr(sapo.scoring, "any_rank", lambda flag, device: asked.append(flag) or True)

    def batch():
        entries = recipe.buffer.entries()
        padded = pad_pairs(entries, tokenizer.pad_token_id)
        padded["entry_ids"] = [e.entry_id for e in entries]
        padded["pair_lengths"] = [(len(e.prompt), len(e.real), len(e.rejected)) for e in entries]
        return padded

    with torch.no_grad():
        first = scoring.reference_token_logps(model, batch())  # nothing remembered: both pairs run
        again = scoring.reference_token_logps(model, batch())  # all remembered, but another rank needs a forward
    assert copies.rows == [2, 1] and asked == [True, False]
    torch.testing.assert_close(again, first, rtol=0, atol=1e-6)
    copies.reference_forward_is_collective = False  # a reference module of its own: no need to join
    with torch.no_grad():
        scoring.reference_token_logps(model, batch())
    assert copies.rows == [2, 1] and asked == [True, False]
