"""Worker for tests/test_distributed.py: trains SAPO-DPO under torchrun and reports per-rank state hashes."""

import hashlib
import json
import sys

import torch

from sapo import SAPOConfig, SAPOTrainer, tasks, tiny


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def main(out: str, max_steps: int, resume: str | None) -> None:
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, hidden_size=32, seed=0)
    args = SAPOConfig(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
                      token_generate_length=4, max_length=64, max_prompt_length=48, logging_steps=1,
                      report_to="none", save_steps=2, use_cpu=True, disable_tqdm=True, ref_update_steps=2, seed=0)
    trainer = SAPOTrainer(model=model, args=args, train_dataset=tasks.make_suite(64, 0, seed=3)["train"],
                          processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    report = {"world_size": args.world_size, "step": trainer.state.global_step,
              "policy": digest(trainer._params), "ema": digest(trainer.ema.tensors),
              "ref": digest(trainer.ref.tensors), "buffer": [e.real for e in trainer.buffer.entries()]}
    with open(f"{out}/rank{args.process_index}.json", "w") as handle:
        json.dump(report, handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
