"""Training pipeline: task data, metrics, fine-tuning, importance, distillation, evaluation.

Imports point one way, from the task layer up to the stages (and training imports moebert, never back):

    tasks → features → squad → datasets → evaluate → finetune / distill / importance / predict → pipeline → cli
    (metrics: under evaluate; stages, train_state, sampling, loop, teacher_cache: the stage machinery)

- tasks: what a task is, where its files are, reading them (DataConfig, DataError)
- features, squad, datasets: tokenized splits (text tasks; SQuAD windows); the one loader, load_split
- evaluate: predict / score a model on a split; the evaluate stage
- stages: the stage protocol (atomic outputs with a stage record; "is it done")
- finetune, importance, distill, predict: the stages; pipeline: all of them, resumable; cli: their flags
"""
