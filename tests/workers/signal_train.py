"""Worker for tests/test_distributed.py: two DDP processes whose generators reproduce their demonstrations (no
signal) on rank 0 and, with `one`, write real rewrites on rank 1; reports per rank the skipped-step count and
digests of the policy before and after training (a step is skipped on every rank together, or on none)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder: its shared helpers

from distributed_train import digest  # noqa: E402
from helpers import CopyingSampler  # noqa: E402

from sapo import SAPOConfig, SAPOTrainer, tasks, tiny  # noqa: E402


def main(out: str, mode: str) -> None:
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, hidden_size=32, seed=0)
    args = SAPOConfig(output_dir=out, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                      token_generate_length=4, max_length=64, max_prompt_length=48, logging_steps=1,
                      report_to="none", save_strategy="no", disable_tqdm=True, seed=0, weight_decay=0.1)
    rank = args.process_index
    sampler = CopyingSampler(differ=range(10_000) if mode == "one" and rank == 1 else ())
    trainer = SAPOTrainer(model=model, args=args, train_dataset=tasks.make_suite(32, 0, seed=0)["train"],
                          processing_class=tokenizer, sampler=sampler)
    sampler.attach(trainer)
    before = digest(trainer.copies.params)
    trainer.train()
    report = {"skipped": trainer.no_signal_steps, "before": before, "after": digest(trainer.copies.params),
              "ema": digest(trainer.copies.ema.tensors)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
