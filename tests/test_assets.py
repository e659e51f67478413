"""The bundled real data: BBC News from its package, movie reviews parsed from the cached source file."""

import numpy as np

from fed_trainer.assets import MOVIE_FILE, load_bbc_news, load_movie_reviews, minilm_path


def test_bbc_news_is_the_full_corpus_split_by_class():
    data = load_bbc_news(validation_fraction=0.2, seed=0)
    assert len(data["train"]) + len(data["validation"]) == 2225
    assert data["train"].features["label"].names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(np.unique(data["validation"]["label"])) == 5


def test_movie_reviews_take_the_sign_of_the_mean_rating(tmp_path):
    rows = ["1\t2.5\tA joy from start to finish.", "2\t-1.2\tTedious and flat.", "3\t0\tIt is a film.",
            "4\t-3.9\tAwful.", "5\t0.1\tFine, mostly."] * 4  # fmt: skip
    (tmp_path / MOVIE_FILE).write_text("\r\n".join(rows), encoding="utf-8")
    data = load_movie_reviews(validation_fraction=0.25, seed=0, cache_dir=tmp_path)
    texts = list(data["train"]["text"]) + list(data["validation"]["text"])
    labels = list(data["train"]["label"]) + list(data["validation"]["label"])
    assert len(texts) == 16 and "It is a film." not in texts  # rating 0 has no sign: dropped
    assert {t: y for t, y in zip(texts, labels)} == {
        "A joy from start to finish.": 1,
        "Tedious and flat.": 0,
        "Awful.": 0,
        "Fine, mostly.": 1,
    }


def test_minilm_is_a_plain_hf_folder():
    from pathlib import Path

    assert (Path(minilm_path()) / "config.json").exists()
