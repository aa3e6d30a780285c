"""Published accuracies (%) that a measured run is printed beside (Sky-T1 blog / NovaSky-AI/SkyThought).

Keys: task name, then the breakdown value for LiveCodeBench (the original reports it per difficulty).
AMC23 has no published figure in the Sky-T1 table.
"""
from __future__ import annotations

MODELS = ("Sky-T1-32B-Preview", "Qwen2.5-32B-Instruct", "QwQ-32B-Preview", "o1-preview")

PUBLISHED: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "math500": {"all": (86.4, 81.4, 92.2, 81.4)},
    "aime24": {"all": (43.3, 16.7, 50.0, 40.0)},
    "gpqa_diamond": {"all": (56.8, 45.5, 52.5, 75.2)},
    "olympiadbench": {"all": (59.79, 46.74, 62.17, 59.2)},
    "livecodebench": {
        "easy": (86.3, 84.6, 90.7, 92.9),
        "medium": (56.8, 40.8, 56.3, 54.9),
        "hard": (17.9, 9.8, 17.1, 16.3),
    },
}


def published_for(task: str) -> dict[str, dict[str, float]]:
    """{row label: {model: accuracy %}} for a task, empty when nothing was published."""
    table = PUBLISHED.get(task, {})
    return {label: dict(zip(MODELS, values)) for label, values in table.items()}
