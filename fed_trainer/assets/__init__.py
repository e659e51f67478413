"""Real models and data that ship inside registry packages, so examples, tests and benchmarks run offline."""

from fed_trainer.assets.chatterbot import chatterbot_preference_pairs, load_chatterbot_qa
from fed_trainer.assets.smollm2 import SMOLLM2_TRAINING_CHAT_TEMPLATE, smollm2_path
from fed_trainer.assets.text import MOVIE_FILE, load_bbc_news, load_movie_reviews, minilm_path, movie_reviews_file

__all__ = [
    "MOVIE_FILE",
    "SMOLLM2_TRAINING_CHAT_TEMPLATE",
    "chatterbot_preference_pairs",
    "load_bbc_news",
    "load_chatterbot_qa",
    "load_movie_reviews",
    "minilm_path",
    "movie_reviews_file",
    "smollm2_path",
]
