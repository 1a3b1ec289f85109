"""Questions and answers: the question record, the data sets that give questions (GeoNames,
TriviaQA, PopQA, a user's JSONL/CSV/Parquet), prompts, sampling settings and scoring."""
