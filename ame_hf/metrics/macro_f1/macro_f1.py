"""Macro-averaged F1 as a local `evaluate` module (mean of per-class F1 over the classes seen).

Named `macro_f1`, not `f1`: `evaluate.load("f1")` is binary F1 by default, and one name must not mean two metrics."""

import datasets
import evaluate


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Macro-averaged F1 over the classes present in predictions or references.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        classes = sorted(set(predictions) | set(references))
        scores = []
        for c in classes:
            tp = sum(1 for p, r in zip(predictions, references) if p == c and r == c)
            fp = sum(1 for p, r in zip(predictions, references) if p == c and r != c)
            fn = sum(1 for p, r in zip(predictions, references) if p != c and r == c)
            scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"macro_f1": sum(scores) / len(scores) if scores else 0.0}
