"""The run directory: what a training run writes where, and the trainer's entry, checkpoint and final save.

- `sapo.run.start`: `SAPOTrainer.train`'s wrapping (resume resolution and validation, the output-dir lock,
  stop signals, the stop-after-checkpoint ending).
- `sapo.run.state`: writing a checkpoint durably and SAPO's own state in it (`sapo_state/`), loading it back.
- `sapo.run.finish`: the final save (policy, EMA model and cards published as one set) and the model cards.
"""
