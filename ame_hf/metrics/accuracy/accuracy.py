"""Accuracy as a local `evaluate` module: the fraction of predictions equal to the references."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        total = len(references)
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / total if total else 0.0}
