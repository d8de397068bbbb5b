"""The competition's score: MC accuracy, subjective 0.6*cosine + 0.4*keyword recall, format violations."""
from metrics.score import Gold, Prediction, ScoreConfig, score

__all__ = ["Gold", "Prediction", "ScoreConfig", "score"]
