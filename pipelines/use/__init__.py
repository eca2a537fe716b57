"""The use layer: a trained run's model file + its KB image encoder + its KB index -> prediction records.

`retformer predict` (pipelines/cli_use.py), `retformer serve` (pipelines/serve.py), `retformer browse`
(pipelines/browse.py) and the notebook API (`retformer.Run`, retformer/api.py) all predict through
`pipelines.use.predictor.Predictor`; nothing here imports the orchestration (stages, experiment).

A new image takes the path the run's own test images took, step by step, so that the run's test
images predicted here get the classes the run's evaluation gave them:

1. decode (`artifacts/decode.py`), the KB image encoder's preprocessing in the embed stage's batched
   form (`kb_builder/embed/fast_transform.py`) and forward pass, then z rounded to float16 as the
   embed stage stores it (`encoding.py`);
2. the run's KB index (`kb_builder/index/search.py`) with the search parameters the model file
   recorded (tuned by `retformer index`), searched as deep as the run's neighbor tables and cut to
   the model's k; a shard sample whose uid is in the KB does not retrieve itself (as in the
   neighbors stage); the neighbors' rows come from the KB's embeddings parts (`kb_search.py`);
3. `trainer.train.predict` over those `RetrievalFeatures` (the evaluation's own call), fine-tuned
   models on the preprocessed images; score = softmax of the logits (`predictor.py`);
4. what the record says about retrieval (`pipelines/relevance.py`): s (`mean_similarity`), whether the
   rule applied its retrieval term (`retrieval_used`) and `ood` (s below the run's val threshold); a
   labelled shard sample also gets its true `label` and whether the class is `correct` (`records.py`).

Everything comes from the model file (`<run>/<method>.pt`, `trainer.checkpoint.save_model`, found by
`model_file.py`): no manifest is read. The index and KB parts must be the ones the run was trained
against (checked); another KB must be embedded with the run's encoders (`kb_check.py`). The inputs
(files, folders, shards) are read by `inputs.py`.
"""
